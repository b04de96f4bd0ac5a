"""``edgefleet delta make|apply``: exit statuses, one-line reasons, no partial output."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from server.cli.delta import (
    EXIT_CORRUPT,
    EXIT_IO,
    EXIT_TRUNCATED,
    EXIT_WRONG_BASE,
    ProgressBar,
    add_commands,
    run,
)

FIXTURES = Path(__file__).parent / "fixtures"
R1 = FIXTURES / "digits_int8_r1.tflite"
R2 = FIXTURES / "digits_int8_r2.tflite"


@pytest.fixture
def patch(tmp_path: Path) -> Path:
    out = tmp_path / "r1-r2.efd"
    assert run(["delta", "make", str(R1), str(R2), "-o", str(out)]) == 0
    return out


def _one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"edgefleet delta {command}: error: ")
    return lines[0]


def test_make_prints_mode_and_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.efd"
    assert run(["delta", "make", str(R1), str(R2), "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    size = out.stat().st_size
    assert f"tflite delta (tflite), {size:,} bytes" in text
    assert "(37,984 bytes; old 37,984)" in text
    assert "candidates: bsdiff" in text and "zstd" in text


def test_make_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.efd"
    assert run(["delta", "make", "--json", str(R1), str(R2), "-o", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mode"] == "tflite" and info["patch_size"] == out.stat().st_size
    assert set(info["candidates"]) == {"tflite", "zstd", "bsdiff"}


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.efd"
    assert run(["delta", "make", str(R1), str(R2), "-o", str(out), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "building delta [" in err and err.rstrip().endswith("100%")


def test_apply_writes_the_target(
    tmp_path: Path, patch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    out = tmp_path / "new.tflite"
    assert run(["delta", "apply", str(R1), str(patch), "-o", str(out)]) == 0
    assert out.read_bytes() == R2.read_bytes()
    assert "sha256 e2ac5474cff3f700" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("wrong_base", EXIT_WRONG_BASE, "wrong base: patch needs base sha256"),
        ("truncated", EXIT_TRUNCATED, "truncated patch"),
        ("corrupt", EXIT_CORRUPT, "corrupt patch: checksum mismatch"),
        ("not_a_patch", EXIT_CORRUPT, "not an EdgeFleet delta"),
        ("missing_base", EXIT_IO, "cannot read base"),
        ("missing_patch", EXIT_IO, "cannot read patch"),
    ],
)
def test_apply_failures(
    tmp_path: Path,
    patch: Path,
    capsys: pytest.CaptureFixture[str],
    *,
    case: str,
    code: int,
    reason: str,
) -> None:
    data = patch.read_bytes()
    base, bad = R1, tmp_path / "bad.efd"
    bad.write_bytes(data)
    if case == "wrong_base":
        base = R2
    elif case == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif case == "corrupt":
        bad.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif case == "not_a_patch":
        bad.write_bytes(R2.read_bytes())
    elif case == "missing_base":
        base = tmp_path / "nope.tflite"
    else:
        bad = tmp_path / "nope.efd"
    capsys.readouterr()
    out = tmp_path / "out.tflite"
    assert run(["delta", "apply", str(base), str(bad), "-o", str(out)]) == code
    assert reason in _one_line_error(capsys.readouterr().err, "apply")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tflite")]


def test_make_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.efd"
    assert run(["delta", "make", str(tmp_path / "nope"), str(R2), "-o", str(out)]) == EXIT_IO
    assert "cannot read base" in _one_line_error(capsys.readouterr().err, "make")
    assert run(["delta", "make", str(R1), str(tmp_path), "-o", str(out)]) == EXIT_IO
    assert "cannot read target" in _one_line_error(capsys.readouterr().err, "make")
    assert not out.exists()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["delta", "apply", str(R1)]) == 2
    assert "required" in capsys.readouterr().err
    assert run(["delta", "frobnicate"]) == 2


def test_handlers_plug_into_an_operator_parser(tmp_path: Path) -> None:
    """The shape ``server.cli`` uses: ``args.func(args)``, failures exit non-zero."""
    parser = argparse.ArgumentParser(prog="edgefleet")
    add_commands(parser.add_subparsers(dest="command", required=True))
    ok = parser.parse_args(["delta", "make", str(R1), str(R2), "-o", str(tmp_path / "p.efd")])
    ok.func(ok)
    bad = parser.parse_args(["delta", "apply", str(R2), str(tmp_path / "p.efd"), "-o",
                             str(tmp_path / "o")])
    with pytest.raises(SystemExit) as caught:
        bad.func(bad)
    assert caught.value.code == EXIT_WRONG_BASE


def test_progress_bar_rendering() -> None:
    sink = io.StringIO()
    bar = ProgressBar(sink, "x")
    bar(5, 10)
    bar(10, 10)
    bar.close()
    assert "[###############...............]  50%" in sink.getvalue()
    assert sink.getvalue().endswith("100%\n")
