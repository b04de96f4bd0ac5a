"""EdgeFleet demo: a fleet server and three camera agents on loopback.

Starts the server (SQLite, embedded MQTT broker), publishes the digits
classifier release 1 as a signed TUF target, enrolls three agents on fake
board trees (Raspberry Pi 4, Jetson Orin Nano, x86 gateway), assigns the
release and waits until every agent has verified, installed and smoke-tested
it and reports real LiteRT latency. Then it prints one row per device.

Each agent's camera is an H.264 video the demo encodes from held-out digits
(``file:`` source, PyAV, played in real time and looped), so the model sees
real pixels through the release's signed input contract, not noise.

    scripts/dev demo            # run once and exit
    scripts/dev demo --serve    # keep the fleet running (Ctrl-C to stop)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from demo_access import access_lines  # noqa: E402

from server.app import ServerHandle, start_server  # noqa: E402
from server.config import ServerConfig  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
BOARDS = ROOT / "tests" / "boards"
DEVICES = [("rpi4", "store-001"), ("jetson-orin-nano", "store-002"), ("x86-gateway", "store-003")]
MODEL = "digits"


def _rapl_counter(path: Path, stop: threading.Event) -> None:
    """Stands in for the CPU's RAPL energy counter: 12 W idle plus 30 W x load."""
    energy = int(path.read_text())
    last = time.monotonic()
    while not stop.wait(0.25):
        now = time.monotonic()
        watts = 12.0 + 30.0 * psutil.cpu_percent(None) / 100.0
        energy += int(watts * (now - last) * 1e6)
        last = now
        tmp = path.with_name(".energy_uj.tmp")
        tmp.write_text(f"{energy}\n")
        tmp.replace(path)


class Demo:
    def __init__(self, work: Path, quiet: bool) -> None:
        self.work = work
        self.quiet = quiet
        self.server: ServerHandle | None = None
        self.agents: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.stop_event = threading.Event()

    def log(self, text: str) -> None:
        print(f"[demo] {text}", flush=True)

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        assert self.server is not None
        headers = {"Authorization": f"Bearer {self.server.operator_token}"}
        resp = requests.request(
            method, self.server.url + path, headers=headers, timeout=30, **kwargs
        )
        if resp.status_code >= 400:
            raise SystemExit(f"demo: {method} {path} failed: {resp.status_code} {resp.text[:300]}")
        return resp.json()

    def start_server(self) -> None:
        cfg = ServerConfig(
            data_dir=self.work / "server", port=0, poll_interval_s=2.0, rollout_tick_interval_s=1.0
        )
        self.server = start_server(cfg)
        self.log(
            f"fleet server at {self.server.url} (API docs {self.server.url}/docs), "
            f"MQTT broker on {self.server.mqtt_host}:{self.server.mqtt_port}"
        )

    def publish(self, release: int) -> None:
        path = FIXTURES / f"digits_int8_r{release}.tflite"
        fp32 = FIXTURES / f"digits_fp32_r{release}.tflite"
        with (
            open(path, "rb") as model,
            open(FIXTURES / "digits_labels.txt", "rb") as labels,
            open(FIXTURES / "digits_val.npz", "rb") as golden,
        ):
            files = {
                "file": (path.name, model),
                "labels_file": ("labels.txt", labels),
                "golden_set": ("digits_val.npz", golden),
            }
            data = {
                "name": MODEL,
                "release": str(release),
                "variant": "int8-cpu",
                "fp32_length": str(fp32.stat().st_size),
                "min_accuracy": "0.95",
                "input_range": "0,1",  # the digits model takes pixels mapped to [0, 1]
            }
            info = self.api("POST", "/api/v1/models", files=files, data=data)
        self.log(
            f"published {MODEL}@{release} int8-cpu: {info.get('length')} bytes "
            f"(FP32 {fp32.stat().st_size}), sha256 {str(info.get('sha256'))[:12]}…, "
            "signed as a TUF target with a 300-image golden set (minimum accuracy 0.95)"
        )
        for note in info.get("input_notes", []):
            self.log(f"  {note}")
        for delta in self.wait_for_deltas(release):
            self.log(
                f"  delta from release {delta['base_release']}: {delta['length']} bytes "
                f"({100 * delta['length'] / info['length']:.1f}% of the INT8 file, "
                f"{fp32.stat().st_size / delta['length']:.0f}x smaller than FP32), signed"
            )

    def wait_for_deltas(self, release: int, timeout_s: float = 600.0) -> list[dict[str, Any]]:
        """The server builds deltas after publish: wait for them, then the signed ones."""
        deadline = time.monotonic() + timeout_s
        while self.api("GET", f"/api/v1/models/{MODEL}/{release}/deltas")["pending"]:
            if time.monotonic() > deadline:
                raise SystemExit(f"deltas of {MODEL}@{release} not built in {timeout_s:.0f} s")
            time.sleep(0.5)
        shown = self.api("GET", f"/api/v1/models/{MODEL}/{release}")
        return list(next(m for m in shown if m["variant"] == "int8-cpu")["deltas"])

    def rollout(self, release: int, timeout_s: float = 180.0) -> None:
        """A staged rollout across the demo fleet, printing each stage decision."""
        body = {
            "release": f"{MODEL}@{release}",
            "select": ["fleet=demo"],
            "stages": "33%,67%,100%",
            "soak": "4s",
            "timeout": "2m",
            "max_failure": "0",
            # The demo model invokes in ~60 us, so its p95 measures scheduler noise on a
            # shared box; real fleets keep this gate (default 10%).
            "max_latency_regression": "off",
            "max_power_regression": "50%",
            "min_golden_accuracy": "0.95",
            "min_sample": 1,
            "start": True,
        }
        rollout = self.api("POST", "/api/v1/rollouts", json=body)
        rid = rollout["id"]
        self.log(
            f"rollout {rid}: {MODEL}@{release} to fleet=demo in stages 33%,67%,100% "
            "(soak 4s; gates: install failures, power, golden-set accuracy >= 0.95)"
        )
        seen: set[tuple[Any, ...]] = set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            detail = self.api("GET", f"/api/v1/rollouts/{rid}")
            decision = detail.get("decision") or {}
            key = (detail["state"], detail.get("stage_index"), decision.get("kind"))
            if key not in seen and decision.get("kind"):
                seen.add(key)
                stage = detail.get("stage_index")
                where = (
                    f"stage {stage + 1}/{len(detail['stage_list'])}" if stage is not None else ""
                )
                reason = decision.get("reason") or detail.get("paused_reason") or ""
                self.log(f"  rollout {detail['state']} {where}: {decision.get('kind')} {reason}")
            if detail["state"] in ("completed", "paused", "aborted", "reverted"):
                return
            time.sleep(0.5)
        raise SystemExit(f"demo: rollout {rid} did not finish in {timeout_s:.0f}s")

    def bandwidth(self) -> None:
        fleet = self.api("GET", "/api/v1/bandwidth")["fleet"]
        ratio = fleet.get("ratio_fp32_to_sent")
        print(
            f"bandwidth: {fleet['updates']} updates ({fleet['deltas']} as deltas), "
            f"{fleet['bytes_sent']} bytes sent ({fleet['aux_bytes']} of them golden sets and "
            f"metadata) vs {fleet['full_int8_bytes']} full INT8 and {fleet['fp32_bytes']} FP32 "
            f"model bytes; saved {100 * (fleet['saving_vs_int8'] or 0):.1f}% vs INT8"
            + (f", FP32/sent {ratio}x" if ratio else ""),
            flush=True,
        )

    def board(self, profile: str) -> Path:
        """A writable copy of the profile's fake board tree (sysfs, device tree)."""
        root = self.work / "boards" / profile
        if not root.exists():
            shutil.copytree(BOARDS / profile, root)
        if profile == "x86-gateway":
            rapl = root / "sys/class/powercap/intel-rapl:0/energy_uj"
            threading.Thread(
                target=_rapl_counter, args=(rapl, self.stop_event), daemon=True
            ).start()
        return root

    def make_video(self, images: int = 100, frames_each: int = 5, size: int = 160) -> str:
        """The demo's camera: held-out digits, each on screen for half a second."""
        import av  # noqa: PLC0415 - the camera extra, installed with dev
        import numpy as np  # noqa: PLC0415

        data = np.load(FIXTURES / "digits_val.npz")
        x = np.round(data["x"][:images] * 255).astype(np.uint8)
        path = self.work / "camera.mp4"
        scale = size // x.shape[1]
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=10)
            assert isinstance(stream, av.VideoStream)
            stream.width = stream.height = scale * x.shape[1]
            stream.pix_fmt = "yuv420p"
            for image in x:
                big = np.ascontiguousarray(image.repeat(scale, axis=0).repeat(scale, axis=1))
                picture = av.VideoFrame.from_ndarray(big, format="rgb24")
                for _ in range(frames_each):
                    container.mux(stream.encode(picture))
            container.mux(stream.encode(None))
        self.log(
            f"camera: file:{path} ({images} held-out digits, H.264 "
            f"{stream.width}x{stream.height}, 10 fps, looped)"
        )
        return f"file:{path}"

    def enroll_agents(self) -> None:
        assert self.server is not None
        frames = self.make_video()
        token = self.api("POST", "/api/v1/enrollment-tokens")["token"]
        for profile, store in DEVICES:
            state = self.work / "agents" / profile
            config = state / "agent.toml"
            state.mkdir(parents=True, exist_ok=True)
            config.write_text(
                "[agent]\n"
                f'state_dir = "{state}"\n'
                f'hw_root = "{self.board(profile)}"\n'
                f'[inference]\nnum_threads = 1\nmax_fps = 30\nframes = "{frames}"\n'
                "[telemetry]\nwindow_s = 2\n"
                "[update]\npoll_interval_s = 2\n"
            )
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "agent.cli",
                    "enroll",
                    "--server",
                    self.server.url,
                    "--token",
                    token,
                    "--config",
                    str(config),
                    "--root",
                    str(self.server.repo.metadata_dir / "1.root.json"),
                    "--hardware-id",
                    f"demo-{profile}",
                    "--tag",
                    f"store={store}",
                    "--tag",
                    "fleet=demo",
                ],
                check=True,
                cwd=ROOT,
                stdout=subprocess.DEVNULL if self.quiet else None,
            )
            log_file = open(state / "agent.log", "wb")  # noqa: SIM115 - lives as long as the agent
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            self.agents.append((profile, proc, state))
        self.log(
            f"enrolled and started {len(self.agents)} agents: "
            + ", ".join(p for p, _, _ in self.agents)
        )

    def assign(self, release: int) -> None:
        self.api(
            "POST",
            "/api/v1/assignments",
            json={"name": MODEL, "release": release, "tag": "fleet=demo"},
        )
        self.log(f"assigned {MODEL}@{release} to tag fleet=demo")

    def wait_for_release(self, release: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rows = self.rows()
            ready = [r for r in rows if r["release"] == release and r["p50"] is not None]
            if len(ready) == len(self.agents):
                return rows
            for profile, proc, state in self.agents:
                if proc.poll() is not None:
                    tail = (state / "agent.log").read_text(errors="replace")[-2000:]
                    raise SystemExit(f"demo: agent {profile} exited ({proc.returncode}):\n{tail}")
            time.sleep(1.0)
        raise SystemExit(f"demo: not every agent reported release {release} in {timeout_s:.0f}s")

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for device in self.api("GET", "/api/v1/devices"):
            detail = self.api("GET", f"/api/v1/devices/{device['id']}")
            latest = (detail.get("telemetry") or {}).get("telemetry") or {}
            telemetry = latest.get("payload") or {}
            invoke = telemetry.get("invoke_ms") or {}
            camera = telemetry.get("camera") or {}
            power = telemetry.get("power") or {}
            thermal = telemetry.get("thermal") or {}
            mj = power.get("mj_per_inference")
            rows.append(
                {
                    "device": device["id"],
                    "profile": device.get("profile"),
                    "release": telemetry.get("release"),
                    "p50": invoke.get("p50"),
                    "p99": invoke.get("p99"),
                    "fps": telemetry.get("fps"),
                    "camera": camera.get("camera_fps"),
                    "power": f"{power['mw']:.0f} {power.get('source')}" if power.get("mw") else "-",
                    "mj": f"{mj:.1f}" if isinstance(mj, (int, float)) else "-",
                    "temp": f"{thermal['max_c']:.1f}" if thermal.get("max_c") else "-",
                }
            )
        return rows

    def table(self, rows: list[dict[str, Any]]) -> None:
        assert self.server is not None
        head = (
            f"{'device':<22} {'profile':<17} {'release':>7} {'invoke p50 ms':>13} {'p99 ms':>7} "
            f"{'fps':>6} {'cam fps':>7} {'power mW (source)':>18} {'mJ/inf':>7} {'temp C':>6}"
        )
        print("\n" + head + "\n" + "-" * len(head))
        for r in rows:
            print(
                f"{r['device']:<22} {r['profile']:<17} {r['release']!s:>7} {r['p50']!s:>13} "
                f"{r['p99']!s:>7} {r['fps']!s:>6} {r['camera']!s:>7} {r['power']:>18} "
                f"{r['mj']:>7} {r['temp']!s:>6}"
            )

    def access(self) -> None:
        assert self.server is not None
        config = self.server.config
        token_file = config.token_file
        viewer = config.viewer_token_file
        lines = access_lines(
            self.server.url,
            self.server.operator_token,
            token_file if token_file.exists() else None,
            viewer_token=viewer.read_text().strip() if viewer.exists() else None,
        )
        print("\n" + "\n".join(lines) + "\n", flush=True)

    def stop(self) -> None:
        self.stop_event.set()
        for _, proc, _ in self.agents:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in self.agents:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.server is not None:
            self.server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", action="store_true", help="keep the fleet running until Ctrl-C")
    parser.add_argument("--data", help="keep state in this directory instead of a temporary one")
    parser.add_argument(
        "--quiet", action="store_true", help="less output from the agents' enrollment"
    )
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    work = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    demo = Demo(work, args.quiet)
    try:
        demo.start_server()
        demo.publish(1)
        demo.enroll_agents()
        demo.assign(1)
        demo.table(demo.wait_for_release(1))
        demo.publish(2)
        demo.rollout(2)
        demo.table(demo.wait_for_release(2))
        demo.bandwidth()
        demo.access()
        if args.serve:
            demo.log("serving; Ctrl-C to stop")
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        demo.stop()
        if not args.data:
            shutil.rmtree(work, ignore_errors=True)
    demo.log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
