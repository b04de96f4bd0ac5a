"""TUF metadata and targets served as plain files, with HTTP Range for resumed downloads.

Paths are checked segment by segment before touching the disk, then the
resolved file must still lie inside its directory (no traversal, no symlink
escape). Trust comes from the signatures, so these routes need no token.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from agent.protocol.api import TUF_METADATA_PREFIX, TUF_TARGETS_PREFIX
from server.api.deps import AppState, app_state
from server.api.schemas import ErrorOut
from server.errors import InvalidInputError, NotFoundError

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


@router.get(TUF_METADATA_PREFIX + "{filename}")
def metadata(filename: str, st: State) -> FileResponse:
    if not _METADATA_NAME.match(filename):
        raise InvalidInputError("metadata name must look like [N.]role.json")
    path = _file_inside(st.repo.metadata_dir, filename)
    # Unversioned files (timestamp.json, root.json) change in place: never cache them.
    cache = "no-store" if filename[0].isalpha() else "public, max-age=300"
    return FileResponse(path, media_type="application/json", headers={"Cache-Control": cache})


@router.get(TUF_TARGETS_PREFIX + "{target_path:path}")
def target(target_path: str, st: State) -> FileResponse:
    path = _file_inside(st.repo.targets_dir, safe_target_path(target_path))
    # Stored names carry their sha256, so the bytes behind a URL never change.
    return FileResponse(
        path,
        media_type="application/octet-stream",
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )
