"""``edgefleet keys`` and ``edgefleet model``: signing keys and model releases."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from agent.common.errors import ProtocolError
from agent.protocol.input_contract import COLOR_ORDERS, RESIZE_METHODS
from agent.protocol.input_options import ContractOptions
from server.cli.common import CliError, api_from, command_parser, emit, group, table

# Publish flag -> REST form field of the input contract.
CONTRACT_FIELDS = {
    "input_range": "input_range", "mean": "mean", "std": "std", "resize": "resize",
    "pad": "pad", "crop": "crop", "color": "color",
}  # fmt: skip


def _keys_init(args: argparse.Namespace) -> None:
    from server.publish.keys import init_keys  # noqa: PLC0415 - keeps `edgefleet --help` light

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
    given = {field: getattr(args, attr) for attr, field in CONTRACT_FIELDS.items()}
    given = {field: str(value) for field, value in given.items() if value is not None}
    try:
        ContractOptions.parse(**given)  # refuse bad flags before uploading anything
    except ProtocolError as err:
        raise CliError(str(err)) from err
    data.update(given)
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
        lines += [f"  {note}" for note in out.get("input_notes", [])]
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


def _model_list(args: argparse.Namespace) -> None:
    models = api_from(args).get("/api/v1/models", name=args.name)
    rows = [{**m, "sha12": m["sha256"][:12]} for m in models]
    emit(args, models, lambda: table(rows, _MODEL_COLUMNS))


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
    p.add_argument(
        "--golden-set", type=Path,
        help="labelled .npz (x: uint8 NxHxWx3 RGB images, y: class ids) scored on every device",
    )  # fmt: skip
    p.add_argument(
        "--min-accuracy", type=float, help="golden-set accuracy below which devices roll back"
    )
    contract = p.add_argument_group(
        "input contract",
        "how camera pixels (uint8 RGB) become input values; an image model needs --input-range "
        "or --mean/--std unless its TFLite Metadata has normalization options (flags win)",
    )
    contract.add_argument(
        "--input-range", metavar="LO,HI",
        help="value = LO + (HI-LO)*p/255, e.g. 0,1; write --input-range=-1,1 for a negative LO",
    )  # fmt: skip
    contract.add_argument("--mean", metavar="M[,M,M]", help="value = (p - mean) / std, per channel")
    contract.add_argument("--std", metavar="S[,S,S]", help="with --mean, in pixel units (0..255)")
    contract.add_argument("--resize", choices=RESIZE_METHODS, help="default bilinear")
    contract.add_argument("--pad", type=int, metavar="N", help="letterbox fill pixel 0..255")
    contract.add_argument("--crop", type=float, metavar="F", help="central crop fraction (0, 1]")
    contract.add_argument("--color", choices=COLOR_ORDERS, help="channel order the model wants")
    p = command_parser(model, "list", "list published models", _model_list)
    p.add_argument("--name")
