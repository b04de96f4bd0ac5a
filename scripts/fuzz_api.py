#!/usr/bin/env python3
"""Fuzz the REST API from its own OpenAPI document with Schemathesis: no answer may be a 5xx.

    scripts/fuzz_api.py [--max-examples 20] [--max-time 240] [--seed N]

Starts a real server on loopback (SQLite, embedded broker, a temporary data
directory) with one published release and one enrolled device, then runs
``schemathesis run`` twice against ``/openapi.json``:

- as the operator, over every operation;
- as the device, over the device routes, with ``device_id`` pinned to that
  device so the generated bodies reach the handlers instead of a 403.

The check is ``not_a_server_error``: malformed input must be a 4xx that
names the problem, never a crash. ``.ci/run`` runs it with a small budget;
run it longer by hand. Exit status: Schemathesis's, the first that failed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.app import ServerHandle, start_server  # noqa: E402
from server.config import ServerConfig  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
DEVICE_ROUTES = r"^/api/v1/devices/\{device_id\}/"


def prepare(server: ServerHandle, enroll_token: str) -> dict[str, str]:
    """One release published and one device enrolled, so the fuzz reaches real rows."""
    op = {"Authorization": f"Bearer {server.operator_token}"}
    model = FIXTURES / "digits_int8_r1.tflite"
    with open(model, "rb") as fh:
        resp = requests.post(
            f"{server.url}/api/v1/models",
            headers=op,
            files={"file": (model.name, fh)},
            data={
                "name": "digits",
                "release": "1",
                "variant": "int8-cpu",
                "labels": ",".join(str(i) for i in range(10)),
                "input_range": "0,1",
            },
            timeout=120,
        )
    resp.raise_for_status()
    body = {
        "token": enroll_token,
        "hardware_id": "fuzz-" + secrets.token_hex(4),
        "profile": "x86-gateway",
        "variant_preference": ["int8-cpu"],
        "agent_version": "0.1.0",
    }
    resp = requests.post(f"{server.url}/api/v1/enroll", json=body, timeout=30)
    resp.raise_for_status()
    out = resp.json()
    return {"device_id": out["device_id"], "device_token": out["device_token"]}


def schemathesis(
    url: str, token: str, args: argparse.Namespace, config: Path | None, *extra: str
) -> int:
    schemathesis_bin = Path(sys.executable).with_name("schemathesis")
    command = [str(schemathesis_bin)]
    if config is not None:
        command += ["--config-file", str(config)]
    command += [
        "run",
        f"{url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--header",
        f"Authorization: Bearer {token}",
        "--max-examples",
        str(args.max_examples),
        "--max-time",
        str(args.max_time),
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--seed",
        str(args.seed),
        "--generation-database",
        "none",
        "--no-color",
        *extra,
    ]
    print("==>", " ".join(c if "Bearer" not in c else "Authorization: Bearer ***" for c in command))
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=20, help="test cases per operation")
    parser.add_argument("--max-time", type=int, default=240, help="seconds per Schemathesis run")
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(2), "big"))
    args = parser.parse_args(argv)
    print(f"fuzz_api: seed {args.seed}")
    with tempfile.TemporaryDirectory(prefix="edgefleet-fuzz-") as tmp:
        enroll_token = "enroll-" + secrets.token_urlsafe(16)
        server = start_server(
            ServerConfig(
                data_dir=Path(tmp) / "server",
                port=0,
                enrollment_tokens=(enroll_token,),
                log_level="error",
            )
        )
        try:
            device = prepare(server, enroll_token)
            config = Path(tmp) / "schemathesis.toml"
            config.write_text(f'[parameters]\n"path.device_id" = "{device["device_id"]}"\n')
            operator = schemathesis(server.url, server.operator_token, args, None)
            own = schemathesis(
                server.url,
                device["device_token"],
                args,
                config,
                "--include-path-regex",
                DEVICE_ROUTES,
            )
        finally:
            server.stop()
    print(f"fuzz_api: operator run exit {operator}, device run exit {own}")
    return operator or own


if __name__ == "__main__":
    sys.exit(main())
