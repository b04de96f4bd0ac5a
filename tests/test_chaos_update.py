"""The chaos script, small: a real agent SIGKILLed mid-update 5 times, each special fault once.

``scripts/chaos_update.py`` runs the real server, a private Mosquitto and
``edgefleet-agent run`` as a subprocess; its last line is the verdict. With 5
kills every scenario (disk full, network cut, server restart, broker restart,
clock skew) lands on its own cycle.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "chaos_update.py"


def test_five_kills_leave_a_verified_model_and_no_crash_loop(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--kills", "5", "--seed", "7", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    assert lines[-1] == "kills=5 verified=5 partial=0 crashloops=0", done.stdout[-4000:]
    assert done.returncode == 0
    log = done.stdout
    for scenario in ("disk_full", "net_cut", "server_restart", "broker_restart", "clock_skew"):
        assert f": {scenario}" in log, f"{scenario} did not run"
    assert "skipped" not in log, log[-4000:]  # CI installs libfaketime; a skip proves nothing
