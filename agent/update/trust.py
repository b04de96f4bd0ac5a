"""The device's trust anchor: TUF metadata verification with python-tuf's ngclient.

The device pins a root.json at provisioning. Every check-in refreshes the
top-level metadata (root -> timestamp -> snapshot -> targets), which gives
signature, version (rollback) and expiry (freeze) protection. Targets are
fetched by ``agent.update.download`` (resumable) and then checked here against the
signed length and sha256 before anything is installed.

Every python-tuf failure becomes a ``VerificationError`` carrying the reason;
network trouble is the ``TrustUnavailableError`` subclass, so a caller can
retry later instead of reporting an attack.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import requests
import urllib3
from tuf.api import exceptions as tuf_exc  # light; tuf.ngclient is imported on first use

from agent.common.errors import ProtocolError, VerificationError
from agent.protocol.api import TUF_METADATA_PREFIX, TUF_TARGETS_PREFIX
from agent.protocol.custom_fields import TargetInfo, decode_custom
from agent.protocol.manifest import check_sha256
from agent.transport.deadline import Deadline, DeadlineExceededError, iter_body, open_stream

if TYPE_CHECKING:
    from tuf.ngclient.fetcher import FetcherInterface
    from tuf.ngclient.updater import Updater

logger = logging.getLogger(__name__)

_HASH_CHUNK = 1024 * 1024


class TrustUnavailableError(VerificationError):
    """Metadata could not be fetched (server down, HTTP error): retry later."""


@dataclass(frozen=True)
class TrustLimits:
    """Bounds for metadata fetching; python-tuf enforces the length caps."""

    timeout_s: float = 30.0
    deadline_s: float = 60.0  # overall, per metadata file: a dripping server cannot hold it
    chunk_size: int = 64 * 1024
    root_max_length: int = 512_000
    timestamp_max_length: int = 16_384
    snapshot_max_length: int = 2_000_000
    targets_max_length: int = 5_000_000


@functools.cache
def _session_fetcher() -> Callable[
    [requests.Session, TrustLimits, Callable[[int], None]], FetcherInterface
]:
    """The fetcher class, built on first use: importing tuf.ngclient loads python-tuf's
    metadata and crypto stack (~10 MB RSS), which an agent that is not updating never needs."""
    from tuf.ngclient.fetcher import FetcherInterface  # noqa: PLC0415

    class _SessionFetcher(FetcherInterface):
        """python-tuf fetcher over a requests session (shared headers, proxies, TLS)."""

        def __init__(
            self, session: requests.Session, limits: TrustLimits, count: Callable[[int], None]
        ) -> None:
            self._session = session
            self._limits = limits
            self._count = count  # bytes received, for the bandwidth report
            self._response: requests.Response | None = None

        def download_bytes(self, url: str, max_length: int) -> bytes:
            # python-tuf stops reading at max_length but leaves the chunk generator
            # suspended in its traceback: close the connection now, not at the next
            # GC, or an endless answer keeps a socket open to the attacker.
            try:
                return super().download_bytes(url, max_length)
            finally:
                if self._response is not None:
                    self._response.close()
                    self._response = None

        def _fetch(self, url: str) -> Iterator[bytes]:
            limits = self._limits
            deadline = Deadline(limits.deadline_s)
            response = open_stream(self._session, "GET", url, deadline, limits.timeout_s)
            if response.status_code >= 400:
                response.close()
                raise tuf_exc.DownloadHTTPError(
                    f"{url} answered HTTP {response.status_code}", response.status_code
                )
            self._response = response
            return self._chunks(response, deadline)

        def _chunks(self, response: requests.Response, deadline: Deadline) -> Iterator[bytes]:
            limits = self._limits
            try:
                for chunk in iter_body(response, deadline, limits.timeout_s, limits.chunk_size):
                    self._count(len(chunk))
                    yield chunk
            except (DeadlineExceededError, requests.RequestException, OSError) as err:
                raise tuf_exc.DownloadError(f"connection lost: {err}") from err
            except urllib3.exceptions.HTTPError as err:
                raise tuf_exc.DownloadError(f"connection lost: {err}") from err
            finally:
                response.close()

    return _SessionFetcher


def _as_verification_error(err: Exception, doing: str) -> VerificationError:
    if isinstance(err, tuf_exc.DownloadLengthMismatchError):
        return VerificationError(f"{doing}: metadata exceeds its length limit: {err}")
    if isinstance(err, tuf_exc.DownloadError):
        cause = err.__cause__ or err
        return TrustUnavailableError(f"{doing}: {cause}")
    name = type(err).__name__
    return VerificationError(f"{doing}: {name}: {err}")


class TrustClient:
    """Verified view of the fleet server's TUF repository.

    ``metadata_dir`` caches verified metadata between runs; it is what makes
    rollback protection survive a restart. ``pinned_root`` is the root.json
    installed at provisioning; None trusts the root already cached there.
    """

    def __init__(
        self,
        metadata_dir: Path,
        base_url: str,
        pinned_root: bytes | None,
        session: requests.Session | None = None,
        limits: TrustLimits | None = None,
    ) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.base_url = base_url.rstrip("/")
        self._pinned_root = pinned_root
        self._session = session or requests.Session()
        self._limits = limits or TrustLimits()
        self._updater: Updater | None = None
        self.bytes_fetched = 0  # metadata bytes received, since this client was made

    def _count(self, n: int) -> None:
        self.bytes_fetched += n

    @property
    def metadata_url(self) -> str:
        return self.base_url + TUF_METADATA_PREFIX

    @property
    def targets_url(self) -> str:
        return self.base_url + TUF_TARGETS_PREFIX

    def _new_updater(self) -> Updater:
        from tuf.ngclient.config import UpdaterConfig  # noqa: PLC0415 - see _session_fetcher
        from tuf.ngclient.updater import Updater  # noqa: PLC0415

        limits = self._limits
        config = UpdaterConfig(
            root_max_length=limits.root_max_length,
            timestamp_max_length=limits.timestamp_max_length,
            snapshot_max_length=limits.snapshot_max_length,
            targets_max_length=limits.targets_max_length,
        )
        try:
            self.metadata_dir.mkdir(parents=True, exist_ok=True)
            # The pinned root is the trust anchor on every run; newer roots
            # cached in metadata_dir are then re-verified from it.
            return Updater(
                str(self.metadata_dir),
                self.metadata_url,
                target_base_url=self.targets_url,
                fetcher=_session_fetcher()(self._session, limits, self._count),
                config=config,
                bootstrap=self._pinned_root,
            )
        except FileNotFoundError as err:
            raise VerificationError(
                f"no pinned root and no cached root.json in {self.metadata_dir}"
            ) from err
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError, ValueError) as err:
            raise _as_verification_error(err, "pinned root is invalid") from err
        except OSError as err:
            raise VerificationError(f"cannot use metadata dir {self.metadata_dir}: {err}") from err

    def refresh(self) -> None:
        """Fetch and verify fresh top-level metadata (one Updater per refresh)."""
        updater = self._new_updater()
        try:
            updater.refresh()
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as err:
            self._updater = None
            raise _as_verification_error(err, "TUF refresh failed") from err
        except OSError as err:
            self._updater = None
            raise VerificationError(f"cannot write TUF metadata cache: {err}") from err
        self._updater = updater
        logger.debug("TUF metadata refreshed from %s", self.metadata_url)

    def target_info(self, path: str) -> TargetInfo:
        """Signed facts about ``path``; VerificationError if it is not a signed target."""
        if self._updater is None:
            self.refresh()
        assert self._updater is not None  # set by refresh(), or it raised
        try:
            target = self._updater.get_targetinfo(path)
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as err:
            raise _as_verification_error(err, f"looking up {path}") from err
        except OSError as err:
            raise VerificationError(f"cannot write TUF metadata cache: {err}") from err
        if target is None:
            raise VerificationError(f"{path} is not a signed target (unknown or revoked)")
        sha256 = target.hashes.get("sha256")
        if not isinstance(sha256, str):
            raise VerificationError(f"target {path} has no sha256 hash in its metadata")
        try:
            check_sha256(sha256)
        except ProtocolError as err:
            raise VerificationError(f"target {path} sha256 is malformed") from err
        try:
            custom = decode_custom(target.custom if target.custom is not None else {})
        except ValueError as err:
            raise VerificationError(f"target {path} custom field is malformed: {err}") from err
        if not isinstance(custom, dict):
            raise VerificationError(f"target {path} custom field is not an object")
        return TargetInfo(path=path, length=target.length, sha256=sha256, custom=custom)

    def verify_file(self, info: TargetInfo, path: Path) -> None:
        verify_file(info, path)


def file_sha256(path: Path, chunk_size: int = _HASH_CHUNK) -> tuple[int, str]:
    """Stream ``path`` and return (length, sha256 hex)."""
    digest = hashlib.sha256()
    length = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
            length += len(chunk)
    return length, digest.hexdigest()


def verify_file(info: TargetInfo, path: Path) -> None:
    """Check a local file against signed length and sha256, streaming."""
    try:
        size = Path(path).stat().st_size
        if size != info.length:
            raise VerificationError(
                f"{info.path}: file is {size} bytes, signed length is {info.length}"
            )
        _, digest = file_sha256(Path(path))
    except OSError as err:
        raise VerificationError(f"{info.path}: cannot read {path}: {err}") from err
    if digest != info.sha256:
        raise VerificationError(f"{info.path}: sha256 {digest} does not match signed {info.sha256}")
