"""The rig ``chaos_update.py`` drives: a cuttable TCP proxy, a restartable Mosquitto,
the agent as a subprocess watched over sd_notify, a tiny tmpfs, and the disk checks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CHECKIN_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Proxy:
    """A loopback TCP proxy the agent reaches the server through: it can throttle and cut."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.rate_bps = 0  # 0: unthrottled
        self._cut = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                if self._cut:
                    raise OSError("cut")
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1024 if self.rate_bps else 65536):
                dst.sendall(data)
                if self.rate_bps:
                    time.sleep(len(data) / self.rate_bps)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                with self._lock:
                    self._conns.discard(sock)

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until ``restore``."""
        self._cut = True
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self._cut = False

    def close(self) -> None:
        self._listener.close()
        self.cut()


class Broker:
    """A private anonymous Mosquitto on its own port; ``restart`` keeps the port."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"log_dest file {workdir / 'mosquitto.log'}\n"
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["/usr/sbin/mosquitto", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            time.sleep(0.1)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None


class AgentProc:
    """``edgefleet-agent run`` as a subprocess, watched through its sd_notify socket."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.config = config
        self.log = open(workdir / "agent.log", "ab")  # noqa: SIM115 - lives as long as we do
        self.notify_path = workdir / "notify.sock"
        self.notify_path.unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None, fsize: int | None = None) -> None:
        self.notify.setblocking(False)
        with contextlib.suppress(OSError):
            while self.notify.recv(4096):  # what the previous process said
                pass
        exe = Path(sys.executable).parent / "edgefleet-agent"

        full_env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), **(env or {})}
        self.proc = subprocess.Popen(
            [str(exe), "run", "--config", str(self.config)],
            env=full_env, stdout=self.log, stderr=self.log,
        )  # fmt: skip
        if fsize is not None:  # set from outside: no preexec_fn in a threaded parent
            resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (fsize, fsize))

    def wait_checkin(self, timeout_s: float = CHECKIN_TIMEOUT_S) -> bool:
        """True once the agent reports a check-in; False if it dies or stays silent."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            self.notify.settimeout(0.5)
            try:
                msg = self.notify.recv(4096).decode("utf-8", "replace")
            except TimeoutError:
                continue
            match = re.search(r"(\d+) check-ins", msg)
            if match and int(match.group(1)) >= 1:
                return True
        return False

    def kill(self) -> bool:
        """SIGKILL; False when the agent had already exited on its own."""
        assert self.proc is not None
        alive = self.proc.poll() is None
        if alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return alive

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk_problem(state: Path, published: set[str]) -> str | None:
    """None when the active model is a complete published target, else what is wrong."""
    slots = state / "slots"
    try:
        slot = os.readlink(slots / "active")
        manifest = json.loads((slots / slot / "manifest.json").read_text())
        digest = sha256(slots / slot / "model.tflite")
    except (OSError, ValueError) as err:
        return f"active model unreadable: {err}"
    if digest not in published:
        return f"active model sha256 {digest[:12]} is not a published target"
    if manifest.get("sha256") != digest:
        return (
            f"slot {slot} manifest says {str(manifest.get('sha256'))[:12]}, file is {digest[:12]}"
        )
    return None


def record(state: Path, name: str) -> Any:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((state / name).read_text())
    return {}


class SmallDisk:
    """A tmpfs just larger than what the slots hold, mounted over them: installs hit ENOSPC."""

    def __init__(self, slots: Path) -> None:
        self.slots = slots
        self.saved = slots.with_name("slots.disk")
        self.mounted = False

    def mount(self) -> bool:
        used = sum(
            -(-p.stat().st_size // 4096) * 4096 for p in self.slots.rglob("*") if p.is_file()
        )
        self.slots.rename(self.saved)
        self.slots.mkdir()
        size = used + 3 * 4096
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(self.slots)], capture_output=True, check=False)  # fmt: skip
        if done.returncode != 0:
            self.slots.rmdir()
            self.saved.rename(self.slots)
            return False
        shutil.copytree(self.saved, self.slots, symlinks=True, dirs_exist_ok=True)
        self.mounted = True
        return True

    def unmount(self) -> None:
        copy = self.slots.with_name("slots.copy")
        shutil.copytree(self.slots, copy, symlinks=True)
        subprocess.run(["umount", str(self.slots)], check=True)
        self.slots.rmdir()
        copy.rename(self.slots)
        shutil.rmtree(self.saved)
        self.mounted = False
