"""Bounded, resumable HTTP download of one target into ``dest``.

The bytes land in ``dest.part``; an interrupted download resumes with
``Range: bytes=N-``. Nothing past ``max_length`` (the signed TUF length) is
ever accepted, retries are bounded with exponential backoff, and a 4xx stops
at once: a device must never loop on a download forever
(rauc-hawkbit-updater #158). ``dest`` appears only once the sha256 matches.

The whole call, retries and backoff included, has one deadline that scales
with the signed length: ``timeout_s + max_length / min_rate_bps``
(``agent.transport.deadline.download_budget``). A dripping or stalled server
ends it with ``DownloadDeadlineError``; a slow but honest link above the floor
rate finishes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import requests
import urllib3

from agent.common.atomic import commit_file
from agent.common.errors import UpdateError, VerificationError
from agent.protocol.api import TUF_TARGETS_PREFIX
from agent.protocol.manifest import check_sha256
from agent.transport.deadline import (
    DEFAULT_MIN_RATE_BPS,
    Deadline,
    DeadlineExceededError,
    download_budget,
    iter_body,
    open_stream,
)

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
"""Called as ``progress(bytes_on_disk, max_length)`` after each chunk."""

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_RETRYABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


@dataclass(frozen=True)
class DownloadLimits:
    retries: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    timeout_s: float = 30.0
    chunk_size: int = 64 * 1024
    min_rate_bps: int = DEFAULT_MIN_RATE_BPS  # floor rate the overall deadline assumes

    def budget(self, max_length: int) -> float:
        """Seconds one download() of at most ``max_length`` bytes may take, retries included."""
        return download_budget(self.timeout_s, max_length, self.min_rate_bps)

    def backoff(self, failures: int) -> float:
        """Delay before retry number ``failures`` (1-based): base * 2^(n-1), capped."""
        return float(min(self.backoff_max_s, self.backoff_base_s * 2 ** (failures - 1)))


@dataclass(frozen=True)
class DownloadResult:
    bytes_transferred: int
    resumed: bool
    length: int
    sha256: str


class DownloadError(UpdateError):
    """A download failed for good: HTTP 4xx, too long, or retries exhausted."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__("download", reason)
        self.status = status


class DownloadDeadlineError(DownloadError):
    """The download, retries included, ran past its length-scaled deadline."""

    def __init__(self, reason: str, budget_s: float) -> None:
        super().__init__(reason)
        self.budget_s = budget_s


class _TransientError(Exception):
    """A transient failure: connection lost, timeout, 5xx."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class _Job:
    session: requests.Session
    url: str
    part: Path
    max_length: int
    limits: DownloadLimits
    progress: ProgressFn | None
    deadline: Deadline
    transferred: int = 0
    resumed: bool = False


def target_url(base_url: str, target_path: str, sha256: str) -> str:
    """URL of a target in a consistent-snapshot repository: ``<dir>/<sha256>.<name>``."""
    dirname, sep, basename = target_path.rpartition("/")
    name = f"{dirname}{sep}{check_sha256(sha256)}.{basename}"
    return base_url.rstrip("/") + TUF_TARGETS_PREFIX + quote(name, safe="/")


def _hash_existing(part: Path) -> tuple[int, hashlib._Hash]:
    digest = hashlib.sha256()
    size = 0
    with open(part, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return size, digest


def _resume_point(part: Path, max_length: int) -> tuple[int, hashlib._Hash]:
    if part.exists():
        size, digest = _hash_existing(part)
        if size <= max_length:
            return size, digest
        logger.warning("discarding %s: %d bytes exceed max length %d", part, size, max_length)
        part.unlink()
    return 0, hashlib.sha256()


def _check_answer(resp: requests.Response, offset: int, max_length: int, part: Path) -> int:
    """Validate status and headers; return the offset the body starts at."""
    status = resp.status_code
    if status == 416 and offset:
        part.unlink(missing_ok=True)
        raise _TransientError("server refused the resume range; restarting from zero", status)
    if status >= 500:
        raise _TransientError(f"server error HTTP {status}", status)
    if status >= 400:
        raise DownloadError(f"{resp.url} answered HTTP {status}", status)
    if status == 200:
        start = 0  # the server ignored Range: start over
    elif status == 206 and offset:
        match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != offset:
            part.unlink(missing_ok=True)
            raise _TransientError(
                f"bad Content-Range {resp.headers.get('Content-Range')!r}", status
            )
        start = offset
    else:
        raise DownloadError(f"{resp.url} answered unexpected HTTP {status}", status)
    declared = resp.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and start + int(declared) > max_length:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"server announces {start + int(declared)} bytes, more than the allowed {max_length}"
        )
    return start


def _body(job: _Job, resp: requests.Response) -> Iterator[bytes]:
    """Yield the body as it arrives, within the deadline.

    ``iter_content`` reads full chunks and loses a partial one when the
    connection drops; ``read1`` hands over every byte received, so the .part
    keeps all of it and the resume starts exactly where the data stopped.
    """
    body = iter_body(resp, job.deadline, job.limits.timeout_s, job.limits.chunk_size)
    while True:
        try:
            chunk = next(body, b"")
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise _TransientError(f"connection lost: {err}") from err
        if not chunk:
            return
        yield chunk


def _attempt(job: _Job) -> tuple[int, str, bool]:
    """One request. Returns (length, sha256, started_from_partial) once the body is in."""
    url, part, max_length, limits = job.url, job.part, job.max_length, job.limits
    offset, digest = _resume_point(part, max_length)
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with open_stream(
            job.session, "GET", url, job.deadline, limits.timeout_s, headers=headers
        ) as resp:
            start = _check_answer(resp, offset, max_length, part)
            if start == 0:
                offset, digest = 0, hashlib.sha256()
            job.resumed = start > 0  # whether the file finally kept earlier bytes
            with open(part, "ab" if start else "wb") as out:
                for chunk in _body(job, resp):
                    if offset + len(chunk) > max_length:
                        out.close()
                        part.unlink(missing_ok=True)
                        raise DownloadError(f"{url} sent more than the allowed {max_length} bytes")
                    out.write(chunk)
                    digest.update(chunk)
                    offset += len(chunk)
                    job.transferred += len(chunk)
                    if job.progress is not None:
                        job.progress(offset, max_length)
    except _RETRYABLE as err:
        raise _TransientError(f"connection failed: {err}") from err
    except requests.RequestException as err:
        raise DownloadError(f"cannot download {url}: {err}") from err
    return offset, digest.hexdigest(), start > 0


def download(
    url: str,
    dest: Path,
    max_length: int,
    expected_sha256: str | None,
    limits: DownloadLimits | None = None,
    *,
    progress: ProgressFn | None = None,
    session: requests.Session | None = None,
) -> DownloadResult:
    """Fetch ``url`` into ``dest``, resuming from ``dest.part`` when it exists.

    Raises DownloadError (HTTP 4xx, over-length, retries exhausted) or
    VerificationError (complete body with the wrong sha256; the part is deleted).
    """
    limits = limits or DownloadLimits()
    if expected_sha256 is not None:
        check_sha256(expected_sha256)
    if max_length < 0:
        raise DownloadError(f"max_length {max_length} is negative")
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(limits.budget(max_length))
    job = _Job(session or requests.Session(), url, part, max_length, limits, progress, deadline)
    if expected_sha256 is not None and part.exists():
        # A crash between the last byte and the rename leaves a complete part.
        size, digest = _resume_point(part, max_length)
        if digest.hexdigest() == expected_sha256:
            commit_file(part, dest)
            return DownloadResult(0, True, size, expected_sha256)
    failures = 0
    while True:
        try:
            length, sha256, from_partial = _attempt(job)
            if expected_sha256 is None or sha256 == expected_sha256:
                break
            part.unlink(missing_ok=True)
            if not from_partial:
                raise VerificationError(
                    f"{url}: sha256 {sha256} does not match expected {expected_sha256}"
                )
            # A stale .part from another file: retry once from zero.
            raise _TransientError("resumed file failed its sha256 check; restarting from zero")
        except DeadlineExceededError as err:
            raise DownloadDeadlineError(
                f"{url} not complete within {deadline.budget_s:.0f}s "
                f"({job.transferred} bytes received): {err}",
                deadline.budget_s,
            ) from err
        except _TransientError as err:
            failures += 1
            if failures > limits.retries:
                raise DownloadError(
                    f"giving up on {url} after {failures} attempts: {err}", err.status
                ) from err
            delay = min(limits.backoff(failures), max(0.0, deadline.remaining()))
            logger.warning(
                "download of %s failed (%s); retry %d in %.1fs", url, err, failures, delay
            )
            time.sleep(delay)
    commit_file(part, dest)
    logger.info("downloaded %s: %d bytes (%d transferred)", url, length, job.transferred)
    return DownloadResult(job.transferred, job.resumed, length, sha256)
