"""``edgefleet root export``: the TUF root.json that devices pin, for provisioning.

A device trusts only what chains to the root it was given at enrollment
(``edgefleet-agent enroll --root root.json``). Without one it pins whatever the
server sends on first contact, which anyone on the path could forge. This
fetches the server's current root, checks that it is a well-formed root signed
by its own root keys (and, with ``--keys DIR``, by the key made by
``edgefleet keys init DIR``), and writes it byte for byte.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent.common.atomic import atomic_write
from agent.protocol.api import TUF_METADATA_PREFIX
from server.cli.common import Api, CliError, command_parser, emit, group

ROOT_FILE = "root.json"


def _check(data: bytes, keys_dir: Path | None) -> dict[str, Any]:
    """A summary of a root.json that verifies against itself; CliError otherwise."""
    # Imported here: tuf is heavy and only this command needs it.
    from securesystemslib.exceptions import FormatError  # noqa: PLC0415
    from tuf.api.exceptions import RepositoryError  # noqa: PLC0415
    from tuf.api.metadata import Metadata, Root  # noqa: PLC0415

    try:
        md = Metadata[Root].from_bytes(data)
        if md.signed.type != Root.type:
            raise CliError(f"the server's {ROOT_FILE} is a {md.signed.type}, not a root")
        md.verify_delegate(Root.type, md)
    except (RepositoryError, FormatError, ValueError) as err:
        raise CliError(f"the server's {ROOT_FILE} does not verify: {err}") from err
    root_keyids = sorted(md.signed.roles[Root.type].keyids)
    if keys_dir is not None:
        from server.publish.keys import load_signer  # noqa: PLC0415

        keyid = str(load_signer(keys_dir, "root").public_key.keyid)
        if keyid not in root_keyids:
            raise CliError(
                f"the server's root is not signed by the root key in {keys_dir} ({keyid[:12]}); "
                f"was the server started with --keys {keys_dir}?"
            )
    return {
        "version": md.signed.version,
        "expires": md.signed.expires.isoformat(),
        "root_keyids": root_keyids,
        "keyids": {role: sorted(r.keyids) for role, r in md.signed.roles.items()},
    }


def _export(args: argparse.Namespace) -> None:
    api = Api(args.server, None, args.timeout)  # TUF metadata is public: trust is in signatures
    data = api.response("GET", TUF_METADATA_PREFIX + ROOT_FILE).content
    summary = _check(data, args.keys)
    if args.output is None:  # the file itself: `edgefleet root export > root.json`
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        atomic_write(Path(args.output), data, mode=0o644)
    except OSError as err:
        raise CliError(f"cannot write {args.output}: {err.strerror}") from err
    summary["output"] = str(args.output)
    emit(
        args,
        summary,
        f"wrote {args.output}: TUF root version {summary['version']}, expires "
        f"{summary['expires']}, root key {', '.join(k[:12] for k in summary['root_keyids'])}\n"
        f"provision devices with: edgefleet-agent enroll ... --root {args.output}",
    )


def add_commands(sub: Any) -> None:
    root = group(sub, "root", "the TUF root devices pin")
    p = command_parser(root, "export", "write the server's current root.json for provisioning",
                       _export)  # fmt: skip
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="default: stdout")
    p.add_argument(
        "--keys", type=Path, metavar="DIR",
        help="also check the root is signed by the root key in DIR (from `keys init`)",
    )  # fmt: skip
