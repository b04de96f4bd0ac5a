"""A small sd_notify(3): readiness, watchdog pings and status for Type=notify units.

Every call is a no-op when ``$NOTIFY_SOCKET`` is unset, so the agent runs the
same way outside systemd. A leading ``@`` names a socket in the abstract
namespace, as systemd documents.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(raw: str) -> str | None:
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` to the service manager; True when it was sent.

    Failure to send is logged, not raised: a daemon must not die because its
    supervisor went away, and a missed watchdog ping surfaces on its own.
    """
    env = os.environ if environ is None else environ
    raw = env.get("NOTIFY_SOCKET", "")
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract '@' name", raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as err:
        log.warning("sd_notify to %s failed: %s", raw, err)
        return False
    return True


def ready(environ: Mapping[str, str] | None = None) -> bool:
    return notify("READY=1", environ)


def watchdog(environ: Mapping[str, str] | None = None) -> bool:
    return notify("WATCHDOG=1", environ)


def stopping(environ: Mapping[str, str] | None = None) -> bool:
    return notify("STOPPING=1", environ)


def status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    # A newline would start a new assignment in the datagram; keep it one line.
    one_line = " ".join(text.split())
    return notify(f"STATUS={one_line}", environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between required watchdog pings, or None when no watchdog applies.

    systemd sets ``WATCHDOG_USEC`` and, when it names a specific process,
    ``WATCHDOG_PID``; a PID other than ours means the watchdog is not for us.
    Callers should ping at about half this interval.
    """
    env = os.environ if environ is None else environ
    usec_raw = env.get("WATCHDOG_USEC", "")
    if not usec_raw:
        return None
    pid_raw = env.get("WATCHDOG_PID", "")
    if pid_raw:
        try:
            pid = int(pid_raw)
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_PID %r", pid_raw)
            return None
        if pid != os.getpid():
            return None
    try:
        usec = int(usec_raw)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC %r", usec_raw)
        return None
    if usec <= 0:
        log.warning("ignoring non-positive WATCHDOG_USEC %r", usec_raw)
        return None
    return usec / 1_000_000
