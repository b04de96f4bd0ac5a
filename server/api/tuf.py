"""TUF metadata and targets served as plain files, with HTTP Range for resumed downloads.

Paths are checked segment by segment before touching the disk, then the
resolved file must still lie inside its directory (no traversal, no symlink
escape). Trust comes from the signatures, so these routes need no token.

With a remote artifact store, metadata is read from the store on each request
(it is small, and another worker or replica may have just committed) and
targets from this process's cache, filled from the store on a miss. With
``--targets-url`` the same paths answer 307 to that host: devices enrolled
before it was set fetch from there too (new ones are told at enrollment).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import FileResponse, RedirectResponse

from agent.protocol.api import TUF_METADATA_PREFIX, TUF_TARGETS_PREFIX
from server.api.deps import AppState, app_state
from server.api.schemas import ErrorOut
from server.errors import InvalidInputError, NotFoundError
from server.publish.artifact_store import cache_control

router = APIRouter(tags=["tuf"], responses={404: {"model": ErrorOut}, 422: {"model": ErrorOut}})
State = Annotated[AppState, Depends(app_state)]

_METADATA_NAME = re.compile(r"^(?:[1-9][0-9]{0,9}\.)?[A-Za-z][A-Za-z0-9_-]{0,63}\.json$")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_MAX_TARGET_PATH = 1024


def safe_target_path(path: str) -> str:
    """Reject anything but relative ``seg/seg/file`` names of safe characters."""
    segments = path.split("/")
    if len(path) > _MAX_TARGET_PATH or not all(
        _SEGMENT.match(seg) and ".." not in seg for seg in segments
    ):
        raise InvalidInputError("target path must be relative segments of [A-Za-z0-9._-]")
    return path


def _file_inside(root: Path, relative: str) -> Path:
    base = root.resolve()
    candidate = (base / relative).resolve()
    if not candidate.is_relative_to(base) or not candidate.is_file():
        raise NotFoundError(f"no such file {relative!r}")
    return candidate


def _elsewhere(st: AppState, url_path: str) -> Response | None:
    """307 to the targets URL when one is configured: same path under another base."""
    base = st.config.targets_url
    return None if base is None else RedirectResponse(base.rstrip("/") + url_path, 307)


@router.get(TUF_METADATA_PREFIX + "{filename}", response_model=None)
def metadata(filename: str, st: State) -> Response:
    if not _METADATA_NAME.match(filename):
        raise InvalidInputError("metadata name must look like [N.]role.json")
    if (moved := _elsewhere(st, TUF_METADATA_PREFIX + filename)) is not None:
        return moved
    # Unversioned files (timestamp.json, root.json) change in place: never cache them.
    headers = {"Cache-Control": cache_control(f"metadata/{filename}")}
    local = st.repo.store.local_root
    if local is None:
        return Response(st.repo.metadata_bytes(filename), 200, headers, "application/json")
    path = _file_inside(local / "metadata", filename)
    return FileResponse(path, media_type="application/json", headers=headers)


@router.get(TUF_TARGETS_PREFIX + "{target_path:path}", response_model=None)
def target(target_path: str, st: State) -> Response:
    stored = safe_target_path(target_path)
    if (moved := _elsewhere(st, TUF_TARGETS_PREFIX + stored)) is not None:
        return moved
    local = st.repo.store.local_root
    if local is None:
        st.repo.stored_file(stored)  # into this process's cache, from the store on a miss
        local = st.repo.repo_dir
    path = _file_inside(local / "targets", stored)
    # Stored names carry their sha256, so the bytes behind a URL never change.
    return FileResponse(
        path,
        media_type="application/octet-stream",
        headers={"Cache-Control": cache_control(f"targets/{stored}")},
    )
