"""The background delta builder: claims queued jobs, makes each patch in a child process.

Making a delta is CPU- and memory-heavy (minutes and hundreds of MB for a large
model), so it runs in a fresh interpreter (``spawn``): the server's threads keep
the GIL, a crash or OOM kill fails one job instead of the server, and memory
goes back to the system when the child exits. ``concurrency`` threads each
build one job at a time (default 1: a 2-core box also serves the fleet).

The child reports progress (tensors or bytes done over total, from
``agent.delta.make_delta``) over a pipe; the thread writes it to the job row
at most every ``progress_every_s``. A patch not smaller than the full file is
``skipped``; any error is ``failed`` with its reason; neither is retried.

One job builds every format version a device may need: the ANS-coded version 2
patch first when the builder has constriction; when ANS won nowhere that patch
is version 1 already, else a version 1 patch (``DeltaConfig(ans=False)``) is
built too, for agents without constriction (aarch64) and older ones.
``versions_to_sign`` picks what is signed; the job row keeps the version 1
patch's size and method (what every device can use) and names a signed
version 2 patch's size in ``reason``.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.protocol.manifest import model_target_path
from server.db.tables import Database
from server.errors import ServerError
from server.publish import delta_jobs
from server.publish.delta_jobs import DONE, FAILED, SKIPPED, ClaimedJob, JobLease
from server.publish.deltas import sign_delta, versions_to_sign
from server.publish.tuf_repo import TufRepository

log = logging.getLogger(__name__)

__all__ = ["BuildOutcome", "DeltaWorker"]


@dataclass(frozen=True)
class BuildOutcome:
    job_id: int
    state: str  # done, skipped or failed
    reason: str | None = None
    delta_bytes: int | None = None
    method: str | None = None
    signed: tuple[str, ...] = ()  # the delta target paths it signed


def patch_file(out_dir: Path, version: int) -> Path:
    """Where the child writes the format ``version`` patch."""
    return out_dir / f"patch.v{version}.efd"


def _make_in_child(
    old: str, new: str, out_dir: str, conn: multiprocessing.connection.Connection
) -> None:
    """The child's entry point: make the patches, send progress and, per version, the result."""
    # Only the child needs the codec; whether ANS is available is this interpreter's fact.
    from agent.delta import DeltaConfig, ans_available, make_delta, read_header  # noqa: PLC0415

    last = [-1.0]
    span = [0.0, 1.0]  # the share of the job the current build covers

    def progress(done: int, total: int) -> None:
        fraction = span[0] + span[1] * (done / total if total else 0.0)
        if fraction - last[0] >= 0.01 or done == total:  # at most ~100 messages per build
            last[0] = fraction
            conn.send(("progress", fraction))

    built: list[tuple[int, int, str]] = []  # (format version, bytes, method)
    try:
        if ans_available():
            span[:] = [0.0, 0.5]
            out = patch_file(Path(out_dir), 2)
            info = make_delta(Path(old), Path(new), out, progress)
            version = read_header(out).version
            if version != 2:  # ANS won nowhere: this is the version 1 patch already
                out.replace(patch_file(Path(out_dir), version))
            built.append((version, info.patch_size, info.method))
            span[:] = [0.5, 0.5]
        if not any(v == 1 for v, _, _ in built):
            out = patch_file(Path(out_dir), 1)
            info = make_delta(Path(old), Path(new), out, progress, DeltaConfig(ans=False))
            built.append((1, info.patch_size, info.method))
        conn.send(("done", built))
    except Exception as err:  # every failure is this job's reason
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


class DeltaWorker:
    """Builds queued delta jobs of one database into one TUF repository."""

    def __init__(
        self,
        db: Database,
        repo: TufRepository,
        concurrency: int = 1,
        poll_s: float = 1.0,
        progress_every_s: float = 1.0,
    ) -> None:
        self.db = db
        self.repo = repo
        self.concurrency = max(1, concurrency)
        self.poll_s = poll_s
        self.progress_every_s = progress_every_s
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._ctx = multiprocessing.get_context("spawn")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._building: dict[int, Any] = {}  # job id -> its child process

    # --- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        delta_jobs.requeue_orphans(self.db.engine)
        for i in range(self.concurrency):
            thread = threading.Thread(target=self._loop, name=f"delta-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("delta worker %s started (%d at a time)", self.name, self.concurrency)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop building; jobs cut short go back to the queue for the next start."""
        self._stop.set()
        with self._lock:
            children = list(self._building.values())
        for child in children:
            if child.is_alive():
                child.terminate()
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        self._threads = []

    def _loop(self) -> None:
        lease = JobLease(self.db.engine) if self.db.dialect == "postgresql" else None
        try:
            while not self._stop.is_set():
                try:
                    outcome = self.run_once(lease)
                    if outcome is None and lease is not None:
                        delta_jobs.requeue_orphans(self.db.engine)  # a replica that died
                except Exception:  # a database outage must not end the worker
                    log.exception("delta worker %s: claiming a job failed", self.name)
                    outcome = None
                if outcome is None and self._stop.wait(self.poll_s):
                    break
        finally:
            if lease is not None:
                lease.close()

    # --- one job -------------------------------------------------------------------
    def run_once(self, lease: JobLease | None = None) -> BuildOutcome | None:
        """Claim and build one job; None when the queue is empty (or we are stopping)."""
        own_lease = lease is None and self.db.dialect == "postgresql"
        if own_lease:
            lease = JobLease(self.db.engine)
        try:
            with self.db.session() as s:
                job = delta_jobs.claim_next(s, self.name, lease)
            if job is None:
                return None
            try:
                return self._run(job)
            finally:
                if lease is not None:
                    lease.release(job.id)
        finally:
            if own_lease and lease is not None:
                lease.close()

    def _run(self, job: ClaimedJob) -> BuildOutcome | None:
        try:
            outcome = self._build(job)
        except _StoppedError:
            with self.db.session() as s:
                delta_jobs.requeue(s, [job.id])
            log.info("delta job %d cut short by shutdown; queued again", job.id)
            return None
        with self.db.session() as s:
            delta_jobs.finish(
                s,
                job.id,
                outcome.state,
                reason=outcome.reason,
                delta_bytes=outcome.delta_bytes,
                method=outcome.method,
            )
        return outcome

    def _build(self, job: ClaimedJob) -> BuildOutcome:
        what = f"{job.name}@{job.release} {job.variant} from release {job.base_release}"
        started = time.monotonic()
        try:
            target = model_target_path(job.name, job.release, job.variant)
            base = model_target_path(job.name, job.base_release, job.variant)
            self.repo.target_info(target)  # reloads metadata other processes signed
            new_file, old_file = self.repo.target_file(target), self.repo.target_file(base)
            with tempfile.TemporaryDirectory(prefix="edgefleet-delta-") as tmp:
                built = self._make(job.id, old_file, new_file, Path(tmp))
                sizes = {v: size for v, (size, _) in built.items()}
                chosen = versions_to_sign(sizes, job.target_bytes)
                size, method = built[chosen[0] if chosen else 1]
                if not chosen:
                    reason = (f"the patch ({size} bytes, {method}) is not smaller than "
                              f"the file ({job.target_bytes} bytes)")  # fmt: skip
                    log.info("delta %s skipped: %s", what, reason)
                    return BuildOutcome(job.id, SKIPPED, reason, size, method)
                signed = sign_delta(
                    self.repo,
                    job.name,
                    job.release,
                    job.variant,
                    base_sha256=job.base_sha256,
                    patches={v: patch_file(Path(tmp), v) for v in chosen},
                )
        except _StoppedError:
            raise
        except (ServerError, OSError, _ChildError) as err:
            log.error("delta %s failed: %s", what, err)
            return BuildOutcome(job.id, FAILED, str(err) or type(err).__name__)
        except Exception as err:  # a bug must fail this job, not leave it building forever
            log.exception("delta %s failed", what)
            return BuildOutcome(job.id, FAILED, f"{type(err).__name__}: {err}")
        note = None
        if 2 in chosen:
            note = f"format version 2 (ANS) signed too: {built[2][0]} bytes ({built[2][1]})"
            if 1 not in chosen:
                method = f"{method} (v2 only)"
        log.info("delta %s: %d bytes (%.1f%% of %d, %s) in %.1f s%s", what, size,
                 100.0 * size / max(job.target_bytes, 1), job.target_bytes, method,
                 time.monotonic() - started, f"; {note}" if note else "")  # fmt: skip
        return BuildOutcome(job.id, DONE, note, size, method, tuple(signed))

    def _make(self, job_id: int, old: Path, new: Path, out_dir: Path) -> dict[int, tuple[int, str]]:
        """Run the builds in a child process; format version -> (patch size, method)."""
        receive, send = self._ctx.Pipe(duplex=False)
        child = self._ctx.Process(
            target=_make_in_child, args=(str(old), str(new), str(out_dir), send),
            name=f"edgefleet-delta-{job_id}", daemon=True,
        )  # fmt: skip
        try:
            with self._lock:  # stop() terminates what is registered here
                if self._stop.is_set():
                    raise _StoppedError
                self._building[job_id] = child
                child.start()
            send.close()  # the child's end: EOF here once the child is gone
            return self._follow(job_id, child, receive)
        finally:
            send.close()
            receive.close()
            with self._lock:
                started = self._building.pop(job_id, None) is not None
            if started:
                child.join(timeout=5)
                if child.is_alive():
                    child.kill()
                    child.join()

    def _follow(
        self, job_id: int, child: Any, receive: multiprocessing.connection.Connection
    ) -> dict[int, tuple[int, str]]:
        reported = 0.0
        while True:
            try:
                message = receive.recv() if receive.poll(0.5) else None
            except EOFError:
                if self._stop.is_set():
                    raise _StoppedError from None
                child.join(timeout=5)
                raise _ChildError(f"the delta builder exited with code {child.exitcode}") from None
            if message is None:
                if self._stop.is_set():
                    raise _StoppedError
                continue
            if message[0] == "done":
                return {int(v): (int(size), str(method)) for v, size, method in message[1]}
            if message[0] == "error":
                raise _ChildError(str(message[1]))
            now = time.monotonic()
            if now - reported >= self.progress_every_s:
                reported = now
                with self.db.session() as s:
                    delta_jobs.set_progress(s, job_id, float(message[1]))


class _ChildError(Exception):
    """make_delta failed in the child, or the child died (its message is the reason)."""


class _StoppedError(Exception):
    """The server is stopping: the job goes back to the queue."""
