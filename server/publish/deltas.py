"""Precomputed deltas: on publish, patches from the releases the fleet runs.

Which bases to build from is a pure choice (``choose_bases``): the newest few
releases of the same model and variant, plus whatever the fleet reports it
has installed. Each patch is signed as its own TUF target whose ``custom``
names the base and target sha256, so a device asks for exactly
``delta_target_path(name, release, variant, <sha256 it runs>)`` and falls back
to the full file when no such target exists.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.delta import DeltaError, make_delta
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

Progress = Callable[[int, int], None]


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


def build_deltas(
    repo: TufRepository,
    new: ModelManifest,
    new_path: Path,
    bases: Iterable[Base],
    progress: Progress | None = None,
) -> list[BuiltDelta]:
    """Make, sign and publish one delta per base in a single metadata bump."""
    built: list[BuiltDelta] = []
    items: list[tuple[str, Path | bytes, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-delta-") as tmp:
        for base in bases:
            out = Path(tmp) / f"{base.sha256}.efd"
            try:
                info = make_delta(repo.target_file(base.target_path), new_path, out, progress)
            except (DeltaError, OSError) as err:
                # One bad base must not block the release: devices on it get the full file.
                log.error("delta from release %s failed: %s", base.release, err)
                continue
            if info.patch_size >= new.length:
                log.info(
                    "delta from release %s is not smaller than the file; skipped", base.release
                )
                continue
            path = delta_target_path(new.name, new.release, new.variant, base.sha256)
            manifest = DeltaManifest(
                name=new.name,
                release=new.release,
                variant=new.variant,
                base_sha256=base.sha256,
                target_sha256=new.sha256,
                target_length=new.length,
                target_path=model_target_path(new.name, new.release, new.variant),
            )
            items.append((path, out.read_bytes(), manifest.to_custom()))
            built.append(
                BuiltDelta(
                    base.release, base.sha256, path, info.patch_size, info.method, new.length
                )
            )
        if items:
            try:
                repo.add_targets(items)
            except OSError as err:
                raise DeltaBuildError(f"cannot store deltas: {err}") from err
    for delta in built:
        log.info(
            "delta %s@%s from release %s: %d bytes (%.1f%% of %d, %s)",
            new.name, new.release, delta.base_release, delta.length,
            100.0 * delta.length / max(new.length, 1), new.length, delta.method,
        )  # fmt: skip
    return built
