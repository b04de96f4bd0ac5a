"""Precomputed deltas: after publish, patches from the releases the fleet runs.

Which bases to build from is a pure choice (``choose_bases``): the newest few
releases of the same model and variant, plus whatever the fleet reports it
has installed. Publish queues one job per base (``server.publish.delta_jobs``);
the background worker (``server.publish.delta_worker``) makes each patch and
signs it here as its own TUF target whose ``custom`` names the base and target
sha256, so a device asks for exactly ``delta_target_path(name, release,
variant, <sha256 it runs>)`` and falls back to the full file while no such
target exists. Every pair gets a format version 1 patch at that path (every
agent decodes it); when an ANS-coded version 2 patch is smaller, it is signed
beside it at ``delta_target_path(..., format_version=2)`` for devices that can
decode it (``custom["format_version"]`` says which is which).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.protocol.manifest import (
    DeltaManifest,
    ModelManifest,
    delta_target_path,
    model_target_path,
)
from server.db.tables import Device, Model
from server.errors import DeltaBuildError
from server.publish.tuf_repo import TufRepository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Base:
    """A release a device may be running: where its signed bytes are."""

    release: int
    sha256: str
    target_path: str


@dataclass(frozen=True)
class BuiltDelta:
    base_release: int
    base_sha256: str
    target_path: str
    length: int
    method: str
    target_length: int


def choose_bases(
    new: ModelManifest,
    published: Sequence[Base],
    installed_counts: dict[str, int],
    keep_recent: int = 3,
    max_bases: int = 8,
) -> list[Base]:
    """Pure: the newest ``keep_recent`` older releases, then the most-installed others."""
    older = sorted(
        (b for b in published if b.release < new.release and b.sha256 != new.sha256),
        key=lambda b: b.release,
        reverse=True,
    )
    chosen = older[:keep_recent]
    seen = {b.sha256 for b in chosen}
    rest = sorted(
        (b for b in older if b.sha256 not in seen and installed_counts.get(b.sha256, 0) > 0),
        key=lambda b: installed_counts[b.sha256],
        reverse=True,
    )
    return (chosen + rest)[:max_bases]


def versions_to_sign(sizes: Mapping[int, int], target_bytes: int) -> list[int]:
    """Pure: which built patches (format version -> bytes) are worth signing.

    Version 1 whenever it is smaller than the file: it is what every agent decodes, and
    deployed agents know only its path. Version 2 only when it is smaller than both the
    file and the version 1 patch (a device that can decode it then saves bytes).
    """
    chosen = [1] if 1 in sizes and sizes[1] < target_bytes else []
    if 2 in sizes and sizes[2] < min(target_bytes, sizes.get(1, target_bytes)):
        chosen.append(2)
    return chosen


def fleet_bases(s: Session, new: ModelManifest) -> tuple[list[Base], dict[str, int]]:
    """The published releases of ``new``'s model and variant, and install counts per sha256."""
    rows = s.scalars(
        select(Model).where(Model.name == new.name, Model.variant == new.variant)
    ).all()
    published = [Base(m.release, m.sha256, m.target_path) for m in rows]
    counts = s.execute(
        select(Device.installed_sha256, func.count())
        .where(Device.installed_name == new.name, Device.installed_variant == new.variant)
        .group_by(Device.installed_sha256)
    ).all()
    return published, {str(sha): int(n) for sha, n in counts if sha}


def sign_delta(
    repo: TufRepository,
    name: str,
    release: int,
    variant: str,
    *,
    base_sha256: str,
    patches: Mapping[int, Path],
) -> list[str]:
    """Sign each patch (format version -> file, base -> the published release); their paths.

    All in one targets version, so a device never sees the version 2 patch without the
    version 1 one. The release's target must still be signed: its manifest is what the
    delta's ``custom`` repeats, so a release revoked while its delta was building gets none.
    """
    target = model_target_path(name, release, variant)
    info = repo.target_info(target)  # also picks up other processes' publishes
    new = ModelManifest.from_custom(info.custom)
    entries = []
    for version, patch in sorted(patches.items()):
        path = delta_target_path(name, release, variant, base_sha256, version)
        manifest = DeltaManifest(
            name=name,
            release=release,
            variant=variant,
            base_sha256=base_sha256,
            target_sha256=new.sha256,
            target_length=new.length,
            target_path=target,
            format_version=version,
        )
        try:
            entries.append((path, patch.read_bytes(), manifest.to_custom()))
        except OSError as err:
            raise DeltaBuildError(f"cannot read delta {path}: {err}") from err
    try:
        repo.add_targets(entries)
    except OSError as err:
        raise DeltaBuildError(f"cannot store deltas {[p for p, _, _ in entries]}: {err}") from err
    return [p for p, _, _ in entries]
