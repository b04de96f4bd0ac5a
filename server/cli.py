"""``edgefleet``: the operator CLI (keys, models, devices, assignments, tokens).

Other modules add subcommands by exposing ``add_commands(subparsers)`` and
being listed in ``COMMAND_MODULES``; they use ``command_parser`` (which adds
``--json``), ``api_from``, ``emit`` and ``table`` from here, and raise
``CliError`` for a clean one-line failure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests

from server import __version__
from server.errors import ServerError

SERVER_ENV = "EDGEFLEET_SERVER"
TOKEN_ENV = "EDGEFLEET_TOKEN"  # noqa: S105 - a variable name, not a secret
DEFAULT_SERVER = "http://127.0.0.1:8080"
#: Further modules whose ``add_commands(subparsers)`` adds subcommands (delta, bandwidth, ...).
COMMAND_MODULES: list[str] = [
    "server.cli_bandwidth",
    "server.cli_delta",
    "server.cli_mqtt",
    "server.cli_rollout",
    "server.cli_simulate",
]
_MAX_ERROR_CHARS = 300

Handler = Callable[[argparse.Namespace], None]


class CliError(Exception):
    """A failure to report as one line on stderr with exit status 1."""


class Api:
    """A thin requests wrapper: every failure becomes a CliError with the server's message."""

    def __init__(self, server: str, token: str | None, timeout_s: float = 60.0) -> None:
        self.server = server.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"edgefleet-cli/{__version__}"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        url = self.server + path
        try:
            resp = self.session.request(method, url, timeout=self.timeout_s, **kwargs)
        except requests.ConnectionError as err:
            raise CliError(
                f"cannot connect to the server at {self.server} (is edgefleet-server running?)"
            ) from err
        except requests.RequestException as err:
            raise CliError(f"request to {url} failed: {err}") from err
        if resp.status_code >= 400:
            raise CliError(f"server answered {resp.status_code}: {_error_text(resp)}")
        try:
            return resp.json()
        except ValueError as err:
            raise CliError(f"server reply to {path} is not JSON") from err

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, json=body)


def _error_text(resp: requests.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:_MAX_ERROR_CHARS] or resp.reason
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])[:_MAX_ERROR_CHARS]
    return str(data)[:_MAX_ERROR_CHARS]


def operator_token(args: argparse.Namespace) -> str:
    """``--token``, else ``--token-file``, else ``$EDGEFLEET_TOKEN``."""
    if args.token:
        return str(args.token)
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise CliError(f"cannot read token file {args.token_file}: {err.strerror}") from err
        if not token:
            raise CliError(f"token file {args.token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise CliError(f"no operator token: pass --token or --token-file, or set ${TOKEN_ENV}")
    return token


def api_from(args: argparse.Namespace) -> Api:
    return Api(args.server, operator_token(args), args.timeout)


def emit(args: argparse.Namespace, data: Any, text: str | Callable[[], str]) -> None:
    """Print ``data`` as JSON under ``--json``, else the human-readable ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text() if callable(text) else text)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain aligned table of ``(header, key)`` columns."""
    cells = [[h for h, _ in columns]]
    cells += [["" if r.get(k) is None else str(r.get(k)) for _, k in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def command_parser(
    subparsers: Any, name: str, help_text: str, handler: Handler | None = None
) -> argparse.ArgumentParser:
    """A subcommand parser that also accepts ``--json`` after the command name."""
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help_text)
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    if handler is not None:
        parser.set_defaults(func=handler)
    return parser


# --- the core commands ------------------------------------------------------------------


def _keys_init(args: argparse.Namespace) -> None:
    from server.keys import init_keys  # noqa: PLC0415 - keeps `edgefleet --help` light

    keyids = init_keys(Path(args.dir), force=args.force)
    emit(
        args,
        {"keys_dir": str(args.dir), "keyids": keyids},
        f"wrote {', '.join(keyids)} keys (0600) to {args.dir}",
    )


def _model_publish(args: argparse.Namespace) -> None:
    model, labels = Path(args.file), Path(args.labels)
    data: dict[str, Any] = {
        "name": args.name,
        "release": str(args.version),
        "variant": args.variant,
    }
    if (args.golden_set is None) != (args.min_accuracy is None):
        raise CliError("--golden-set and --min-accuracy go together")
    try:
        if args.fp32 is not None:
            data["fp32_length"] = str(Path(args.fp32).stat().st_size)
        with contextlib.ExitStack() as stack:
            files: dict[str, Any] = {
                "file": (model.name, stack.enter_context(open(model, "rb"))),
                "labels_file": (labels.name, stack.enter_context(open(labels, "rb"))),
            }
            if args.golden_set is not None:
                golden = Path(args.golden_set)
                files["golden_set"] = (golden.name, stack.enter_context(open(golden, "rb")))
                data["min_accuracy"] = str(args.min_accuracy)
            out = api_from(args).request("POST", "/api/v1/models", data=data, files=files)
    except OSError as err:
        raise CliError(f"cannot read {err.filename}: {err.strerror}") from err

    def text() -> str:
        lines = [
            f"published {out['name']}@{out['release']} {out['variant']} "
            f"({out['length']} bytes, sha256 {out['sha256'][:12]}) as {out['target_path']}"
        ]
        lines += [
            f"  delta from release {d['base_release']}: {d['length']} bytes ({d['method']})"
            for d in out.get("deltas", [])
        ]
        return "\n".join(lines)

    emit(args, out, text)


_MODEL_COLUMNS = [
    ("NAME", "name"),
    ("RELEASE", "release"),
    ("VARIANT", "variant"),
    ("BYTES", "length"),
    ("SHA256", "sha12"),
    ("CREATED", "created_at"),
]
_DEVICE_COLUMNS = [
    ("DEVICE", "id"),
    ("PROFILE", "profile"),
    ("STATE", "state"),
    ("MODEL", "model"),
    ("TAGS", "tag_list"),
    ("LAST SEEN", "last_seen"),
]


def _model_list(args: argparse.Namespace) -> None:
    models = api_from(args).get("/api/v1/models", name=args.name)
    rows = [{**m, "sha12": m["sha256"][:12]} for m in models]
    emit(args, models, lambda: table(rows, _MODEL_COLUMNS))


def _device_row(d: dict[str, Any]) -> dict[str, Any]:
    inst = d.get("installed")
    model = f"{inst['name']}@{inst['release']} {inst['variant']}" if inst else "-"
    tags = ",".join(f"{k}={v}" for k, v in sorted(d.get("tags", {}).items()))
    return {**d, "model": model, "tag_list": tags or "-"}


def _device_list(args: argparse.Namespace) -> None:
    devices = api_from(args).get("/api/v1/devices", tag=args.tag)
    emit(args, devices, lambda: table([_device_row(d) for d in devices], _DEVICE_COLUMNS))


def _device_show(args: argparse.Namespace) -> None:
    device = api_from(args).get(f"/api/v1/devices/{args.id}")

    def text() -> str:
        row = _device_row(device)
        desired = device.get("desired")
        lines = [
            f"{k:<14}{row.get(k2)}"
            for k, k2 in (
                ("device", "id"),
                ("hardware id", "hardware_id"),
                ("profile", "profile"),
                ("state", "state"),
                ("model", "model"),
                ("tags", "tag_list"),
                ("agent", "agent_version"),
                ("last seen", "last_seen"),
            )
        ]
        lines.append(
            f"{'desired':<14}"
            + (f"{desired['name']}@{desired['release']} {desired['variant']}" if desired else "-")
        )
        for channel, item in sorted(device.get("telemetry", {}).items()):
            lines.append(f"{channel:<14}{json.dumps(item['payload'], sort_keys=True)[:200]}")
        lines.extend(
            f"event         {e['time']} {e['type']} {e.get('state') or ''}".rstrip()
            for e in device.get("events", [])
        )
        return "\n".join(lines)

    emit(args, device, text)


def _assign(args: argparse.Namespace) -> None:
    name, sep, version = args.release.partition("@")
    if not sep or not version.isdigit():
        raise CliError(f"release {args.release!r} must look like NAME@VERSION, e.g. digits@2")
    body: dict[str, Any] = {"name": name, "release": int(version)}
    if args.device:
        body["device_id"] = args.device
    else:
        body["tag"] = args.tag
    out = api_from(args).post("/api/v1/assignments", body)
    emit(args, out, f"assigned {name}@{version} to {out['target_kind']} {out['target_value']}")


def _token_create(args: argparse.Namespace) -> None:
    body = {
        k: v
        for k, v in (
            ("max_uses", args.max_uses),
            ("expires_in_s", args.expires_in),
            ("note", args.note),
        )
        if v is not None
    }
    out = api_from(args).post("/api/v1/enrollment-tokens", body)
    emit(args, out, out["token"])


def add_commands(sub: Any) -> None:
    keys = group(sub, "keys", "TUF signing keys")
    p = command_parser(keys, "init", "generate the four role keys (0600)", _keys_init)
    p.add_argument("dir", type=Path)
    p.add_argument("--force", action="store_true", help="replace existing keys")

    model = group(sub, "model", "model releases")
    p = command_parser(model, "publish", "validate, sign and publish a .tflite", _model_publish)
    p.add_argument("file", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--version", type=int, required=True, help="release counter")
    p.add_argument("--variant", default="int8-cpu")
    p.add_argument("--labels", type=Path, required=True, help="labels file, one per line")
    p.add_argument("--fp32", type=Path, help="the FP32 original, to report the size saving")
    p.add_argument("--golden-set", type=Path, help="labelled .npz (x, y) scored on every device")
    p.add_argument(
        "--min-accuracy", type=float, help="golden-set accuracy below which devices roll back"
    )
    p = command_parser(model, "list", "list published models", _model_list)
    p.add_argument("--name")

    device = group(sub, "device", "device inventory")
    p = command_parser(device, "list", "list devices", _device_list)
    p.add_argument("--tag", help="only devices with this key=value tag")
    p = command_parser(device, "show", "one device with telemetry and events", _device_show)
    p.add_argument("id")

    p = command_parser(sub, "assign", "assign a release to a device or a tag", _assign)
    p.add_argument("release", metavar="NAME@VERSION")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", metavar="ID")
    target.add_argument("--tag", metavar="KEY=VALUE")

    token = group(sub, "token", "enrollment tokens")
    p = command_parser(token, "create", "create an enrollment token", _token_create)
    p.add_argument("--max-uses", type=int)
    p.add_argument("--expires-in", type=float, metavar="SECONDS")
    p.add_argument("--note")


def group(subparsers: Any, name: str, help_text: str) -> Any:
    """A command group such as ``model``; its actions are added to the returned subparsers."""
    parser = command_parser(subparsers, name, help_text)
    return parser.add_subparsers(dest=f"{name}_action", metavar="ACTION", required=True)


def build_parser(modules: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefleet", description="EdgeFleet operator CLI")
    parser.add_argument("--version", action="version", version=f"edgefleet {__version__}")
    parser.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
        help=f"fleet server URL (default ${SERVER_ENV} or {DEFAULT_SERVER})",
    )
    parser.add_argument("--token", help=f"operator token (default ${TOKEN_ENV})")
    parser.add_argument("--token-file", type=Path, help="read the operator token from a file")
    parser.add_argument("--timeout", type=float, default=300.0, help="HTTP timeout in seconds")
    parser.add_argument("--json", action="store_true", help="print JSON")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub)
    for name in modules if modules is not None else COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CliError, ServerError) as err:
        print(f"edgefleet: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
