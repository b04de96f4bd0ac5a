"""Gets a signed target onto the device: TUF lookup, bounded download, verification.

The director names a target path; everything about it (length, hash, what it
is) comes from TUF metadata the device verified itself, so a compromised
director can only pick among validly signed targets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.download import DownloadLimits, download, target_url
from agent.errors import VerificationError
from agent.protocol.api import DesiredTarget
from agent.protocol.manifest import ModelManifest
from agent.statemachine import UpdateRecord
from agent.trust import TargetInfo, TrustClient
from agent.updater import FetchResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchLimits:
    max_model_bytes: int = 512 * 1024 * 1024
    download: DownloadLimits = field(default_factory=DownloadLimits)


class TufFetcher:
    def __init__(self, trust: TrustClient, base_url: str, limits: FetchLimits) -> None:
        self.trust = trust
        self.base_url = base_url.rstrip("/")
        self.limits = limits

    def manifest_for(self, desired: DesiredTarget) -> tuple[ModelManifest, dict[str, Any]]:
        self.trust.refresh()
        info = self.trust.target_info(desired.target_path)
        manifest = ModelManifest.from_custom(info.custom)
        check_manifest(manifest, info, desired, self.limits.max_model_bytes)
        return manifest, dict(info.custom)

    def fetch(self, record: UpdateRecord, desired: DesiredTarget, dest: Path) -> FetchResult:
        info = self._info(record)
        url = target_url(self.base_url, info.path, info.sha256)
        result = download(url, dest, info.length, info.sha256, self.limits.download)
        log.info(
            "downloaded %s: %d bytes (resumed=%s)",
            info.path,
            result.bytes_transferred,
            result.resumed,
        )
        detail = {
            "via": "full",
            "bytes_downloaded": result.bytes_transferred,
            "target_bytes": info.length,
            "resumed": result.resumed,
        }
        return FetchResult(dest, "full", result.bytes_transferred, detail)

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
