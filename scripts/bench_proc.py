"""Process and socket helpers shared by the benchmarks (Linux /proc, loopback ports)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def threads_cpu_s(ids: list[int]) -> float:
    """CPU time of some of our threads, from their schedstat (ns resolution)."""
    return sum(int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])
               for tid in ids) / 1e9


def threads_named(*prefixes: str) -> list[int]:
    return [t.native_id for t in threading.enumerate()
            if t.native_id is not None and t.name.startswith(prefixes)]


def busy_cpu_s() -> float:
    """CPU seconds all processes spent busy so far (/proc/stat, all cores)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields)
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
