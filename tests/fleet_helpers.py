"""Helpers for end-to-end tests: drive a real server over HTTP and real agents in-process."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import requests

from agent.cli import main as agent_main
from agent.config import load_config
from agent.daemon import Agent

FIXTURES = Path(__file__).parent / "fixtures"
BOARDS = Path(__file__).parent / "boards"
T = TypeVar("T")


class Operator:
    """The operator's side of the REST API, with the bearer token."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.session.request(method, self.url + path, timeout=30, **kwargs)
        assert resp.status_code < 400, f"{method} {path}: {resp.status_code} {resp.text[:300]}"
        return resp.json()

    def publish(
        self, release: int, name: str = "digits", variant: str = "int8-cpu",
        *, wait_deltas: bool = True,
    ) -> Any:
        return self.publish_file(
            FIXTURES / f"digits_int8_r{release}.tflite", release, name, variant,
            wait_deltas=wait_deltas,
        )

    def publish_file(
        self, path: Path, release: int, name: str = "digits", variant: str = "int8-cpu",
        *, wait_deltas: bool = True,
    ) -> Any:
        """Publish; with ``wait_deltas``, once the background worker has built the deltas,
        ``deltas`` in the answer lists the signed ones (as publish answered before)."""
        with open(path, "rb") as model:
            out = self.call(
                "POST",
                "/api/v1/models",
                files={"file": (path.name, model)},
                data={
                    "name": name,
                    "release": str(release),
                    "variant": variant,
                    "labels": ",".join(str(i) for i in range(10)),
                    "input_range": "0,1",  # the digits fixtures take [0, 1]
                },
            )
        if wait_deltas:
            wait_for_deltas(self.call, name, release)
            shown = self.call("GET", f"/api/v1/models/{name}/{release}")
            out["deltas"] = next(m for m in shown if m["variant"] == variant)["deltas"]
        return out

    def assign(self, release: int, *, device: str | None = None, tag: str | None = None) -> Any:
        body: dict[str, Any] = {"name": "digits", "release": release}
        body.update({"device_id": device} if device else {"tag": tag})
        return self.call("POST", "/api/v1/assignments", json=body)

    def device(self, device_id: str) -> Any:
        return self.call("GET", f"/api/v1/devices/{device_id}")

    def latest(self, device_id: str, channel: str) -> dict[str, Any]:
        entry = (self.device(device_id).get("telemetry") or {}).get(channel) or {}
        payload = entry.get("payload") or {}
        assert isinstance(payload, dict)
        return payload


def wait_for_deltas(
    call: Callable[..., Any], name: str, release: int, timeout_s: float = 600.0
) -> list[dict[str, Any]]:
    """Poll until no delta job of the release is queued or building; the jobs."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = call("GET", f"/api/v1/models/{name}/{release}/deltas")
        if out["pending"] == 0:
            return list(out["jobs"])
        assert time.monotonic() < deadline, f"deltas of {name}@{release} not built: {out}"
        time.sleep(0.2)


def enroll_agent(
    server_url: str,
    token: str,
    *,
    root_json: Path,
    work: Path,
    board: str = "x86-gateway",
    tags: tuple[str, ...] = ("fleet=test",),
    extra: str = "",
    inference: str = "",
) -> Agent:
    """Enroll through the real CLI, then build the daemon from the config it wrote."""
    config = work / "agent.toml"
    work.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f'[agent]\nstate_dir = "{work / "state"}"\nhw_root = "{BOARDS / board}"\n'
        "[inference]\nnum_threads = 1\nmax_fps = 200\n"
        + inference
        + "[telemetry]\nwindow_s = 0.5\nwarmup_inferences = 2\n"
        "[update]\npoll_interval_s = 1\nhealth_inferences = 5\n" + extra
    )
    argv = [
        "enroll",
        "--server",
        server_url,
        "--token",
        token,
        "--config",
        str(config),
        "--root",
        str(root_json),
        "--hardware-id",
        f"hw-{work.name}",
    ]
    for tag in tags:
        argv += ["--tag", tag]
    assert agent_main(argv) == 0
    return Agent(load_config(config))


