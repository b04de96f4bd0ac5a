"""Gets a signed target onto the device: TUF lookup, delta or full download, verification.

The director names a target path; everything about it (length, hash, what it
is) comes from TUF metadata the device verified itself, so a compromised
director can only pick among validly signed targets. A delta is tried first
when the repository signs one from the sha256 this device runs: the version-2
(ANS) patch when this install can decode it (``ans_available()``) and it is
signed, else the version-1 patch every agent reads (``delta_choices``). Any
problem with the chosen one (absent, refused, corrupt) falls back to the full
file, and the result says which happened (``via``: ``delta-ans``, ``delta``
or ``full``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.common.errors import AgentError, DeltaError, VerificationError
from agent.delta import ans_available, apply_delta
from agent.protocol.api import DesiredTarget
from agent.protocol.custom_fields import TargetInfo
from agent.protocol.manifest import (
    DeltaManifest,
    ModelManifest,
    check_sha256,
    delta_target_path,
)
from agent.update.download import DownloadLimits, download, target_url
from agent.update.state_machine import UpdateRecord
from agent.update.trust import TrustClient
from agent.update.updater import FetchResult

log = logging.getLogger(__name__)

# (sha256, path) of the model the device runs now, or None before the first install.
CurrentModel = Callable[[], tuple[str, Path] | None]
# What a download through each delta format version is reported as (bandwidth rows).
DELTA_VIA = {1: "delta", 2: "delta-ans"}


@dataclass(frozen=True)
class DeltaChoice:
    """One delta target a device may ask for: its path, format version and report name."""

    path: str
    format_version: int
    via: str


def delta_choices(
    name: str, release: int, variant: str, base_sha256: str, *, ans: bool
) -> list[DeltaChoice]:
    """Pure: the delta targets to look for, best first; the first one signed is used.

    Version 2 only when this install decodes ANS (no aarch64 constriction wheel yet).
    """
    versions = (2, 1) if ans else (1,)
    return [
        DeltaChoice(delta_target_path(name, release, variant, base_sha256, v), v, DELTA_VIA[v])
        for v in versions
    ]


def check_delta(
    delta: DeltaManifest, choice: DeltaChoice, base_sha256: str, target: TargetInfo
) -> None:
    """The signed delta must patch this base into exactly this target, in its path's format."""
    if (delta.base_sha256, delta.target_sha256, delta.target_length) != (
        check_sha256(base_sha256),
        target.sha256,
        target.length,
    ):
        raise VerificationError(f"delta {choice.path} is signed for another base or target")
    if delta.format_version != choice.format_version:
        raise VerificationError(
            f"delta {choice.path} is signed as format version {delta.format_version}"
        )


@dataclass(frozen=True)
class FetchLimits:
    max_model_bytes: int = 512 * 1024 * 1024
    download: DownloadLimits = field(default_factory=DownloadLimits)
    use_deltas: bool = True


class TufFetcher:
    def __init__(
        self,
        trust: TrustClient,
        base_url: str,
        limits: FetchLimits,
        current: CurrentModel | None = None,
    ) -> None:
        self.trust = trust
        self.base_url = base_url.rstrip("/")
        self.limits = limits
        self.current = current or (lambda: None)

    def manifest_for(self, desired: DesiredTarget) -> tuple[ModelManifest, dict[str, Any]]:
        self.trust.refresh()
        info = self.trust.target_info(desired.target_path)
        manifest = ModelManifest.from_custom(info.custom)
        check_manifest(manifest, info, desired, self.limits.max_model_bytes)
        return manifest, dict(info.custom)

    def fetch(self, record: UpdateRecord, desired: DesiredTarget, dest: Path) -> FetchResult:
        info = self._info(record)
        detail: dict[str, Any] = {"target_bytes": info.length, "delta_bytes": 0, "fallback": None}
        current = self.current() if self.limits.use_deltas else None
        if current is not None and current[0] != info.sha256:
            try:
                sent, via = self._via_delta(desired, info, current, dest, detail)
                return FetchResult(dest, via, sent, {**detail, "via": via})
            except AgentError as err:
                detail["fallback"] = str(err)
                log.warning("delta for %s not used (%s); downloading the full file", info.path, err)
        result = download(
            target_url(self.base_url, info.path, info.sha256), dest, info.length, info.sha256,
            self.limits.download,
        )  # fmt: skip
        total = result.bytes_transferred + int(detail["delta_bytes"])
        log.info("downloaded %s in full: %d bytes", info.path, result.bytes_transferred)
        return FetchResult(
            dest, "full", total, {**detail, "via": "full", "resumed": result.resumed}
        )

    def _via_delta(
        self,
        desired: DesiredTarget,
        info: TargetInfo,
        current: tuple[str, Path],
        dest: Path,
        detail: dict[str, Any],
    ) -> tuple[int, str]:
        """Download and apply the best signed delta; (bytes downloaded, its ``via``)."""
        base_sha, base_path = current
        choices = delta_choices(
            desired.name, desired.release, desired.variant, base_sha, ans=ans_available()
        )
        missing: VerificationError | None = None
        for choice in choices:
            try:
                delta_info = self.trust.target_info(choice.path)
                break
            except VerificationError as err:
                missing = err
        else:
            raise DeltaError(f"no signed delta from {base_sha[:12]}") from missing
        path = choice.path
        check_delta(DeltaManifest.from_custom(delta_info.custom), choice, base_sha, info)
        detail["delta_path"] = path
        patch = dest.with_name(dest.name + ".efd")
        url = target_url(self.base_url, delta_info.path, delta_info.sha256)
        result = download(url, patch, delta_info.length, delta_info.sha256, self.limits.download)
        detail["delta_bytes"] = result.bytes_transferred
        try:
            apply_delta(base_path, patch, dest)
        finally:
            patch.unlink(missing_ok=True)
        log.info(
            "applied delta %s: %d bytes for a %d-byte model", path, delta_info.length, info.length
        )
        return result.bytes_transferred, choice.via

    def target_info(self, target_path: str) -> TargetInfo:
        """Signed facts about a target, from freshly refreshed metadata."""
        self.trust.refresh()
        return self.trust.target_info(target_path)

    def fetch_aux(self, target_path: str, dest: Path, max_bytes: int = 64 * 1024 * 1024) -> Path:
        """A small signed companion file (a golden set): TUF-verified, bounded."""
        self.trust.refresh()
        info = self.trust.target_info(target_path)
        if info.length > max_bytes:
            raise VerificationError(f"{target_path} is {info.length} bytes, above {max_bytes}")
        url = target_url(self.base_url, info.path, info.sha256)
        download(url, dest, info.length, info.sha256, self.limits.download)
        return dest

    def verify(self, record: UpdateRecord, path: Path) -> None:
        self.trust.verify_file(self._info(record), path)

    def _info(self, record: UpdateRecord) -> TargetInfo:
        if not record.target_path:
            raise VerificationError("no target recorded")
        self.trust.refresh()
        return self.trust.target_info(record.target_path)


def check_manifest(
    manifest: ModelManifest, info: TargetInfo, desired: DesiredTarget, max_bytes: int
) -> None:
    """The signed manifest must describe exactly the signed file the director named."""
    if manifest.sha256 != info.sha256 or manifest.length != info.length:
        raise VerificationError("manifest hash/length disagree with the signed target")
    if (manifest.name, manifest.release, manifest.variant) != (
        desired.name,
        desired.release,
        desired.variant,
    ):
        raise VerificationError(
            f"director asked for {desired.name}@{desired.release}/{desired.variant} but "
            f"{info.path} is signed as {manifest.name}@{manifest.release}/{manifest.variant}"
        )
    if info.length > max_bytes:
        raise VerificationError(f"target is {info.length} bytes, above the {max_bytes}-byte limit")
