"""``promtool check metrics``: Prometheus's own linter, run on what a live server serves.

Debian's ``prometheus`` package ships it (``.ci/run`` installs it). A missing
promtool fails the test: a lint that silently does not run proves nothing.
"""

from __future__ import annotations

import shutil
import subprocess

PROMTOOL = "promtool"


def promtool_problems(exposition: str) -> str:
    """Everything promtool objects to in ``exposition`` ('' when it is clean)."""
    binary = shutil.which(PROMTOOL)
    assert binary is not None, "promtool not found: apt-get install prometheus"
    done = subprocess.run(
        [binary, "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 or problems, f"promtool exited {done.returncode} silently"
    return problems
