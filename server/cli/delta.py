"""``edgefleet delta make|apply``: build and apply model deltas by hand.

    edgefleet delta make OLD NEW -o PATCH     prints the method chosen and the sizes
    edgefleet delta apply OLD PATCH -o OUT    writes OUT only when its sha256 matches

Handlers return an exit status and print a one-line reason on failure:
1 unreadable input or unwritable output, 3 wrong base, 4 corrupt patch,
5 truncated patch. ``run(argv)`` is a standalone entry for tests and scripts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from agent.delta import (
    CorruptPatchError,
    DeltaError,
    TruncatedPatchError,
    WrongBaseError,
    apply_delta,
    make_delta,
)

EXIT_OK = 0
EXIT_IO = 1
EXIT_WRONG_BASE = 3
EXIT_CORRUPT = 4
EXIT_TRUNCATED = 5
# Show a progress bar by default for targets at least this big (when stderr is a tty).
PROGRESS_MIN_BYTES = 4 * 1024 * 1024
BAR_WIDTH = 30

Command = Callable[[argparse.Namespace], int]


class ProgressBar:
    """A one-line ``[#####.....] 42%`` bar on a stream, redrawn at most every 0.1 s."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.last = -1.0
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        frac = done / total if total else 1.0
        filled = int(frac * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        self.stream.write(f"\r{self.label} [{bar}] {100 * frac:3.0f}%")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _fail(command: str, message: str, code: int) -> int:
    print(f"edgefleet delta {command}: error: {message}", file=sys.stderr)
    return code


def _error_code(err: DeltaError) -> int:
    if isinstance(err, WrongBaseError):
        return EXIT_WRONG_BASE
    if isinstance(err, TruncatedPatchError):
        return EXIT_TRUNCATED
    if isinstance(err, CorruptPatchError):
        return EXIT_CORRUPT
    return EXIT_IO


def _want_progress(args: argparse.Namespace) -> bool:
    if args.progress is not None:
        return bool(args.progress)
    try:
        big = Path(args.new).stat().st_size >= PROGRESS_MIN_BYTES
    except OSError:
        return False
    return big and sys.stderr.isatty()


def cmd_make(args: argparse.Namespace) -> int:
    """``delta make OLD NEW -o PATCH``."""
    bar = ProgressBar(sys.stderr, "building delta") if _want_progress(args) else None
    try:
        info = make_delta(Path(args.old), Path(args.new), Path(args.output), progress=bar)
    except DeltaError as err:
        return _fail("make", str(err), _error_code(err))
    except OSError as err:
        return _fail("make", f"{err.filename or args.output}: {err.strerror or err}", EXIT_IO)
    finally:
        if bar is not None:
            bar.close()
    if getattr(args, "json", False):
        print(json.dumps(dataclasses.asdict(info), indent=2, sort_keys=True))
        return EXIT_OK
    share = 100.0 * info.patch_size / max(info.new_size, 1)
    others = ", ".join(f"{name} {size:,}" for name, size in sorted(info.candidates.items()))
    print(
        f"{args.output}: {info.mode} delta ({info.method}), {info.patch_size:,} bytes "
        f"= {share:.2f}% of the new file ({info.new_size:,} bytes; old {info.old_size:,})"
    )
    print(f"candidates: {others}; built in {info.seconds:.2f}s")
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    """``delta apply OLD PATCH -o OUT``."""
    try:
        info = apply_delta(Path(args.old), Path(args.patch), Path(args.output))
    except DeltaError as err:
        return _fail("apply", str(err), _error_code(err))
    except OSError as err:
        return _fail("apply", f"{err.filename or args.output}: {err.strerror or err}", EXIT_IO)
    if getattr(args, "json", False):
        print(json.dumps(dataclasses.asdict(info), indent=2, sort_keys=True))
        return EXIT_OK
    print(
        f"{args.output}: {info.target_length:,} bytes, sha256 {info.target_sha256} "
        f"({info.mode} delta, {info.patch_length:,} bytes, {info.seconds:.3f}s)"
    )
    return EXIT_OK


def _exiting(command: Command) -> Callable[[argparse.Namespace], None]:
    """Adapt an int-returning handler to ``server.cli.main``, which ignores returns."""

    def handler(args: argparse.Namespace) -> None:
        code = command(args)
        if code:
            raise SystemExit(code)

    return handler


def _add(actions: Any, name: str, help_text: str, command: Command) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    parser.set_defaults(func=_exiting(command), delta_command=command)
    return parser


def add_commands(subparsers: Any) -> None:
    """Register ``delta make`` and ``delta apply`` under an ``edgefleet`` parser."""
    group: argparse.ArgumentParser = subparsers.add_parser("delta", help="model deltas")
    actions = group.add_subparsers(dest="delta_action", metavar="ACTION", required=True)
    make = _add(actions, "make", "make the smallest patch from OLD to NEW", cmd_make)
    make.add_argument("old", metavar="OLD")
    make.add_argument("new", metavar="NEW")
    make.add_argument("-o", "--output", metavar="PATCH", required=True)
    make.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: for big models on a terminal)",
    )
    apply = _add(actions, "apply", "rebuild NEW from OLD and PATCH", cmd_apply)
    apply.add_argument("old", metavar="OLD")
    apply.add_argument("patch", metavar="PATCH")
    apply.add_argument("-o", "--output", metavar="OUT", required=True)


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``delta ...`` arguments and run the handler; returns the exit status."""
    parser = argparse.ArgumentParser(prog="edgefleet")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse usage errors: status 2, message already printed
        return int(exc.code or 0)
    command: Command = args.delta_command
    return command(args)


if __name__ == "__main__":
    sys.exit(run())
