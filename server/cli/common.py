"""What every ``edgefleet`` command group shares: the API client, output and parsers.

Command modules use ``command_parser`` (which adds ``--json``), ``api_from``,
``emit`` and ``table`` from here, and raise ``CliError`` for a clean one-line
failure.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests

from server import __version__
from server.errors import ServerError

SERVER_ENV = "EDGEFLEET_SERVER"
TOKEN_ENV = "EDGEFLEET_TOKEN"  # noqa: S105 - a variable name, not a secret
DEFAULT_SERVER = "http://127.0.0.1:8080"
_MAX_ERROR_CHARS = 300

Handler = Callable[[argparse.Namespace], None]


class CliError(ServerError):
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

    def response(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """The raw answer (for bytes that must stay byte for byte); errors as ``request``."""
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
        return resp

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.response(method, path, **kwargs)
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


def group(subparsers: Any, name: str, help_text: str) -> Any:
    """A command group such as ``model``; its actions are added to the returned subparsers.

    Asking again for a group another module made returns the same one, so a command
    module can add actions to an existing group (``model quantize`` beside ``model
    publish``).
    """
    existing = subparsers.choices.get(name)
    if existing is not None:
        return existing.get_default("_group_actions")
    parser = command_parser(subparsers, name, help_text)
    actions = parser.add_subparsers(dest=f"{name}_action", metavar="ACTION", required=True)
    parser.set_defaults(_group_actions=actions)
    return actions
