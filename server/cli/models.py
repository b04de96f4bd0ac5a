"""``edgefleet keys`` and ``edgefleet model``: signing keys and model releases."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from agent.common.errors import ProtocolError
from agent.protocol.input_contract import COLOR_ORDERS, RESIZE_METHODS, InputContract
from agent.protocol.input_options import ContractOptions
from server.cli.common import CliError, api_from, command_parser, emit, group, table
from server.cli.progress import MultipartBody, add_progress_flag, meter

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
        f"wrote {', '.join(keyids)} keys (0600) to {args.dir}\n"
        f"next: edgefleet-server run --data DATA --keys {args.dir}",
    )


def _gate_fields(args: argparse.Namespace) -> dict[str, str]:
    """The accuracy gate's form fields; refuse flag combinations that cannot work."""
    if args.validation is not None and args.fp32 is None:
        raise CliError("--validation needs --fp32: the gate compares the model with its original")
    given = {"max_drop": args.max_drop, "max_class_drop": args.max_class_drop,
             "override": args.override}  # fmt: skip
    if args.validation is None and any(v is not None for v in given.values()):
        raise CliError("--max-drop, --max-class-drop and --override need --fp32 and --validation")
    return {key: str(value) for key, value in given.items() if value is not None}


def _gate_lines(gate: dict[str, Any] | None) -> list[str]:
    if gate is None:
        return []
    lines = [f"  accuracy gate: {gate['summary']}"]
    override = gate.get("override")
    if override:
        lines.append(
            f"  OVERRIDDEN by {override['by']} at {override['at']}: {override['reason']!r}"
        )
    return lines


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
    data.update(_gate_fields(args))
    api = api_from(args)
    try:
        if args.fp32 is not None:
            data["fp32_length"] = str(Path(args.fp32).stat().st_size)
        parts = {"file": model, "labels_file": labels}
        if args.golden_set is not None:
            parts["golden_set"] = Path(args.golden_set)
            data["min_accuracy"] = str(args.min_accuracy)
        if args.validation is not None:  # the gate runs on the server, on these files
            parts.update(fp32=Path(args.fp32), validation=Path(args.validation))
        sizes = {key: path.stat().st_size for key, path in parts.items()}
        # On stderr, so --json output stays one document.
        shown = ", ".join(f"{parts[k].name} ({n} bytes)" for k, n in sizes.items()
                          if k != "labels_file")  # fmt: skip
        gate = "; the server runs the accuracy gate first" if args.validation else ""
        print(f"uploading {shown} to {api.server}{gate}", file=sys.stderr, flush=True)
        checks = "validating, gating" if args.validation else "validating"
        work = f"server {checks} and signing"
        with meter(args, "uploading", sum(sizes.values())) as progress:
            body = MultipartBody(data, parts, progress, work)
            try:
                out = api.request("POST", "/api/v1/models", data=body,
                                  headers={"Content-Type": body.content_type})  # fmt: skip
            finally:
                body.close()
    except OSError as err:
        raise CliError(f"cannot read {err.filename}: {err.strerror}") from err
    jobs = _delta_jobs(args, api, out["name"], out["release"], out["variant"])
    out["delta_jobs"] = jobs

    def text() -> str:
        lines = [
            f"published {out['name']}@{out['release']} {out['variant']} "
            f"({out['length']} bytes, sha256 {out['sha256'][:12]}) as {out['target_path']}"
        ]
        lines += [f"  {note}" for note in out.get("input_notes", [])]
        lines += _gate_lines(out.get("gate"))
        lines += [f"  {_job_text(j)}" for j in jobs]
        if any(j["state"] in _PENDING for j in jobs):
            lines.append(f"  deltas build in the background: edgefleet model show "
                         f"{out['name']}@{out['release']} (or publish --wait)")  # fmt: skip
        if out.get("gate"):
            lines.append(f"  report: edgefleet model show {out['name']}@{out['release']}")
        return "\n".join(lines)

    emit(args, out, text)


_PENDING = ("queued", "building")


def _job_text(job: dict[str, Any]) -> str:
    """One base's delta: its state, then size and ratio, progress or the reason."""
    head = f"delta from release {job['base_release']}: {job['state']}"
    if job["state"] == "done":
        return (f"{head}, {job['delta_bytes']} bytes ({100 * job['ratio']:.1f}% of the file, "
                f"{job['method']})")  # fmt: skip
    if job["state"] == "building":
        return f"{head} {100 * job['progress']:.0f}%"
    if job["state"] in ("skipped", "failed"):
        return f"{head}: {job['reason']}"
    return head


def _delta_jobs(
    args: argparse.Namespace, api: Any, name: str, release: int, variant: str
) -> list[dict[str, Any]]:
    """This variant's delta jobs; with ``--wait``, once none is queued or building."""
    path = f"/api/v1/models/{name}/{release}/deltas"

    def mine() -> list[dict[str, Any]]:
        return [j for j in api.get(path)["jobs"] if j["variant"] == variant]

    jobs = mine()
    if not getattr(args, "wait", False) or not jobs:
        return jobs
    deadline = None if args.wait_timeout is None else time.monotonic() + args.wait_timeout
    with meter(args, "building deltas", len(jobs)) as bar:
        while any(j["state"] in _PENDING for j in jobs):
            if deadline is not None and time.monotonic() > deadline:
                raise CliError(
                    f"deltas of {name}@{release} not built within {args.wait_timeout:g} s: "
                    f"edgefleet model show {name}@{release}"
                )
            finished = sum(1 for j in jobs if j["state"] not in _PENDING)
            done = finished + sum(j["progress"] for j in jobs if j["state"] == "building")
            bar.fraction(done / len(jobs), f"{finished} of {len(jobs)} deltas")
            time.sleep(0.5)
            jobs = mine()
        bar.fraction(1.0, f"{len(jobs)} of {len(jobs)} deltas")
    return jobs


_MODEL_COLUMNS = [
    ("NAME", "name"),
    ("RELEASE", "release"),
    ("VARIANT", "variant"),
    ("BYTES", "length"),
    ("SHA256", "sha12"),
    ("CREATED", "created_at"),
    ("GATE", "gate_text"),
]


def _gate_text(gate: dict[str, Any] | None) -> str:
    """The list's mark: the decision, and OVERRIDDEN when an operator shipped a refusal."""
    if gate is None:
        return "-"
    return f"OVERRIDDEN:{gate['decision']}" if gate.get("override") else str(gate["decision"])


def _model_list(args: argparse.Namespace) -> None:
    models = api_from(args).get("/api/v1/models", name=args.name)
    rows = [{**m, "sha12": m["sha256"][:12], "gate_text": _gate_text(m.get("gate"))}
            for m in models]  # fmt: skip
    emit(args, models, lambda: table(rows, _MODEL_COLUMNS))


def _pick_variant(name: str, rows: list[dict[str, Any]], wanted: str | None) -> str | None:
    variants = [str(r["variant"]) for r in rows]
    if wanted is not None:
        if wanted not in variants:
            raise CliError(f"{name} has no variant {wanted} (published: {', '.join(variants)})")
        return wanted
    if len(variants) == 1:
        return variants[0]
    if "int8-cpu" in variants:
        return "int8-cpu"
    return next((r["variant"] for r in rows if r.get("gate")), None)


def _variant_lines(m: dict[str, Any], jobs: list[dict[str, Any]]) -> list[str]:
    size = f"{m['length']} bytes"
    if m.get("fp32_length"):
        size += f" ({m['length'] / m['fp32_length']:.0%} of the FP32 {m['fp32_length']} bytes)"
    try:
        contract = InputContract.from_dict(m["input"]).describe() if m.get("input") else "none"
    except ProtocolError:
        contract = str(m["input"])
    # Releases published before deltas were jobs have only their signed deltas to show.
    deltas = "; ".join(f"from release {d['base_release']}: {d['length']} bytes"
                       for d in m.get("deltas", [])) or "none"  # fmt: skip
    mine = [j for j in jobs if j["variant"] == m["variant"]]
    labels = m.get("labels", [])
    shown = ", ".join(labels[:12]) + (", ..." if len(labels) > 12 else "")
    return [
        f"  {m['variant']}  {m['target_path']}",
        f"    sha256   {m['sha256']}",
        f"    size     {size}",
        f"    labels   {len(labels)}: {shown}",
        f"    input    {contract}",
        f"    created  {m['created_at']}",
        *([f"    {_job_text(j)}" for j in mine] if mine else [f"    deltas   {deltas}"]),
        f"    gate     {_gate_text(m.get('gate'))}",
    ]


def _report_lines(variant: str, report: dict[str, Any]) -> list[str]:
    lines = [f"report ({variant}): {report.get('summary', report['decision'])}"]
    overall = report.get("overall")
    if overall:
        lines.append(f"  overall   FP32 {overall['reference']:.2f}%  candidate "
                     f"{overall['candidate']:.2f}%  drop {overall['drop']:.2f} points on "
                     f"{overall['n']} samples")  # fmt: skip
    worst = sorted(report.get("per_class", []), key=lambda c: (-c["drop"], c["candidate"]))
    lines.append("  worst     " + ("; ".join(
        f"{c['label']} {c['reference']:.1f}% -> {c['candidate']:.1f}% (n {c['n']})"
        for c in worst[:3] if c["drop"] > 0
    ) or "no class lost accuracy"))  # fmt: skip
    lines.append(f"  failed    {', '.join(report.get('failed_classes', [])) or 'none'}")
    lines.append(f"  decision  {report['decision']}")
    override = report.get("override")
    if override:
        lines.append(f"  override  {override['reason']!r} by {override['by']} at {override['at']}")
    limits = report.get("limits")
    if limits:
        lines.append(f"  limits    max drop {limits['max_drop']:g} points overall, "
                     f"{limits['max_class_drop']:g} per class")  # fmt: skip
    ref = report.get("reference")
    if ref:
        lines.append(f"  reference {ref['samples']} samples; top-1 confidence >= 0.9 on "
                     f"{ref['confidence_hist'][-1]:.1%}; predicted-class and confidence "
                     "histograms in --json")  # fmt: skip
    return lines


def _model_show(args: argparse.Namespace) -> None:
    name, sep, version = args.release.partition("@")
    if not sep or not version.isdigit():
        raise CliError(f"give the release as NAME@VERSION, e.g. digits@3, not {args.release!r}")
    api = api_from(args)
    rows = api.get(f"/api/v1/models/{name}/{version}")
    variant = _pick_variant(args.release, rows, args.variant)
    report = None
    if any(r["variant"] == variant and r.get("gate") for r in rows):
        report = api.get(f"/api/v1/models/{name}/{version}/report", variant=variant)
    jobs = api.get(f"/api/v1/models/{name}/{version}/deltas")["jobs"]
    data = {"name": name, "release": int(version), "variants": rows, "report": report,
            "delta_jobs": jobs}  # fmt: skip

    def text() -> str:
        lines = [f"{name}@{version}"]
        for m in rows:
            lines += _variant_lines(m, jobs)
        if report is not None and variant is not None:
            lines += _report_lines(variant, report)
        else:
            lines.append(f"no validation report for {variant or 'these variants'} "
                         "(published without --fp32 and --validation)")  # fmt: skip
        return "\n".join(lines)

    emit(args, data, text)


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
    add_progress_flag(p)
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait until the server has built the deltas (a bar with --progress)",
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        metavar="SECONDS",
        help="with --wait: give up (exit 1) after this long",
    )
    p.add_argument(
        "--fp32", type=Path,
        help="the FP32 original: reports the size saving, and with --validation is uploaded "
        "for the accuracy gate",
    )  # fmt: skip
    gate = p.add_argument_group(
        "accuracy gate",
        "with --fp32 and --validation the server scores both models through the release's "
        "input contract and refuses a release that loses accuracy, overall or in any class",
    )
    gate.add_argument(
        "--validation", type=Path, metavar="VAL.npz",
        help="camera-space .npz (x: uint8 NxHxWx3 RGB images, y: class ids)",
    )  # fmt: skip
    gate.add_argument("--max-drop", type=float, metavar="POINTS",
                      help="overall top-1 drop allowed (default 1)")  # fmt: skip
    gate.add_argument("--max-class-drop", type=float, metavar="POINTS",
                      help="per-class drop allowed, counted in samples (default 3)")  # fmt: skip
    gate.add_argument(
        "--override", metavar="REASON",
        help="publish even if the gate refuses; the reason is recorded and shown",
    )  # fmt: skip
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
    p = command_parser(model, "show", "a release, its variants and its validation report",
                       _model_show)  # fmt: skip
    p.add_argument("release", metavar="NAME@VERSION")
    p.add_argument("--variant", help="whose report to show (default: the only one, or int8-cpu)")
