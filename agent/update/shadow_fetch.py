"""Fetching a rollout's shadow candidate: TUF-verified, beside the slots, never in them.

A shadow candidate is only ever run, never installed, so it does not go
through the update state machine and never touches an A/B slot: it lands in
``state_dir/shadow/`` as one file named by its sha256. Everything about it
(length, hash, name, release, variant) comes from signed TUF metadata, as for
an update; the director only names which signed target to try. A file already
there with the signed sha256 is reused; any other candidate is removed, so the
directory holds at most one model (plus a partial download to resume).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common.errors import UpdateError
from agent.protocol.api import ShadowTarget
from agent.update.download import download, target_url
from agent.update.fetch import TufFetcher
from agent.update.trust import file_sha256

log = logging.getLogger(__name__)

SUFFIX = ".tflite"


@dataclass(frozen=True)
class ShadowModel:
    """A verified candidate on disk and its signed manifest (the worker's ``manifest``)."""

    path: Path
    manifest: dict[str, Any]
    sha256: str
    downloaded: bool  # False when an earlier download was reused


class ShadowFetcher:
    def __init__(self, fetcher: TufFetcher, directory: Path) -> None:
        self.fetcher = fetcher
        self.directory = Path(directory)

    def fetch(self, target: ShadowTarget, skip_sha256: str | None = None) -> ShadowModel | None:
        """The candidate, downloaded or reused; None when its sha256 is ``skip_sha256``.

        ``skip_sha256`` is the installed model's: shadowing a model against itself
        would measure nothing, so that is checked before any byte is downloaded.
        Raises VerificationError (not signed, manifest disagrees with the target,
        wrong hash) or DownloadError.
        """
        manifest, custom = self.fetcher.manifest_for(target.desired)
        if manifest.sha256 == skip_sha256:
            self._remove_others(None)
            return None
        dest = self.directory / f"{manifest.sha256}{SUFFIX}"
        self._remove_others(dest)
        if dest.is_file() and self._matches(dest, manifest.sha256, manifest.length):
            log.info("shadow candidate %s@%s already on disk", manifest.name, manifest.release)
            return ShadowModel(dest, custom, manifest.sha256, downloaded=False)
        dest.unlink(missing_ok=True)
        url = target_url(self.fetcher.base_url, target.target_path, manifest.sha256)
        # Bounded by the signed length; a body with another sha256 is deleted and refused.
        download(url, dest, manifest.length, manifest.sha256, self.fetcher.limits.download)
        log.info("shadow candidate %s@%s downloaded", manifest.name, manifest.release)
        return ShadowModel(dest, custom, manifest.sha256, downloaded=True)

    def clear(self) -> None:
        """Remove any candidate (shadowing ended): the disk is the serving model's."""
        self._remove_others(None)

    def _remove_others(self, keep: Path | None) -> None:
        keep_part = None if keep is None else keep.with_name(keep.name + ".part")
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            for entry in self.directory.iterdir():
                if entry not in (keep, keep_part) and entry.is_file():
                    entry.unlink(missing_ok=True)
        except OSError as err:
            raise UpdateError("shadow_fetch", f"cannot use {self.directory}: {err}") from err

    @staticmethod
    def _matches(path: Path, sha256: str, length: int) -> bool:
        try:
            size, digest = file_sha256(path)
        except OSError:
            return False
        return size == length and digest == sha256
