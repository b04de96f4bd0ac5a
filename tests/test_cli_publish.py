"""`edgefleet model publish` with a golden set, and the deltas it reports."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.cli import main as cli_main

FIXTURES = Path(__file__).parent / "fixtures"


def test_publish_with_golden_set_then_a_delta(
    server_factory: Callable[..., Any], tmp_path: Path, capsys: Any
) -> None:
    srv = server_factory(tmp_path / "server")
    base = ["--server", srv.url, "--token", srv.operator_token, "model", "publish"]
    labels = str(FIXTURES / "digits_labels.txt"), "--input-range", "0,1"
    golden = ["--golden-set", str(FIXTURES / "digits_val.npz"), "--min-accuracy", "0.9"]

    assert cli_main([*base, str(FIXTURES / "digits_int8_r1.tflite"), "--name", "digits",
                     "--version", "1", "--labels", *labels, *golden]) == 0  # fmt: skip
    assert "published digits@1 int8-cpu" in capsys.readouterr().out
    digest = hashlib.sha256((FIXTURES / "digits_val.npz").read_bytes()).hexdigest()
    assert f"golden/digits/sha256-{digest}.npz" in srv.repo.targets()  # content-addressed

    assert cli_main([*base, str(FIXTURES / "digits_int8_r2.tflite"), "--name", "digits",
                     "--version", "2", "--labels", *labels, "--wait",
                     "--progress"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert "delta from release 1: done, " in out  # --wait: built by the background worker
    assert "building deltas [" in err and "1 of 1 deltas" in err

    code = cli_main([*base, str(FIXTURES / "digits_int8_r2.tflite"), "--name", "digits",
                     "--version", "3", "--labels", *labels, "--min-accuracy", "0.9"])  # fmt: skip
    assert code != 0
    assert "--golden-set and --min-accuracy go together" in capsys.readouterr().err
