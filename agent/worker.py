"""The inference thread: frames in, results and telemetry windows out.

The model is swapped in by the updater (from another thread) under a lock;
the interpreter itself is only ever driven from this thread. Each swap starts
a new generation so the health check counts only the new model's frames.

The per-frame path (``_step``) is kept to the frame, the engine and two
histogram records: no allocation of our own, no IO, no waking of other
threads unless one is waiting. Everything else happens once per window.

The frame source is opened with the first model and kept across model swaps:
a camera stream must not reconnect on every update. A frame is taken outside
the lock, since a dead camera may block for up to its read timeout; camera
errors are the camera's, reported through ``on_camera`` and the telemetry
window's ``camera`` block, and never count against the model.
Power and thermal come from an optional sampler whose window is cut at the
same instant as the latency window, so energy per inference matches the
inferences it is divided by.

Frames are turned into input tensors by the release's signed input contract;
a release published before contracts existed gets the old behaviour
(bilinear to the model size, values in ``legacy_range``) and one warning.

A rollout's shadow candidate (``set_shadow``, ``agent.inference.shadow``) sees the
serving model's frames after their results; a serving model swap ends it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.common.errors import AgentError, ConfigError, FrameSourceError, ModelError
from agent.protocol.api import ShadowTarget
from agent.protocol.input_contract import InputContract
from agent.telemetry.histogram import LatencyHistogram
from agent.telemetry.sampler import PowerWindow
from agent.telemetry.window import TelemetryWindow, camera_fields
from agent.update.smoke import RuntimeChoice

if TYPE_CHECKING:  # numpy and the runtime load with the first model, not at start-up
    import numpy as np
    import numpy.typing as npt

    from agent.inference.capture import CaptureOptions
    from agent.inference.classifier import InferenceEngine, Result
    from agent.inference.preprocess import Preprocessor
    from agent.inference.runtime import Model
    from agent.inference.shadow import ShadowRunner
    from agent.inference.sources import FrameSource, SourceStats

log = logging.getLogger(__name__)

Publish = Callable[[str, dict[str, Any]], None]


class PowerWindows(Protocol):
    """Anything that hands out consecutive power windows (``PowerSampler``)."""

    def window(self) -> PowerWindow: ...


@dataclass(frozen=True)
class WorkerLimits:
    error_backoff_s: float = 1.0  # pause after a failed frame, so a broken model cannot spin
    idle_wait_s: float = 0.5  # how long the thread sleeps between checks without a model
    join_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.error_backoff_s < 0 or self.idle_wait_s <= 0 or self.join_timeout_s <= 0:
            raise ConfigError(f"invalid worker limits: {self}")


@dataclass
class _Active:
    engine: InferenceEngine
    manifest: dict[str, Any]
    slot: str
    generation: int


CameraReport = Callable[[str, str | None], None]  # (state, error or None), on transitions


class InferenceWorker:
    def __init__(
        self,
        choice: RuntimeChoice,
        frames: str,
        publish: Publish,
        *,
        window_s: float,
        top_k: int = 3,
        max_fps: float = 0.0,
        warmup: int = 5,
        extra_telemetry: Callable[[], dict[str, Any]] | None = None,
        power: PowerWindows | None = None,
        idle_mw: float = 0.0,
        limits: WorkerLimits | None = None,
        legacy_range: tuple[float, float] = (0.0, 1.0),
        capture: Callable[[], CaptureOptions] | None = None,
        on_camera: CameraReport | None = None,
    ) -> None:
        if window_s <= 0 or max_fps < 0 or warmup < 0 or idle_mw < 0:
            raise ConfigError("worker needs window_s > 0 and max_fps, warmup, idle_mw >= 0")
        self.choice = choice
        self.frames = frames
        self.publish = publish
        self.window_s = window_s
        self.top_k = top_k
        self.min_period = 1.0 / max_fps if max_fps > 0 else 0.0
        self.warmup = warmup
        self.extra_telemetry = extra_telemetry
        self.power = power
        self.idle_mw = idle_mw
        self.limits = limits or WorkerLimits()
        self.legacy_range = legacy_range
        self.capture = capture
        self.on_camera = on_camera
        self._source: FrameSource | None = None
        self._camera_error: str | None = None
        self._camera_before: SourceStats | None = None  # at the last window, for deltas
        self._lock = threading.Condition()
        self._active: _Active | None = None
        self._generation = 0
        self._gen_ok = 0
        self._gen_error: str | None = None
        self._waiters = 0  # threads in wait_healthy; the hot path notifies only if > 0
        self._last_result: Result | None = None  # its top_k is ranked once per window
        self._shadow: ShadowRunner | None = None  # a rollout's candidate, on some frames
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.window = TelemetryWindow(warmup=warmup)
        self.total_inferences = 0
        self.windows_published = 0
        self.flush_cpu_s = 0.0  # thread CPU time spent building and publishing windows

    # -- called from the updater / main thread -------------------------------
    def swap(self, model_path: Path | None, manifest: dict[str, Any] | None) -> None:
        """Replace the running model (None stops inference until the next swap).

        The new model is loaded before the lock is taken, so a model that fails
        to load raises here and the old one keeps running.
        """
        new: _Active | None = None
        if model_path is not None and manifest is not None:
            from agent.inference.classifier import InferenceEngine  # noqa: PLC0415
            from agent.inference.sources import open_source  # noqa: PLC0415 - numpy only with a model

            model = self.choice.load(model_path)
            try:
                preprocess = self._preprocessor(model, manifest)
                engine = InferenceEngine(
                    model, preprocess, manifest.get("labels") or (), top_k=self.top_k
                )
                if self._source is None:
                    self._source = open_source(
                        self.frames,
                        model.input.shape,
                        capture=self.capture() if self.capture is not None else None,
                    )
            except AgentError:
                model.close()
                raise
            new = _Active(engine, manifest, model_path.parent.name, self._generation + 1)
        with self._lock:
            old, shadow = self._active, self._shadow
            self._generation += 1
            self._active, self._shadow = new, None  # a candidate is judged against one model
            self._gen_ok, self._gen_error = 0, None
            self._last_result = None
            self.window.restart(manifest)
            if self.power is not None:
                self.power.window()  # drop the power of the old model's partial window
            self._lock.notify_all()
        if old is not None:
            old.engine.model.close()
        if shadow is not None:
            shadow.close()

    def set_shadow(self, model_path: Path, manifest: dict[str, Any], target: ShadowTarget) -> None:
        """Run ``target`` beside the serving model, in place of any candidate before it.

        Loaded outside the lock, like ``swap``. A candidate that does not load or has
        another class count raises ModelError; the next window's shadow block says so too.
        """
        from agent.inference.shadow import load_candidate, new_runner  # noqa: PLC0415

        engine, error = load_candidate(self.choice.load, self._preprocessor, model_path, manifest)
        with self._lock:
            labels = self._active.engine.labels if self._active is not None else None
            runner = new_runner(target, engine, error, labels, LatencyHistogram)
            old, self._shadow = self._shadow, runner
        if old is not None:
            old.close()
        if runner.error is not None:
            raise ModelError(runner.error)

    def clear_shadow(self) -> None:
        """Stop shadowing; this window's partial shadow counts are dropped."""
        with self._lock:
            old, self._shadow = self._shadow, None
        if old is not None:
            old.close()

    @property
    def generation(self) -> int:  # counts model swaps: each is a new baseline for a candidate
        return self._generation

    def _preprocessor(self, model: Model, manifest: dict[str, Any]) -> Preprocessor:
        from agent.inference.preprocess import preprocessor_for  # noqa: PLC0415

        raw = manifest.get("input")
        contract = None if raw is None else InputContract.from_dict(raw)
        if contract is None:
            log.warning(
                "release %s@%s carries no input contract; frames are resized bilinearly to "
                "the model's size and mapped to %s as before contracts existed",
                manifest.get("name"), manifest.get("release"), list(self.legacy_range),
            )  # fmt: skip
        return preprocessor_for(contract, model.input, self.legacy_range)

    def wait_healthy(self, inferences: int, timeout_s: float) -> str | None:
        """Block until the current model ran ``inferences`` frames cleanly.

        None when healthy, else why not: the first inference error, or too few
        inferences before the timeout (or with no model at all).
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._waiters += 1
            try:
                while self._gen_error is None and self._gen_ok < inferences:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._active is None:
                        camera = f" (camera: {self._camera_error})" if self._camera_error else ""
                        return (
                            f"only {self._gen_ok}/{inferences} inferences in {timeout_s:.0f}s"
                            + camera
                        )
                    self._lock.wait(timeout=min(left, 0.5))
                return self._gen_error
            finally:
                self._waiters -= 1

    def start(self) -> None:
        if self.alive:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread:
            self._thread.join(timeout=self.limits.join_timeout_s)
        self.swap(None, None)
        if self._source is not None:
            self._source.close()
            self._source = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop ----------------------------------------------------------------
    def _loop(self) -> None:
        lock, stop, step = self._lock, self._stop, self._step
        monotonic = time.monotonic
        next_window = monotonic() + self.window_s
        due = monotonic()  # when the frame just run was due, for max_fps pacing
        while not stop.is_set():
            with lock:
                active = self._active
                if active is None:
                    lock.wait(timeout=self.limits.idle_wait_s)
            ok = True
            if active is not None:
                frame = self._frame()
                if frame is None:
                    ok = False
                else:
                    with lock:
                        # A swap meanwhile: the frame goes to the new model next round.
                        ok = step(active, frame) if self._active is active else True
            now = monotonic()
            if now >= next_window:
                next_window = now + self.window_s
                self._flush_window()
            if not ok:
                stop.wait(self.limits.error_backoff_s)
            elif self.min_period:
                # Pace to a schedule, so max_fps is the rate and not 1/(period + work);
                # after falling behind, start again from now instead of bursting.
                due = max(due + self.min_period, now)
                stop.wait(due - now)

    def _frame(self) -> npt.NDArray[np.uint8] | None:
        """The next frame, or None while the camera is in error (reported on transitions)."""
        source = self._source
        if source is None:
            return None
        try:
            frame = next(source)
        except (FrameSourceError, StopIteration) as err:
            text = str(err) or f"frame source {self.frames} ended"
            if self._camera_error is None:
                log.error("camera error: %s", text)
                if self.on_camera is not None:
                    self.on_camera("error", text)
            self._camera_error = text
            return None
        if self._camera_error is not None:
            log.info("camera recovered after: %s", self._camera_error)
            self._camera_error = None
            if self.on_camera is not None:
                self.on_camera("ok", None)
        return frame

    def _step(self, active: _Active, frame: npt.NDArray[np.uint8]) -> bool:
        """One frame; called with the lock held. False when it failed."""
        try:
            result = active.engine.run(frame)
        except AgentError as err:
            self.window.error()
            if self._gen_error is None:  # log once per model; the window counts the rest
                log.error("inference failed: %s", err)
            self._gen_error = f"inference failed: {err}"
            self._lock.notify_all()
            return False
        # End to end is from the frame's capture to its result.
        captured = self._source.captured_ns if self._source is not None else 0
        self.window.record(result.invoke_ns, time.perf_counter_ns() - captured)
        self.total_inferences += 1
        self._gen_ok += 1
        if self._waiters:
            self._lock.notify_all()
        self._last_result = result
        shadow = self._shadow
        if shadow is not None:
            shadow.observe(frame, result.class_index, result.invoke_ns)
        return True

    def _results(self, active: _Active, power_mw: float | None) -> dict[str, Any]:
        """Class counts for one window: one results message per window, whatever the fps."""
        top_k = self._last_result.top_k if self._last_result is not None else ()
        results: dict[str, Any] = {
            "release": active.manifest.get("release"),
            "model": active.manifest.get("name"),
            "slot": active.slot,
            "class_counts": active.engine.class_counts(),
            "confidence_hist": active.engine.confidence_histogram(),
            "last_top_k": [[label, round(score, 4)] for label, score in top_k],
        }
        if self._shadow is not None:
            results["shadow"] = self._shadow.window_block(power_mw, self.idle_mw)
            if self._shadow.stopped:  # its error is out: no more shadowing until a new target
                self._shadow = None
        return results

    def _camera_window(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The source's counters over this window (camera fps, drops, errors, reconnects)."""
        source = self._source
        if source is None:
            return None
        stats = source.stats()
        fields = camera_fields(stats.as_dict(), self._camera_before, payload.get("fps"))
        self._camera_before = stats
        if self._camera_error is not None:
            fields["error"] = self._camera_error
        return fields

    def _flush_window(self) -> None:
        started = time.thread_time()
        with self._lock:
            # Both windows are cut under one lock, so they cover the same frames.
            power = self.power.window() if self.power is not None else None
            slot = self._active.slot if self._active else None
            payload = self.window.snapshot(slot, power, self.idle_mw)
            results = None
            if self._active is not None and self._active.engine.inference_count:
                results = self._results(self._active, power.mean_mw if power else None)
                self._active.engine.reset_counts()
        if results is not None:
            self.publish("results", results)
        if payload is not None:
            payload["camera"] = self._camera_window(payload)
            if self.extra_telemetry is not None:
                payload.update(self.extra_telemetry())
            self.publish("telemetry", payload)
            self.windows_published += 1
        self.flush_cpu_s += time.thread_time() - started
