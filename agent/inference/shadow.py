"""Shadow evaluation: a rollout's candidate beside the serving model, on the same frames.

The serving model keeps answering; on 1 frame in ``every_n`` the candidate runs
on that frame too, if a CPU budget allows. Each telemetry window reports how
often the two top-1 classes agreed, overall and as a sparse confusion matrix
(rows: serving class, columns: candidate class, in the serving model's label
space), and both models' invoke latency over the frames they both ran.

The budget is a token bucket of CPU nanoseconds that fills at ``cpu_budget``
ns per wall-clock ns: a due frame runs only while the bucket is not in debt,
so over any stretch the candidate's time stays within ``cpu_budget`` of the
wall time, give or take one run and the bucket's burst. A due frame over
budget is skipped and counted, so the server can tell "slow board" from
"few frames".

A candidate that fails (any exception: a broken model must never reach the
serving model's loop) stops shadowing; its error goes out in the next window's
block, once. Latency recorders are injected (the worker passes the telemetry
package's histogram), since this public package must not import the daemon's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent.inference.classifier import InferenceEngine
from agent.inference.preprocess import Preprocessor
from agent.inference.runtime import Model
from agent.protocol.api import ShadowTarget

log = logging.getLogger(__name__)

BURST_S = 1.0  # the bucket holds one second's worth of budget: the first due frame runs


class Latencies(Protocol):
    """What the runner needs of a latency recorder (``LatencyHistogram`` fits)."""

    count: int

    def record(self, ns: float) -> None: ...

    def percentile(self, q: float) -> float | None: ...

    @property
    def max(self) -> float | None: ...

    @property
    def mean(self) -> float | None: ...

    def reset(self) -> None: ...


def _ms(ns: float | None) -> float:
    # 0.0 when nothing was shadowed: the contract's latency fields are numbers, and
    # ``shadowed`` says how many frames they cover.
    return 0.0 if ns is None else round(ns / 1e6, 3)


class ShadowRunner:
    """One candidate, its frame schedule, its budget and one window's counters.

    Driven from the inference thread only (``observe``, ``window_block``); the
    worker builds it elsewhere and hands it over under its lock. ``engine`` is
    None for a candidate that never loaded: the runner then only carries the
    error to the next window.
    """

    def __init__(
        self,
        target: ShadowTarget,
        engine: InferenceEngine | None,
        labels: Sequence[str],
        latencies: Callable[[], Latencies],
        *,
        error: str | None = None,
        clock: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        if engine is None and error is None:
            raise ValueError("a shadow runner without a candidate needs the error why")
        self.target = target
        self.engine = engine
        self.labels = tuple(labels)
        self.error = error
        self._clock = clock
        self._candidate = latencies()
        self._serving = latencies()
        self._until_due = target.every_n
        self._burst_ns = target.cpu_budget * BURST_S * 1e9
        self._credit_ns = self._burst_ns
        self._filled_at = clock()
        self._reset()

    def _reset(self) -> None:
        self.frames = 0
        self.shadowed = 0
        self.skipped = 0
        self.agreed = 0
        self._pairs: dict[tuple[int, int], int] = {}
        self._candidate.reset()
        self._serving.reset()

    @property
    def stopped(self) -> bool:
        """The candidate failed: it runs no more frames; drop it after its window block."""
        return self.error is not None

    def observe(
        self, frame: npt.NDArray[np.uint8], serving_index: int, serving_invoke_ns: int
    ) -> None:
        """One frame the serving model just ran; run the candidate on it if due and in budget."""
        if self.error is not None:
            return
        self.frames += 1
        self._until_due -= 1
        if self._until_due:
            return
        self._until_due = self.target.every_n
        now = self._clock()
        credit = self._credit_ns + (now - self._filled_at) * self.target.cpu_budget
        self._credit_ns = min(credit, self._burst_ns)
        self._filled_at = now
        if self._credit_ns < 0:
            self.skipped += 1
            return
        engine = self.engine
        assert engine is not None  # no engine means an error, handled above
        try:
            result = engine.run(frame)
        except Exception as err:  # whatever breaks here, the serving model goes on
            self.stop(f"candidate inference failed: {err}")
            return
        # Charge the whole run (pixels to class), not only the invoke: it is CPU the
        # serving model's frames do not get.
        self._credit_ns -= result.total_ns
        candidate_index = result.class_index
        if candidate_index >= len(self.labels):  # class counts are checked at load; be sure
            self.stop(f"candidate class {candidate_index} is outside the serving labels")
            return
        self.shadowed += 1
        if candidate_index == serving_index:
            self.agreed += 1
        key = (serving_index, candidate_index)
        self._pairs[key] = self._pairs.get(key, 0) + 1
        self._candidate.record(result.invoke_ns)
        self._serving.record(serving_invoke_ns)

    def stop(self, error: str) -> None:
        """Stop shadowing for good; the error goes out with the next window."""
        if self.error is None:
            log.error("shadow candidate %s@%s stopped: %s",
                      self.target.name, self.target.release, error)  # fmt: skip
            self.error = error
        self.close()

    def window_block(self, power_mean_mw: float | None, idle_mw: float) -> dict[str, Any]:
        """This window's ``shadow`` block of the results message; counters start again."""
        candidate, serving = self._candidate, self._serving
        mean_ns = candidate.mean
        # An estimate: the window's mean power above idle, times the candidate's mean
        # invoke time. As in the telemetry window's mJ per inference (above idle), the
        # draw is not measured per model, and power below idle counts as zero.
        candidate_mj = (
            None
            if power_mean_mw is None or mean_ns is None
            else round(max(0.0, power_mean_mw - idle_mw) * mean_ns / 1e9, 4)
        )
        block: dict[str, Any] = {
            "rollout_id": self.target.rollout_id,
            "name": self.target.name,
            "release": self.target.release,
            "frames": self.frames,
            "shadowed": self.shadowed,
            "skipped": self.skipped,
            "agreed": self.agreed,
            "pairs": [[s, c, n] for (s, c), n in sorted(self._pairs.items())],
            "labels": list(self.labels),
            "candidate_latency_ms": {
                "p50": _ms(candidate.percentile(50.0)),
                "p95": _ms(candidate.percentile(95.0)),
                "max": _ms(candidate.max),
            },
            "serving_latency_ms": {
                "p50": _ms(serving.percentile(50.0)),
                "p95": _ms(serving.percentile(95.0)),
            },
            "candidate_mj": candidate_mj,
            "error": self.error,
        }
        self._reset()
        return block

    def close(self) -> None:
        if self.engine is not None:
            self.engine.model.close()
            self.engine = None


def load_candidate(
    load: Callable[[Path], Model],
    preprocessor: Callable[[Model, dict[str, Any]], Preprocessor],
    path: Path,
    manifest: dict[str, Any],
) -> tuple[InferenceEngine | None, str | None]:
    """The candidate's engine, warmed up, with its own manifest's input contract; or why not.

    Runs on the caller's thread, before the engine reaches the inference thread.
    Any failure is the candidate's, so every exception becomes an error string.
    """
    try:
        model = load(path)
    except Exception as err:  # a candidate that does not load must not stop the caller
        return None, f"candidate does not load: {err}"
    try:
        engine = InferenceEngine(model, preprocessor(model, manifest), manifest.get("labels") or ())
        # One invoke on a blank frame, so the first shadowed frame is not an allocation.
        shape = model.input.shape
        engine.run(np.zeros((shape[1], shape[2], 3), np.uint8))
        engine.reset_counts()
    except Exception as err:  # as above: the error is reported, nothing else happens
        model.close()
        return None, f"candidate does not run: {err}"
    return engine, None


def new_runner(
    target: ShadowTarget,
    engine: InferenceEngine | None,
    error: str | None,
    serving_labels: Sequence[str] | None,
    latencies: Callable[[], Latencies],
) -> ShadowRunner:
    """A runner for a loaded candidate, or one that only reports why it cannot run.

    Both top-1 indices must live in one label space: a candidate with another
    class count is refused (and closed). ``serving_labels`` is None without a
    serving model.
    """
    if serving_labels is None:
        error = error or f"no serving model to shadow {target.name}@{target.release} against"
        serving_labels = ()
    elif engine is not None and error is None and len(engine.labels) != len(serving_labels):
        error = (
            f"candidate has {len(engine.labels)} output classes, "
            f"the serving model {len(serving_labels)}"
        )
    if error is not None and engine is not None:
        engine.model.close()
        engine = None
    return ShadowRunner(target, engine, serving_labels, latencies, error=error)
