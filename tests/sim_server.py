"""A fleet server in a child process, for tests that also run a simulated fleet.

A simulator and a server in one Python process share one GIL, so 200
simulated devices would be measuring the GIL. Here ``start_server`` runs in
a spawned child (its own interpreter) from the same ``ServerConfig`` the
in-process fixture uses; the parent gets the URL, ports and tokens over a
pipe. ``kill()`` is a crash (SIGKILL); ``restart()`` brings a new process up
on the same data directory, HTTP port and MQTT port, so devices reconnect to
the address they were given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from server.config import ServerConfig

_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0


def _serve(config: ServerConfig, conn: Connection) -> None:
    import logging  # noqa: PLC0415 - in the child only

    from server.app import start_server  # noqa: PLC0415

    logging.basicConfig(level=logging.WARNING)
    for noisy in ("alembic",):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        handle = start_server(config)
    except Exception as err:
        conn.send({"error": f"{type(err).__name__}: {err}"})
        return
    conn.send(
        {
            "url": handle.url,
            "port": int(handle.url.rsplit(":", 1)[1]),
            "mqtt_port": handle.mqtt_port,
            "operator_token": handle.operator_token,
            "root": str(handle.repo.metadata_dir / "1.root.json"),
        }
    )
    with contextlib.suppress(EOFError):
        conn.recv()  # any message, or the parent going away, means stop
    handle.stop()


@dataclass
class ServerProcess:
    config: ServerConfig
    url: str = ""
    mqtt_port: int = 0
    operator_token: str = ""
    root_json: Path = Path()
    _proc: Any = None
    _conn: Connection | None = None

    @property
    def enrollment_token(self) -> str:
        return self.config.enrollment_tokens[0]

    def start(self) -> ServerProcess:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        # Not daemonic: the server starts its own rollout scheduler process.
        self._proc = ctx.Process(target=_serve, args=(self.config, child), daemon=False)
        self._proc.start()
        child.close()
        if not parent.poll(_START_TIMEOUT_S):
            self._proc.kill()
            raise RuntimeError("the server process did not start in time")
        info = parent.recv()
        if "error" in info:
            raise RuntimeError(f"the server process failed to start: {info['error']}")
        self._conn = parent
        self.url, self.mqtt_port = info["url"], info["mqtt_port"]
        self.operator_token, self.root_json = info["operator_token"], Path(info["root"])
        # A restart must come back where the devices were told to find it.
        self.config = dataclasses.replace(
            self.config,
            port=info["port"],
            mqtt_bind_port=info["mqtt_port"],
            operator_token=info["operator_token"],
        )
        return self

    def stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send("stop")
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(_STOP_TIMEOUT_S)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
            self._proc = None

    def kill(self) -> None:
        """Crash the server (SIGKILL): no clean shutdown of anything."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(10)
            self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def restart(self) -> ServerProcess:
        return self.start()
