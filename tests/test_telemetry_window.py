"""Telemetry windows from a real InferenceWorker on the real digits models.

The worker runs LiteRT on tests/fixtures/digits_int8_r{1,2}.tflite, with a real
PowerSampler reading the Jetson Orin Nano board tree, and publishes into a
collecting callable. Waits have generous timeouts; nothing asserts a duration.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.common.errors import ConfigError, ModelError
from agent.profiles.schema import load_profiles
from agent.telemetry.sampler import PowerSampler, PowerWindow
from agent.telemetry.sensors import idle_mw, make_sampler
from agent.telemetry.thermal import ThermalSample, decode_throttled
from agent.telemetry.window import TelemetryWindow, power_fields, thermal_fields
from agent.update.smoke import RuntimeChoice
from agent.worker import InferenceWorker, WorkerLimits

FIXTURES = Path(__file__).parent / "fixtures"
LABELS = (FIXTURES / "digits_labels.txt").read_text().split()
PROFILE = load_profiles()["jetson-orin-nano"]
BOARD = Path(__file__).parent / "boards" / "jetson-orin-nano"
VDD_IN_MW = 5016 * 1232 / 1000
WARMUP = 20
TIMEOUT_S = 60.0
CHOICE = RuntimeChoice("litert", 1)
PERCENTILES = ("p50", "p90", "p95", "p99", "max")


class Sink:
    """The worker's publish callable: keeps every message, wakes waiters."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()

    def __call__(self, channel: str, payload: dict[str, Any]) -> None:
        with self._cond:
            self.messages.append((channel, payload))
            self._cond.notify_all()

    def channel(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [p for c, p in self.messages if c == name]

    def wait_for(self, name: str, count: int, **match: Any) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]]:
            return [
                p
                for c, p in self.messages
                if c == name and all(p.get(k) == v for k, v in match.items())
            ]

        with self._cond:
            if not self._cond.wait_for(lambda: len(found()) >= count, timeout=TIMEOUT_S):
                raise AssertionError(f"fewer than {count} {name} messages matching {match}")
            return found()


def model(tmp_path: Path, release: int, slot: str) -> tuple[Path, dict[str, Any]]:
    """A model in a slot directory, as the slot store lays it out."""
    path = tmp_path / slot / "model.tflite"
    path.parent.mkdir()
    shutil.copy(FIXTURES / f"digits_int8_r{release}.tflite", path)
    return path, {"name": "digits", "release": release, "variant": "int8-cpu", "labels": LABELS}


@pytest.fixture
def sampler() -> Iterator[PowerSampler]:
    with make_sampler(PROFILE, BOARD, window_s=0.3) as running:
        yield running


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def worker(sink: Sink, sampler: PowerSampler) -> Iterator[InferenceWorker]:
    w = InferenceWorker(
        CHOICE,
        "synthetic:3",
        sink,
        window_s=0.3,
        warmup=WARMUP,
        extra_telemetry=lambda: {"profile": PROFILE.name},
        power=sampler,
        idle_mw=idle_mw(PROFILE),
        limits=WorkerLimits(error_backoff_s=0.01),
    )
    w.start()
    yield w
    w.stop()


def check_latency(block: dict[str, Any] | None) -> None:
    assert block is not None
    values = [block[k] for k in PERCENTILES]
    assert values[0] > 0 and values == sorted(values)


def test_window_carries_every_field(tmp_path: Path, worker: InferenceWorker, sink: Sink) -> None:
    path, manifest = model(tmp_path, 1, "a")
    worker.swap(path, manifest)
    assert worker.wait_healthy(WARMUP + 10, TIMEOUT_S) is None
    seen = len(sink.channel("telemetry"))
    window = sink.wait_for("telemetry", seen + 2)[seen + 1]  # begun after the warm-up
    assert window["inferences"] > 0 and window["errors"] == 0
    assert window["fps"] > 0 and window["window_s"] > 0
    check_latency(window["invoke_ms"])
    check_latency(window["e2e_ms"])
    # End to end includes the invoke of the same frame: never (beyond bucket width) shorter.
    assert window["e2e_ms"]["p50"] >= window["invoke_ms"]["p50"] * 0.98
    assert window["invoke_ms"]["count"] == window["e2e_ms"]["count"] == window["inferences"]
    assert window["cpu_percent"] >= 0 and window["rss_mb"] > 10
    assert (window["model"], window["release"], window["variant"], window["slot"]) == (
        "digits",
        1,
        "int8-cpu",
        "a",
    )
    assert window["profile"] == PROFILE.name  # extra_telemetry is merged
    power = window["power"]
    assert (power["source"], power["detail"]) == ("sensor", "hwmon_ina3221 VDD_IN")
    assert power["mw"] == pytest.approx(VDD_IN_MW, abs=0.1)
    assert power["samples"] >= 1 and power["read_errors"] == 0
    assert power["idle_mw"] == PROFILE.power.idle_w * 1000
    # Energy per inference divides the power window's energy by this window's frames.
    assert power["mj_per_inference"] * window["inferences"] == pytest.approx(
        power["energy_mj"], rel=1e-3, abs=0.1
    )
    assert power["mj_per_inference_above_idle"] / power["mj_per_inference"] == pytest.approx(
        (VDD_IN_MW - power["idle_mw"]) / VDD_IN_MW, rel=1e-3
    )
    thermal = window["thermal"]
    assert thermal["max_c"] == 48.0 and thermal["zones_c"]["tj-thermal"] == 48.0
    assert thermal["throttled"] is False and thermal["flags"] == []
    assert thermal["oc_events"] == {"oc1": 0, "oc2": 0, "oc3": 27}
    assert thermal["cpu_max_freq_ratio"] == 1.0 and thermal["cpu_max_freq_khz"] > 0


def test_warmup_is_excluded_and_swap_restarts_the_window(
    tmp_path: Path, worker: InferenceWorker, sink: Sink
) -> None:
    for release, slot in ((1, "a"), (2, "b")):
        path, manifest = model(tmp_path, release, slot)
        worker.swap(path, manifest)
        assert worker.wait_healthy(WARMUP + 10, TIMEOUT_S) is None
        windows = sink.wait_for("telemetry", 3, release=release)[:3]
        assert {w["slot"] for w in windows} == {slot}
        skipped = [w["inferences"] - (w["invoke_ms"] or {"count": 0})["count"] for w in windows]
        # The first frames after each swap are left out once, in whichever window(s) they fell.
        assert sum(skipped) == WARMUP and skipped[2] == 0
    # Nothing of release 1 leaks into a window labelled release 2, and vice versa.
    releases = [w["release"] for w in sink.channel("telemetry")]
    assert releases == sorted(releases)


def test_results_count_the_classes_seen(
    tmp_path: Path, worker: InferenceWorker, sink: Sink
) -> None:
    worker.swap(*model(tmp_path, 1, "a"))
    result = sink.wait_for("results", 1)[0]
    window = sink.wait_for("telemetry", 1, release=1)[0]
    # One results message per window, counting exactly that window's frames.
    assert sum(result["class_counts"].values()) == window["inferences"] > 0
    assert set(result["class_counts"]) <= set(LABELS)
    assert len(result["last_top_k"]) == 3 and result["last_top_k"][0][0] in LABELS


def test_health_wait_without_a_model_and_after_stop(
    tmp_path: Path, worker: InferenceWorker
) -> None:
    assert worker.wait_healthy(10, timeout_s=5.0) == "only 0/10 inferences in 5s"
    worker.swap(*model(tmp_path, 1, "a"))
    assert worker.wait_healthy(10, TIMEOUT_S) is None
    before = worker.total_inferences
    worker.stop()
    assert not worker.alive
    assert worker.total_inferences >= before
    assert worker.wait_healthy(1, timeout_s=5.0) == "only 0/1 inferences in 5s"


def test_a_model_that_does_not_load_leaves_the_old_one_running(
    tmp_path: Path, worker: InferenceWorker, sink: Sink
) -> None:
    worker.swap(*model(tmp_path, 1, "a"))
    assert worker.wait_healthy(10, TIMEOUT_S) is None
    garbage = tmp_path / "b" / "model.tflite"
    garbage.parent.mkdir()
    garbage.write_bytes(b"\x00" * 4 + b"TFL3" + b"not a flatbuffer" * 8)
    with pytest.raises(ModelError):
        worker.swap(garbage, {"name": "digits", "release": 2, "labels": LABELS})
    path, manifest = model(tmp_path, 2, "c")
    with pytest.raises(ModelError, match="10 output classes but 3 labels"):
        worker.swap(path, {**manifest, "labels": ["a", "b", "c"]})
    count = len(sink.channel("telemetry"))
    later = sink.wait_for("telemetry", count + 1)[count]
    assert (later["release"], later["slot"], later["errors"]) == (1, "a", 0)
    assert later["inferences"] > 0


def test_a_source_without_frames_fails_the_health_check_as_the_cameras_fault(
    tmp_path: Path, sampler: PowerSampler, sink: Sink
) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    np.save(frames / "wrong.npy", np.zeros((5, 5, 4), dtype=np.float32))  # no RGB frame in it
    worker = InferenceWorker(
        CHOICE,
        f"dir:{frames}",
        sink,
        window_s=0.2,
        warmup=0,
        power=sampler,
        limits=WorkerLimits(error_backoff_s=0.01),
    )
    worker.start()
    try:
        worker.swap(*model(tmp_path, 1, "a"))
        problem = worker.wait_healthy(5, 2.0)
        # A source without frames is the camera's failure, named as such, not the model's.
        assert problem is not None and problem.startswith("only 0/5 inferences")
        assert "camera: " in problem and "no readable frames" in problem
        failing = sink.wait_for("telemetry", 2)[1]  # a whole window without a frame
        assert failing["errors"] == 0 and failing["inferences"] == 0
        assert "no readable frames" in failing["camera"]["error"]
        assert failing["invoke_ms"] is None and failing["power"]["mj_per_inference"] is None
    finally:
        worker.stop()


def test_max_fps_bounds_the_frame_rate(tmp_path: Path, sink: Sink) -> None:
    worker = InferenceWorker(CHOICE, "synthetic", sink, window_s=0.5, max_fps=40, warmup=0)
    worker.start()
    try:
        worker.swap(*model(tmp_path, 1, "a"))
        for window in sink.wait_for("telemetry", 3)[1:]:
            # Pacing to a schedule never bursts: frames <= elapsed x rate + 1.
            assert window["inferences"] <= window["window_s"] * 40 + 1
            assert window["power"] is None and window["thermal"] is None  # no sampler
    finally:
        worker.stop()


def test_bad_worker_settings_are_refused(sink: Sink) -> None:
    with pytest.raises(ConfigError):
        InferenceWorker(CHOICE, "synthetic", sink, window_s=0.0)
    with pytest.raises(ConfigError):
        InferenceWorker(CHOICE, "synthetic", sink, window_s=1.0, max_fps=-1)
    with pytest.raises(ConfigError):
        WorkerLimits(error_backoff_s=-1.0)


# -- the pure parts ------------------------------------------------------------------------
def power_window(
    mean_mw: float | None, samples: int = 4, thermal: ThermalSample | None = None
) -> PowerWindow:
    return PowerWindow(
        duration_s=2.0,
        samples=samples,
        mean_mw=mean_mw,
        max_mw=mean_mw,
        source="sensor",
        detail="rapl intel-rapl:0 package-0",
        energy_mj=None if mean_mw is None else mean_mw * 2,
        read_errors=0,
        thermal=thermal,
        max_temp_c=None if thermal is None else thermal.max_c,
        throttled=None if thermal is None else thermal.throttled,
        throttle_flags=() if thermal is None else thermal.flags,
    )


def test_power_fields_energy_per_inference() -> None:
    fields = power_fields(power_window(5000.0), inferences=100, idle_mw=3000.0)
    assert fields is not None
    assert fields["mj_per_inference"] == 100.0  # 5 W x 2 s / 100
    assert fields["mj_per_inference_above_idle"] == 40.0  # (5 - 3) W x 2 s / 100
    assert fields["energy_mj"] == 10000.0
    below_idle = power_fields(power_window(2000.0), inferences=10, idle_mw=3000.0)
    assert below_idle is not None and below_idle["mj_per_inference_above_idle"] == 0.0
    none = power_fields(power_window(None, samples=0), inferences=10, idle_mw=3000.0)
    assert none is not None and none["mw"] is None and none["mj_per_inference"] is None
    assert power_fields(None, 10, 0.0) is None


def test_thermal_fields_now_and_since_boot() -> None:
    sample = ThermalSample(zones_c={"cpu-thermal": 81.5}, throttle=decode_throttled(0x50005))
    fields = thermal_fields(power_window(5000.0, thermal=sample))
    assert fields is not None
    assert fields["flags"] == ["under_voltage", "throttled"]
    assert fields["since_boot"] == ["throttled", "under_voltage"]
    assert fields["throttled"] is True and fields["max_c"] == 81.5
    assert fields["cpu_max_freq_ratio"] is None and fields["oc_events"] is None
    assert thermal_fields(power_window(5000.0)) is None


def test_window_without_a_model_publishes_nothing() -> None:
    window = TelemetryWindow(warmup=3)
    assert window.snapshot(None) is None
    window.restart({"name": "digits", "release": 1})
    for i in range(5):
        window.record(1_000_000 + i, 2_000_000 + i)
    payload = window.snapshot("a")
    assert payload is not None
    assert payload["inferences"] == 5 and payload["invoke_ms"]["count"] == 2
    empty = window.snapshot("a")  # a model but no frames: reported, with no latency
    assert empty is not None
    assert (empty["inferences"], empty["invoke_ms"], empty["release"]) == (0, None, 1)
    with pytest.raises(ValueError):
        TelemetryWindow(warmup=-1)
