"""Installing EdgeFleet as a user would: from a wheel, without warnings, and with only
some extras.

The wheel is built from a copy of the sources (so the checkout gets no build/ or
egg-info), installed into a fresh virtual environment, and run from a directory
outside any checkout without ``EDGEFLEET_PROFILES_DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

from agent.profiles.schema import PROFILES_DIR_ENV, SHIPPED_PROFILES_DIR

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "agent", "server")
SERVER_ONLY = (
    "fastapi", "starlette", "uvicorn", "sqlalchemy", "pydantic", "pydantic_core", "alembic",
    "prometheus_client", "psycopg", "multipart", "python_multipart", "httptools", "uvloop",
    "bsdiff4", "plotly", "fastapi_offline",
)  # fmt: skip


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (PROFILES_DIR_ENV, "PYTHONPATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_the_wheel_builds_without_warnings_and_its_agent_lists_the_profiles(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path / "dist"
    # Build isolation, as `pip install` does: pip fetches the setuptools that pyproject.toml
    # requires, so this is the build (and the warnings) a user gets.
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=300, env=_clean_env(), check=False,
    )  # fmt: skip
    output = build.stdout + build.stderr
    assert build.returncode == 0, output
    assert "Warning" not in output and "deprecated" not in output, output
    [wheel] = dist.glob("edgefleet-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300, env=_clean_env(), check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    # The agent extra's dependencies come from this test environment (offline, and fast);
    # EdgeFleet itself only from the wheel: a bare path entry does not run the editable
    # install's finder, and the new environment's own site-packages comes first.
    new_site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    (new_site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    listed = subprocess.run(
        [str(env_dir / "bin" / "edgefleet-agent"), "profiles", "--json"],
        capture_output=True, text=True, timeout=120, cwd=elsewhere, env=_clean_env(),
        check=False,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == ""
    rows = json.loads(listed.stdout)
    assert len(rows) >= 8
    assert sorted(r["name"] for r in rows) == sorted(
        p.stem for p in SHIPPED_PROFILES_DIR.glob("*.toml")
    )
    for row in rows:
        assert Path(row["source"]).is_relative_to(new_site), row["source"]


def _run_blocked(
    blocked: tuple[str, ...], entry: str, *argv: str
) -> subprocess.CompletedProcess[str]:
    """Run a console-script entry point as if ``blocked`` modules were not installed."""
    module, _, func = entry.partition(":")
    code = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys
        BLOCKED = {set(blocked)!r}
        class NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None
        sys.meta_path.insert(0, NotInstalled())
        sys.argv = ["prog", *{list(argv)!r}]
        sys.exit(getattr(importlib.import_module({module!r}), {func!r})())
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        cwd=ROOT, env=_clean_env(), check=False,
    )  # fmt: skip


def test_scripts_point_at_the_guarded_entry_points() -> None:
    import tomllib  # noqa: PLC0415 - Python 3.11+, like the test environment

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {
        "edgefleet-agent": "agent.entry:main",
        "edgefleet-server": "server.entry:server_main",
        "edgefleet": "server.entry:operator_main",
    }


@pytest.mark.parametrize("argv", [("run", "--data", "/nonexistent"), ("--help",)])
def test_the_server_without_its_extra_says_so_in_one_line(argv: tuple[str, ...]) -> None:
    proc = _run_blocked(SERVER_ONLY, "server.entry:server_main", *argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith("edgefleet-server: error: ") and "is not installed" in line
    assert "pip install 'edgefleet[server]'" in line and "Traceback" not in proc.stderr


def test_the_operator_cli_and_the_agent_need_no_server_extra() -> None:
    proc = _run_blocked(SERVER_ONLY, "server.entry:operator_main", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "device" in proc.stdout
    proc = _run_blocked(SERVER_ONLY, "agent.entry:main", "profiles", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) >= 8


def test_the_agent_without_its_extra_says_so_in_one_line() -> None:
    proc = _run_blocked(("paho",), "agent.entry:main", "profiles")
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line == (
        "edgefleet-agent: error: paho is not installed; edgefleet-agent needs the 'agent' "
        "extra: pip install 'edgefleet[agent]'"
    )


def test_an_import_error_of_our_own_code_is_not_hidden() -> None:
    proc = _run_blocked(("server",), "server.entry:server_main", "--help")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
