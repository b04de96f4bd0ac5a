"""Signed targets for the whole simulated fleet: verified once, shared by every device.

One ``TrustClient`` (python-tuf's ngclient, as on a device) verifies the
server's metadata for the process; each target's bytes are downloaded once
with the agent's resumable downloader and checked against the signed length
and sha256 once, then every simulated device "has" them. A delta is fetched
and applied once per (base, target) pair with the agent's decoder, and the
result's sha256 checked, so the delta path the devices report is a real one.
What is shared is the verification work; each device still downloads its own
copy of the files ``Fetched.files`` names (``device_fetch``).

The TUF client is synchronous (requests); its calls run on a worker thread
under one asyncio lock. Metadata is refreshed when a target is not (yet)
known, at most once per ``refresh_interval_s``: a release published during
the run becomes visible without a refresh per device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import requests

from agent.common.errors import AgentError, VerificationError
from agent.delta import ans_available, apply_delta
from agent.protocol.api import DesiredTarget
from agent.protocol.custom_fields import TargetInfo
from agent.protocol.manifest import DeltaManifest, ModelManifest
from agent.update.download import DownloadLimits, download, target_url
from agent.update.fetch import DELTA_VIA, check_delta, check_manifest, delta_choices
from agent.update.trust import TrustClient

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ArtifactLimits:
    max_model_bytes: int = 512 * 1024 * 1024
    refresh_interval_s: float = 2.0  # at most one metadata refresh per this long
    download: DownloadLimits = field(
        default_factory=lambda: DownloadLimits(retries=2, backoff_base_s=0.2, timeout_s=30.0)
    )


@dataclass(frozen=True)
class SignedModel:
    """A model target as the device's own verification sees it."""

    manifest: ModelManifest
    info: TargetInfo
    custom: dict[str, object]


@dataclass(frozen=True)
class Fetched:
    """How a device gets the target's bytes, as the agent would report it."""

    via: str  # "delta" | "delta-ans" | "full"
    bytes_downloaded: int
    delta_bytes: int
    fallback: str | None
    files: tuple[TargetInfo, ...]  # what the device downloads, in order (a delta in vain too)


class SharedArtifacts:
    def __init__(
        self,
        base_url: str,
        pinned_root: bytes,
        cache_dir: Path,
        limits: ArtifactLimits | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_dir = Path(cache_dir)
        self.limits = limits or ArtifactLimits()
        self._session = requests.Session()
        self._trust = TrustClient(self.cache_dir / "tuf", self.base_url, pinned_root, self._session)
        self._lock = asyncio.Lock()
        self._refreshed_at = -float("inf")
        self._infos: dict[str, TargetInfo | None] = {}  # None: not signed at the last refresh
        self._files: dict[str, Path] = {}  # sha256 -> verified file
        # (base, target) -> (the signed delta or None, why it is not usable or None)
        self._deltas: dict[tuple[str, str], tuple[TargetInfo | None, str | None]] = {}
        self.refreshes = 0
        self.downloads = 0

    async def _locked(self, fn: Callable[[], T]) -> T:
        async with self._lock:
            return await asyncio.to_thread(fn)

    def _refresh(self) -> None:
        self._trust.refresh()
        self._refreshed_at = time.monotonic()
        self._infos = {}
        self.refreshes += 1

    def _info(self, path: str) -> TargetInfo | None:
        """Signed facts about ``path`` (None if unsigned), refreshing when it is unknown."""
        fresh = time.monotonic() - self._refreshed_at < self.limits.refresh_interval_s
        if path not in self._infos and not fresh:
            self._refresh()
        if path not in self._infos:
            try:
                self._infos[path] = self._trust.target_info(path)
            except VerificationError as err:
                if "not a signed target" not in str(err):
                    raise
                self._infos[path] = None
        return self._infos[path]

    def _signed(self, path: str) -> TargetInfo:
        info = self._info(path)
        if info is None:
            raise VerificationError(f"{path} is not a signed target (unknown or revoked)")
        return info

    async def model(self, desired: DesiredTarget) -> SignedModel:
        """The signed manifest of the target the director named (VerificationError if not)."""

        def lookup() -> SignedModel:
            info = self._signed(desired.target_path)
            manifest = ModelManifest.from_custom(info.custom)
            check_manifest(manifest, info, desired, self.limits.max_model_bytes)
            return SignedModel(manifest, info, dict(info.custom))

        return await self._locked(lookup)

    async def signed(self, path: str) -> TargetInfo:
        """Signed facts about any target (a golden set, say); VerificationError if unsigned."""
        return await self._locked(lambda: self._signed(path))

    async def file(self, info: TargetInfo) -> Path:
        """The target's bytes on local disk, downloaded and verified once for the fleet."""
        return await self._locked(lambda: self._file(info))

    def _file(self, info: TargetInfo) -> Path:
        known = self._files.get(info.sha256)
        if known is not None:
            return known
        dest = self.cache_dir / "targets" / info.sha256
        url = target_url(self.base_url, info.path, info.sha256)
        download(url, dest, info.length, info.sha256, self.limits.download, session=self._session)
        self._trust.verify_file(info, dest)
        self.downloads += 1
        self._files[info.sha256] = dest
        log.info(
            "fetched and verified %s (%d bytes) for the simulated fleet", info.path, info.length
        )
        return dest

    async def fetch(self, model: SignedModel, base: SignedModel | None) -> Fetched:
        """Get the target as an agent would: a signed delta from ``base`` if any, else in full."""
        return await self._locked(lambda: self._fetch(model, base))

    def _fetch(self, model: SignedModel, base: SignedModel | None) -> Fetched:
        target = model.info
        if base is None or base.info.sha256 == target.sha256:
            self._file(target)
            return Fetched("full", target.length, 0, None, (target,))
        delta, problem = self._delta(model, base)
        if delta is not None and problem is None:
            via = DELTA_VIA[DeltaManifest.from_custom(delta.custom).format_version]
            return Fetched(via, delta.length, delta.length, None, (delta,))
        self._file(target)
        # As the agent reports it: a delta fetched in vain counts on top of the full file.
        vain = (delta,) if delta is not None else ()
        sent = delta.length if delta is not None else 0
        return Fetched("full", target.length + sent, sent, problem, (*vain, target))

    def _delta(self, model: SignedModel, base: SignedModel) -> tuple[TargetInfo | None, str | None]:
        """(the signed delta, None) or (the delta fetched in vain or None, why it fell back)."""
        key = (base.info.sha256, model.info.sha256)
        if key not in self._deltas:
            self._deltas[key] = self._try_delta(model, base)
        return self._deltas[key]

    def _try_delta(
        self, model: SignedModel, base: SignedModel
    ) -> tuple[TargetInfo | None, str | None]:
        m = model.manifest
        # The agent's choice: the ANS-coded (version 2) delta when signed, else version 1.
        for choice in delta_choices(
            m.name, m.release, m.variant, base.info.sha256, ans=ans_available()
        ):
            info = self._info(choice.path)
            if info is not None:
                break
        if info is None:
            return None, f"no signed delta from {base.info.sha256[:12]}"
        path = choice.path
        try:
            delta = DeltaManifest.from_custom(info.custom)
            check_delta(delta, choice, base.info.sha256, model.info)
            patch = self._file(info)
            rebuilt = self.cache_dir / "rebuilt" / model.info.sha256
            rebuilt.parent.mkdir(parents=True, exist_ok=True)
            apply_delta(self._file(base.info), patch, rebuilt)
            self._trust.verify_file(model.info, rebuilt)
        except AgentError as err:
            log.warning("delta %s not usable: %s", path, err)
            return info, str(err)
        self._files.setdefault(model.info.sha256, rebuilt)
        return info, None
