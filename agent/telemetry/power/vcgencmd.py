"""Running Raspberry Pi ``vcgencmd`` through a configurable command path.

Parsing lives in pure functions elsewhere; this module only runs the command
and turns every way it can fail into a ``SensorError`` an operator can act on.
"""

from __future__ import annotations

import subprocess

from agent.common.errors import SensorError


def run_vcgencmd(path: str, args: list[str], timeout_s: float) -> str:
    """Run ``path *args`` and return stdout; non-zero exit, timeout or absence raise."""
    argv = [path, *args]
    what = " ".join(argv)
    try:
        done = subprocess.run(  # fixed argv, no shell
            argv, capture_output=True, timeout=timeout_s, check=False
        )
    except FileNotFoundError as err:
        raise SensorError(f"{what}: command not found (set vcgencmd_path)") from err
    except PermissionError as err:
        raise SensorError(f"{what}: not executable by this user") from err
    except subprocess.TimeoutExpired as err:
        raise SensorError(f"{what}: no answer within {timeout_s}s") from err
    except OSError as err:
        raise SensorError(f"{what}: cannot run: {err.strerror or err}") from err
    stdout = done.stdout.decode("utf-8", errors="replace")
    if done.returncode != 0:
        # "VCHI initialization failed" here means no access to /dev/vchiq (video group).
        detail = (done.stderr.decode("utf-8", errors="replace") or stdout).strip()[:200]
        raise SensorError(f"{what}: exit status {done.returncode}: {detail}")
    if stdout.startswith("error="):
        raise SensorError(f"{what}: firmware refused: {stdout.strip()[:200]}")
    return stdout
