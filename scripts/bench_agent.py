#!/usr/bin/env python3
"""Agent overhead benchmark, baseline measured in the same run.

    .venv/bin/python scripts/bench_agent.py [--threads N] [--rounds R] [--segment-s S]

1. Idle agent: a real fleet server on 127.0.0.1, a real ``edgefleet-agent enroll``,
   then ``edgefleet-agent run`` with no model assigned. Start time runs from
   spawning the process to ``READY=1`` arriving on an AF_UNIX ``NOTIFY_SOCKET``;
   idle RSS is read from ``/proc/<pid>/status`` once start-up has settled.
   The server is stopped before part 2 so its threads do not share our GIL.
2. Throughput, interleaved A/B/C rounds (the order rotates each round) on the
   same model, thread count and synthetic uint8 camera frames at the model's size:
   - agent: the real ``InferenceWorker`` with the release's input contract
     (``--input-range``, default -1,1 as MobileNetV2 takes), telemetry windows, the
     power/thermal sampler and the real MQTT ``Publisher`` + SQLite ``Outbox`` (no
     broker is listening, so every message is queued on disk, as on a camera offline);
   - raw prequantized: a bare LiteRT ``Interpreter`` ``set_tensor``/``invoke``/
     ``get_tensor`` loop fed one already-quantized tensor: the upper bound;
   - raw+numpy: the same loop normalising and quantizing each uint8 frame with plain
     numpy floats (``x * (HI-LO)/255 + LO``, then the runtime's quantize), as a
     pipeline without the agent's fused tables would.
   Telemetry CPU is the sampler thread's CPU (schedstat) plus the worker's
   window-flush CPU plus the per-frame histogram cost times the frame rate.

The last line is ``ratio_agent_vs_raw=R idle_rss_mb=M start_s=S``. R is the median
over rounds of agent / raw prequantized, taken over the "quiet" rounds, where other
processes used at most ``--quiet-cores`` of CPU during both segments (from /proc/stat
minus our own CPU); up to twice the rounds run while fewer than 5 were quiet, else
all rounds count. On a shared 2-core box one busy neighbour halves a 2-thread loop.
All-round figures, and the ratio against raw+numpy, are printed too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import requests  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402
from bench_proc import busy_cpu_s, free_port, rss_mb, threads_cpu_s, threads_named  # noqa: E402

from agent.inference.runtime import quantize  # noqa: E402
from agent.inference.sources import open_source  # noqa: E402
from agent.profiles.schema import Profile, load_profiles  # noqa: E402
from agent.protocol.input_contract import InputContract  # noqa: E402
from agent.protocol.input_options import parse_range  # noqa: E402
from agent.telemetry.sensors import idle_mw, make_sampler  # noqa: E402
from agent.telemetry.window import TelemetryWindow  # noqa: E402
from agent.transport.mqtt import MqttSettings, Publisher  # noqa: E402
from agent.transport.outbox import Outbox  # noqa: E402
from agent.update.smoke import RuntimeChoice  # noqa: E402
from agent.worker import InferenceWorker  # noqa: E402

MODEL = ROOT / "tests" / "fixtures" / "mobilenetv2_int8.tflite"
VARIANTS = ("agent", "raw prequantized", "raw+numpy")


@dataclass(frozen=True)
class BenchConfig:
    model: Path
    threads: int
    rounds: int
    segment_s: float
    window_s: float
    profile: str
    hw_root: str
    idle_runs: int
    settle_s: float
    input_range: tuple[float, float] = (-1.0, 1.0)
    ready_timeout_s: float = 30.0
    quiet_cores: float = 0.15  # other processes' CPU allowed in a "quiet" segment
    min_quiet_rounds: int = 5


# -- part 1: the idle agent ----------------------------------------------------------------
def agent_command() -> list[str]:
    script = Path(sys.executable).parent / "edgefleet-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]


def enroll(tmp: Path, profile: str) -> tuple[Path, Any]:
    from server.app import start_server  # noqa: PLC0415 - only part 1 needs it
    from server.config import ServerConfig  # noqa: PLC0415

    handle = start_server(ServerConfig(data_dir=tmp / "server", port=0, log_level="warning"))
    reply = requests.post(f"{handle.url}/api/v1/enrollment-tokens", json={}, timeout=10,
                          headers={"Authorization": f"Bearer {handle.operator_token}"})
    reply.raise_for_status()
    config = tmp / "agent.toml"
    subprocess.run(
        [*agent_command(), "enroll", "--server", handle.url, "--token", reply.json()["token"],
         "--config", str(config), "--state-dir", str(tmp / "state"),
         "--hardware-id", "bench-idle", "--profile", profile],
        cwd=ROOT, check=True, capture_output=True, timeout=60,
    )
    return config, handle


def idle_run(cfg: BenchConfig, config: Path, tmp: Path, run: int) -> tuple[float, float]:
    """(seconds from spawn to READY=1, settled RSS in MB) of one real agent process."""
    sock_path = tmp / f"notify-{run}.sock"
    log_path = tmp / f"agent-{run}.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, log_path.open("w") as log:
        notify.bind(str(sock_path))
        notify.settimeout(cfg.ready_timeout_s)
        env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
        started = time.perf_counter()
        proc = subprocess.Popen([*agent_command(), "run", "--config", str(config)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    message = notify.recv(4096).decode()
                except TimeoutError:
                    raise SystemExit(f"agent sent no READY=1 in {cfg.ready_timeout_s}s; "
                                     f"log:\n{log_path.read_text()[-2000:]}") from None
                if "READY=1" in message.split("\n"):
                    start_s = time.perf_counter() - started
                    break
            time.sleep(cfg.settle_s)  # first check-in, MQTT connect, first sampler reads
            samples = []
            for _ in range(6):
                samples.append(rss_mb(proc.pid))
                time.sleep(0.25)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return start_s, max(samples)


def idle_agent(cfg: BenchConfig) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="bench-agent-idle-") as name:
        tmp = Path(name)
        config, handle = enroll(tmp, cfg.profile)
        try:
            runs = [idle_run(cfg, config, tmp, i) for i in range(cfg.idle_runs)]
        finally:
            handle.stop()
    for i, (start_s, rss) in enumerate(runs):
        print(f"  idle agent run {i}: start {start_s:.3f} s, RSS {rss:.1f} MB")
    return statistics.median(s for s, _ in runs), max(r for _, r in runs)


# -- part 2: throughput ---------------------------------------------------------------------
@dataclass
class Segment:
    """One timed segment: our frames and CPU, and how busy everyone else was meanwhile."""

    frames: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0  # this whole process (for the agent: inference, sampler, MQTT, flushes)
    others_cores: float = 0.0  # other processes' CPU over the segment, in cores
    sampler_cpu_s: float = 0.0
    publisher_cpu_s: float = 0.0
    flush_cpu_s: float = 0.0
    windows: int = 0


class Meter:
    def __init__(self) -> None:
        self.t0, self.c0, self.b0 = time.perf_counter(), time.process_time(), busy_cpu_s()

    def stop(self, frames: int) -> Segment:
        seconds = time.perf_counter() - self.t0
        cpu = time.process_time() - self.c0
        others = max(0.0, busy_cpu_s() - self.b0 - cpu) / seconds
        return Segment(frames, seconds, cpu, others)


def raw_loop(interp: Any, feed: Callable[[], Any], seconds: float) -> Segment:
    """A bare set_tensor/invoke/get_tensor loop for ``seconds``."""
    inp = interp.get_input_details()[0]["index"]
    out = interp.get_output_details()[0]["index"]
    set_tensor, invoke, get_tensor = interp.set_tensor, interp.invoke, interp.get_tensor
    for _ in range(10):
        set_tensor(inp, feed())
        invoke()
    n = 0
    meter = Meter()
    deadline = meter.t0 + seconds
    while True:
        set_tensor(inp, feed())
        invoke()
        get_tensor(out)
        n += 1
        if time.perf_counter() >= deadline:
            return meter.stop(n)


def agent_segment(cfg: BenchConfig, profile: Profile, outbox: Outbox) -> Segment:
    """Build the agent's inference stack, warm it up, count frames for ``segment_s``."""
    mq = MqttSettings("127.0.0.1", free_port(), "bench", "bench")  # nobody listens there
    publisher = Publisher("bench-device", mq, outbox)
    sampler = make_sampler(profile, cfg.hw_root, window_s=cfg.window_s)
    worker = InferenceWorker(
        RuntimeChoice("litert", cfg.threads), "synthetic", publisher.publish,
        window_s=cfg.window_s, power=sampler, idle_mw=idle_mw(profile),
        extra_telemetry=lambda: {"profile": profile.name, "threads": cfg.threads},
    )
    sampler.start()
    publisher.start()
    worker.start()
    try:
        worker.swap(cfg.model, {"name": cfg.model.stem, "release": 1, "labels": [],
                                "input": contract_for(cfg, model_shape(cfg.model)).to_dict()})
        problem = worker.wait_healthy(20, timeout_s=60)
        if problem:
            raise SystemExit(f"agent worker unhealthy: {problem}")
        sampler_ids = threads_named("edgefleet-power-sampler")
        pub_ids = threads_named("mqtt-drain", "paho-mqtt")
        s0, p0 = threads_cpu_s(sampler_ids), threads_cpu_s(pub_ids)
        f0, w0, n0 = worker.flush_cpu_s, worker.windows_published, worker.total_inferences
        meter = Meter()
        time.sleep(cfg.segment_s)
        seg = meter.stop(worker.total_inferences - n0)
        seg.sampler_cpu_s = threads_cpu_s(sampler_ids) - s0
        seg.publisher_cpu_s = threads_cpu_s(pub_ids) - p0
        seg.flush_cpu_s = worker.flush_cpu_s - f0
        seg.windows = worker.windows_published - w0
        return seg
    finally:
        worker.stop()
        sampler.stop()
        publisher.stop(flush_timeout_s=0.0)


def model_shape(path: Path) -> tuple[int, ...]:
    interp = Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    return tuple(int(d) for d in interp.get_input_details()[0]["shape"])


def contract_for(cfg: BenchConfig, shape: tuple[int, ...]) -> InputContract:
    """The release's signed contract: the model's size, bilinear, RGB, ``--input-range``."""
    return InputContract(shape[1], shape[2], shape[3], value_range=cfg.input_range)


def record_cost_ns(n: int = 200_000) -> float:
    """Per-frame cost of the latency histograms (two records)."""
    window = TelemetryWindow(warmup=0)
    start = time.perf_counter_ns()
    for i in range(n):
        window.record(1_600_000 + i, 1_700_000 + i)
    return (time.perf_counter_ns() - start) / n


Segments = dict[str, list[Segment]]


def throughput(
    cfg: BenchConfig, profile: Profile, tmp: Path
) -> tuple[Segments, list[dict[str, Any]]]:
    """Interleaved rounds; also returns the telemetry windows the agent queued."""
    interp = Interpreter(model_path=str(cfg.model), num_threads=cfg.threads)
    interp.allocate_tensors()
    spec = interp.get_input_details()[0]
    scale, zero_point = spec["quantization"]
    frames = open_source("synthetic", tuple(spec["shape"]))
    low, high = cfg.input_range
    span = np.float32((high - low) / 255.0)

    def quantized() -> Any:
        values = next(frames).astype(np.float32) * span + np.float32(low)
        return quantize(values, scale, zero_point, spec["dtype"]).reshape(spec["shape"])

    fixed = quantized()

    outbox = Outbox(tmp / "outbox.sqlite")
    segs: Segments = {v: [] for v in VARIANTS}
    r = 0
    # At least cfg.rounds; more (up to twice as many) while too few rounds were quiet.
    while r < cfg.rounds or (len(quiet_rounds(segs, cfg)) < cfg.min_quiet_rounds
                             and r < 2 * cfg.rounds):
        for variant in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
            if variant == "agent":
                segs[variant].append(agent_segment(cfg, profile, outbox))
            else:
                feed = quantized if variant == "raw+numpy" else (lambda: fixed)
                segs[variant].append(raw_loop(interp, feed, cfg.segment_s))
        last = {v: segs[v][-1] for v in VARIANTS}
        line = "  ".join(f"{v} {fps(last[v]):6.1f}" for v in VARIANTS)
        print(f"  round {r:2}: fps {line}  ratio {fps(last['agent']) / fps(last[VARIANTS[1]]):.3f}"
              f"  others' load {max(x.others_cores for x in last.values()):.2f} cores")
        r += 1
    messages = outbox.peek(100_000)
    outbox.close()
    return segs, [json.loads(m.payload) for m in messages if m.topic.endswith("/telemetry")]


def quiet_rounds(segs: Segments, cfg: BenchConfig) -> list[int]:
    """Rounds where other processes stayed under ``quiet_cores`` in both paired segments."""
    agent, raw_p = segs[VARIANTS[0]], segs[VARIANTS[1]]  # agent and raw prequantized
    return [i for i in range(len(raw_p))
            if max(agent[i].others_cores, raw_p[i].others_cores) <= cfg.quiet_cores]


def fps(seg: Segment) -> float:
    return seg.frames / seg.seconds


def ratio_summary(name: str, pairs: list[tuple[Segment, Segment]]) -> float:
    ratios = [fps(a) / fps(b) for a, b in pairs]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    median = statistics.median(ratios)
    print(f"  agent / {name}: median {median:.3f} (interquartile {q1:.3f}..{q3:.3f}, "
          f"{len(ratios)} rounds)")
    return median


def report_throughput(segs: Segments, telemetry: list[dict[str, Any]], cfg: BenchConfig) -> float:
    agent, raw_p, raw_n = (segs[v] for v in VARIANTS)
    for v in VARIANTS:
        rate = statistics.median(fps(s) for s in segs[v])
        print(f"  {v:<17} median {rate:7.1f} fps ({1000 / rate:.3f} ms/frame)")
    # A neighbour on one of the two cores halves a 2-thread XNNPACK loop; pairs measured
    # while other processes were busy compare two different machines.
    quiet = quiet_rounds(segs, cfg)
    print("all rounds:")
    everything = ratio_summary("raw prequantized", list(zip(agent, raw_p, strict=True)))
    ratio_summary("raw+numpy       ", list(zip(agent, raw_n, strict=True)))
    headline = everything
    if len(quiet) >= cfg.min_quiet_rounds:
        print(f"quiet rounds (other processes <= {cfg.quiet_cores:g} cores in both segments):")
        headline = ratio_summary("raw prequantized", [(agent[i], raw_p[i]) for i in quiet])
        quiet_n = [i for i in quiet if raw_n[i].others_cores <= cfg.quiet_cores]
        if quiet_n:
            ratio_summary("raw+numpy       ", [(agent[i], raw_n[i]) for i in quiet_n])
    else:
        print(f"only {len(quiet)} quiet rounds: the headline uses all rounds and is dominated "
              "by other processes' load; rerun on a quieter machine")
    cpu = {v: statistics.median(s.cpu_s / s.frames * 1e6 for s in segs[v]) for v in VARIANTS}
    print("process CPU per frame (median): "
          + ", ".join(f"{v} {cpu[v]:.0f} us" for v in VARIANTS))
    seconds = sum(s.seconds for s in agent)
    frames_per_s = sum(s.frames for s in agent) / seconds
    sampler = sum(s.sampler_cpu_s for s in agent) / seconds
    flush = sum(s.flush_cpu_s for s in agent) / seconds
    publisher = sum(s.publisher_cpu_s for s in agent) / seconds
    record = record_cost_ns() * frames_per_s / 1e9
    total = sampler + flush + record
    print(f"telemetry CPU (window {cfg.window_s:g} s, {sum(s.windows for s in agent)} windows): "
          f"{total * 1000:.2f} ms/s = {total * 100:.3f}% of one core "
          f"[sampler {sampler * 1000:.2f}, window flush {flush * 1000:.2f}, "
          f"histograms {record * 1000:.2f} ms/s]; MQTT threads (offline) "
          f"{publisher * 1000:.2f} ms/s")
    if telemetry:
        last = telemetry[-1]
        power, invoke, e2e = last.get("power") or {}, last["invoke_ms"], last["e2e_ms"]
        print(f"last telemetry window: {last['inferences']} inferences, {last['fps']} fps, "
              f"invoke p50/p99 {invoke['p50']}/{invoke['p99']} ms, e2e p50/p99 "
              f"{e2e['p50']}/{e2e['p99']} ms, CPU {last['cpu_percent']}%, RSS {last['rss_mb']} MB")
        print(f"  power {power.get('mw')} mW ({power.get('source')}: {power.get('detail')}), "
              f"{power.get('mj_per_inference')} mJ/inference, "
              f"{power.get('mj_per_inference_above_idle')} mJ above idle")
    return headline


def parse_args(argv: list[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--profile", default="x86-gateway", help="firmware profile to run as")
    parser.add_argument("--hw-root", default="/", help="board root for the sensors")
    parser.add_argument("--threads", type=int, default=0,
                        help="interpreter threads (default: the profile's, at most the CPU count)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--segment-s", type=float, default=1.0)
    parser.add_argument("--window-s", type=float, default=0.5,
                        help="telemetry window (the agent default is 10 s; shorter is harsher)")
    parser.add_argument("--idle-runs", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--quiet-cores", type=float, default=0.15,
                        help="other processes' CPU (cores) above which a round is not quiet")
    parser.add_argument("--input-range", default="-1,1", metavar="LO,HI",
                        help="the model's pixel mapping (write --input-range=-1,1)")
    args = parser.parse_args(argv)
    if min(args.rounds, args.idle_runs) < 1 or min(args.segment_s, args.window_s) <= 0:
        parser.error("rounds and idle-runs must be >= 1, segment-s and window-s > 0")
    return BenchConfig(args.model, args.threads, args.rounds, args.segment_s, args.window_s,
                       args.profile, args.hw_root, args.idle_runs, args.settle_s,
                       input_range=parse_range(args.input_range), quiet_cores=args.quiet_cores)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    profile = load_profiles()[cfg.profile]
    threads = cfg.threads or min(profile.runtime.num_threads, os.cpu_count() or 1)
    cfg = replace(cfg, threads=threads)
    print(f"model {cfg.model.name}, {threads} thread(s), profile {profile.name}, "
          f"numpy {np.__version__}, {os.cpu_count()} CPUs")
    print(f"idle agent ({cfg.idle_runs} runs, no model assigned):")
    start_s, idle_rss = idle_agent(cfg)
    print(f"throughput ({cfg.rounds}+ rounds x {cfg.segment_s:g} s per variant, interleaved):")
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as name:
        segs, telemetry = throughput(cfg, profile, Path(name))
    ratio = report_throughput(segs, telemetry, cfg)
    print(f"idle agent: median start {start_s:.3f} s to READY=1, max settled RSS {idle_rss:.1f} MB")
    print(f"ratio_agent_vs_raw={ratio:.2f} idle_rss_mb={idle_rss:.1f} start_s={start_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
