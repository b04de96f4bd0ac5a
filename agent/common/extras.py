"""Console scripts that answer a missing optional extra with one line, not a traceback.

``pip install edgefleet`` alone, or ``edgefleet[agent]`` on a camera, lacks what the
other programs import; the error should say which extra to install.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

# Top-level module -> the extra of pyproject.toml that installs it.
EXTRA_OF: dict[str, str] = {
    **dict.fromkeys(
        (
            "fastapi", "starlette", "uvicorn", "httptools", "uvloop", "multipart",
            "python_multipart", "sqlalchemy", "pydantic", "pydantic_core", "alembic",
            "prometheus_client", "psycopg", "bsdiff4", "plotly", "fastapi_offline",
        ),
        "server",
    ),
    **dict.fromkeys(
        ("paho", "psutil", "tuf", "securesystemslib", "zstandard", "flatbuffers"), "agent"
    ),
    "ai_edge_quantizer": "quantize",
    "av": "camera",
}  # fmt: skip


def missing_extra(err: ImportError) -> str | None:
    """The extra that provides the module ``err`` could not import; None if it is not ours."""
    return EXTRA_OF.get((err.name or "").partition(".")[0])


def run_entry(prog: str, load: Callable[[], Callable[[], int]]) -> int:
    """Import a program's ``main`` through ``load`` and run it; a missing dependency of an
    extra is one line on stderr and exit status 2. Any other ImportError is a bug: raised."""
    try:
        return load()()
    except ImportError as err:
        extra = missing_extra(err)
        if extra is None:
            raise
        print(
            f"{prog}: error: {err.name} is not installed; {prog} needs the '{extra}' extra: "
            f"pip install 'edgefleet[{extra}]'",
            file=sys.stderr,
        )
        return 2
