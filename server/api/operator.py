"""Operator routes (Bearer operator token): devices, models, assignments, tokens."""

from __future__ import annotations

import json
import logging
import pathlib
import secrets
import shutil
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Body, Depends, File, Form, Path, Query, UploadFile

from agent.common.errors import ProtocolError
from agent.protocol.input_options import ContractOptions
from agent.protocol.manifest import VARIANTS
from server.api.deps import AppState, OperatorRoute, app_state, bearer_scheme
from server.api.limits import Offset
from server.api.schemas import (
    DEVICE_ID,
    AssignmentIn,
    AssignmentOut,
    DeltaOut,
    DesiredOut,
    DeviceDetailOut,
    DeviceOut,
    ErrorOut,
    EventOut,
    GateOut,
    InstalledOut,
    ModelName,
    ModelOut,
    Release,
    TelemetryOut,
    TokenIn,
    TokenOut,
    Variant,
)
from server.db import queries
from server.db.tables import Device, Model
from server.errors import InvalidInputError, ModelValidationError, NotFoundError
from server.publish.deltas import BuiltDelta
from server.publish.publish_gate import GateRequest, check_override, gate_config_from
from server.publish.reports import (
    GateSummary,
    choose_variant,
    gate_summaries,
    get_report,
    signed_deltas,
)
from server.publish.service import Publisher, PublishRequest
from server.push import queue as push_queue

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorOut} for code in (401, 404, 409, 413, 422)
}
router = APIRouter(
    prefix="/api/v1",
    tags=["operator"],
    route_class=OperatorRoute,
    dependencies=[Depends(bearer_scheme)],
    responses=_ERRORS,
)
# The model upload gets its own router so the app can give it a larger body limit.
upload_router = APIRouter(
    prefix="/api/v1",
    tags=["operator"],
    route_class=OperatorRoute,
    dependencies=[Depends(bearer_scheme)],
    responses=_ERRORS,
)
State = Annotated[AppState, Depends(app_state)]
_COPY_CHUNK = 1024 * 1024
_MAX_LABEL_CHARS = 128


def device_out(device: Device) -> DeviceOut:
    installed = None
    if device.installed_name is not None:
        installed = InstalledOut(
            name=device.installed_name,
            release=device.installed_release or 0,
            variant=device.installed_variant or "",
            sha256=device.installed_sha256 or "",
            slot=device.installed_slot or "",
        )
    return DeviceOut(
        id=device.id,
        hardware_id=device.hardware_id,
        profile=device.profile,
        variant_preference=device.variant_preference,
        tags=device.tags,
        state=device.state,
        agent_version=device.agent_version,
        created_at=device.created_at,
        last_seen=device.last_seen,
        installed=installed,
    )


@router.get("/devices", response_model=list[DeviceOut])
def list_devices(
    st: State,
    tag: Annotated[str | None, Query(max_length=200, description="key=value")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Offset = 0,
) -> list[DeviceOut]:
    selector = queries.parse_tag(tag) if tag is not None else None
    with st.db.session() as s:
        return [device_out(d) for d in queries.list_devices(s, selector, limit, offset)]


@router.get("/devices/{device_id}", response_model=DeviceDetailOut)
def show_device(device_id: Annotated[str, Path(pattern=DEVICE_ID)], st: State) -> DeviceDetailOut:
    with st.db.session() as s:
        device = queries.get_device(s, device_id)
        desired = queries.resolve_desired(s, device)
        telemetry = queries.latest_telemetry(s, device_id)
        events = queries.recent_events(s, device_id, st.config.recent_events)
        base = device_out(device)
        return DeviceDetailOut(
            **base.model_dump(),
            desired=DesiredOut(**desired.to_json()) if desired else None,
            telemetry={t.channel: TelemetryOut.model_validate(t) for t in telemetry},
            events=[EventOut.model_validate(e) for e in events],
        )


@router.delete("/devices/{device_id}", response_model=DeviceOut)
def delete_device(device_id: Annotated[str, Path(pattern=DEVICE_ID)], st: State) -> DeviceOut:
    """Forget a device: its token and MQTT password stop working at once, and its hardware
    id may enroll again as a new device. Answers with the device as it was."""
    with st.db.session() as s:
        out = device_out(queries.delete_device(s, device_id))
    log.info("deleted device %s (hardware id %s)", out.id, out.hardware_id)
    return out


def _ContractField(description: str) -> Any:  # noqa: N802 - used like Form()
    return Form(max_length=200, description=f"input contract: {description}")


def model_out(row: Model, gate: GateSummary | None = None) -> ModelOut:
    """A model row for the API, with its signed input contract and its gate verdict."""
    out = ModelOut.model_validate(row)
    contract = (row.manifest or {}).get("input")
    out.input = dict(contract) if isinstance(contract, dict) else None
    out.gate = None if gate is None else GateOut.model_validate(gate.to_json())
    return out


def _label_lines(raw: bytes) -> list[str]:
    """A labels file: one label per line, or a JSON list of strings."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInputError("labels file is not UTF-8 text") from err
    if not text.lstrip().startswith("["):
        return text.splitlines()
    try:
        items = json.loads(text)
    except ValueError as err:
        raise InvalidInputError("labels file starts with '[' but is not a JSON list") from err
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise InvalidInputError("a JSON labels file must be a list of strings")
    return items


def _labels(text: str | None, upload: UploadFile | None, limit: int) -> list[str]:
    if text is not None and upload is not None:
        raise InvalidInputError("give labels either as a comma list or as a file, not both")
    if upload is not None:
        items = _label_lines(upload.file.read(limit * (_MAX_LABEL_CHARS + 4) + 2))
    else:
        items = (text or "").split(",")
    labels = [item.strip() for item in items if item.strip()]
    if len(labels) > limit:
        raise InvalidInputError(f"at most {limit} labels are allowed")
    if any(len(label) > _MAX_LABEL_CHARS or not label.isprintable() for label in labels):
        raise InvalidInputError(f"labels must be printable and at most {_MAX_LABEL_CHARS} chars")
    return labels


def _spool(source: BinaryIO, folder: pathlib.Path, suffix: str = ".tflite") -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"upload-{secrets.token_hex(8)}{suffix}"
    with open(path, "wb") as out:
        shutil.copyfileobj(source, out, _COPY_CHUNK)
    return path


def _delta_out(d: BuiltDelta) -> DeltaOut:
    return DeltaOut(base_release=d.base_release, base_sha256=d.base_sha256,
                    target_path=d.target_path, length=d.length, method=d.method)  # fmt: skip


def _shown_error(err: InvalidInputError, spooled: dict[pathlib.Path, str]) -> InvalidInputError:
    """The error naming the client's files, not the server's spool paths, on one line."""
    text = str(err)
    for path, shown in spooled.items():
        text = text.replace(str(path), shown)
    text = " ".join(text.split())
    if text == str(err):
        return err
    return (ModelValidationError if isinstance(err, ModelValidationError) else InvalidInputError)(
        text
    )


@upload_router.post("/models", response_model=ModelOut, status_code=201)
def publish(
    *,
    st: State,
    file: Annotated[UploadFile, File(description="the INT8 .tflite model")],
    name: Annotated[ModelName, Form()],
    release: Annotated[Release, Form()],
    variant: Annotated[Variant, Form()],
    labels: Annotated[str | None, Form(description="comma-separated labels")] = None,
    labels_file: Annotated[UploadFile | None, File(description="one label per line")] = None,
    fp32_length: Annotated[int | None, Form(ge=1)] = None,
    golden_set: Annotated[
        UploadFile | None,
        File(description="labelled .npz (x: uint8 NxHxWx3 RGB images, y: class ids)"),
    ] = None,
    min_accuracy: Annotated[float | None, Form(ge=0, le=1)] = None,
    fp32: Annotated[
        UploadFile | None, File(description="the FP32 original, for the accuracy gate")
    ] = None,
    validation: Annotated[
        UploadFile | None,
        File(description="camera-space .npz (x: uint8 NxHxWx3, y: class ids) for the gate"),
    ] = None,
    max_drop: Annotated[float | None, Form(ge=0, le=100, description="points, default 1")] = None,
    max_class_drop: Annotated[
        float | None, Form(ge=0, le=100, description="points per class, default 3")
    ] = None,
    override: Annotated[
        str | None, Form(max_length=500, description="reason to publish what the gate refuses")
    ] = None,
    input_range: Annotated[str | None, _ContractField("pixel 0..255 to LO..HI, as 'LO,HI'")] = None,
    mean: Annotated[str | None, _ContractField("per-channel mean in pixel units, M[,M,M]")] = None,
    std: Annotated[str | None, _ContractField("per-channel std in pixel units, S[,S,S]")] = None,
    resize: Annotated[str | None, _ContractField("bilinear, area, nearest or letterbox")] = None,
    pad: Annotated[str | None, _ContractField("letterbox fill, a pixel value 0..255")] = None,
    crop: Annotated[str | None, _ContractField("central crop fraction in (0, 1]")] = None,
    color: Annotated[str | None, _ContractField("channel order the model takes: RGB, BGR")] = None,
) -> ModelOut:
    """Validate, sign and publish a model release as a TUF target.

    An image model needs a pixel-to-value mapping: ``input_range`` or ``mean``
    and ``std``, unless its TFLite Metadata carries normalization options.
    With ``fp32`` and ``validation`` the accuracy gate runs first: a refusal is
    a 422 naming the failed classes, unless ``override`` gives a reason.
    """
    if (golden_set is None) != (min_accuracy is None):
        raise InvalidInputError("golden_set and min_accuracy go together")
    if (fp32 is None) != (validation is None):
        raise InvalidInputError(
            "fp32 and validation go together: the gate scores the model against its FP32 "
            "original on the validation set"
        )
    if validation is None and (max_drop, max_class_drop, override) != (None, None, None):
        raise InvalidInputError("max_drop, max_class_drop and override need fp32 and validation")
    gate_config = gate_config_from(max_drop, max_class_drop)
    override = check_override(override)
    if variant not in VARIANTS:
        raise InvalidInputError(f"unknown variant {variant!r}; expected {', '.join(VARIANTS)}")
    try:
        options = ContractOptions.parse(
            input_range=input_range, mean=mean, std=std, resize=resize, pad=pad, crop=crop,
            color=color,
        )  # fmt: skip
    except ProtocolError as err:
        raise InvalidInputError(str(err)) from err
    label_list = _labels(labels, labels_file, st.config.max_labels)
    spooled: dict[pathlib.Path, str] = {}  # spool path -> how errors name the client's file

    def spool(part: UploadFile, shown: str, suffix: str = ".tflite") -> pathlib.Path:
        path = _spool(part.file, st.config.upload_dir, suffix)
        spooled[path] = f"{shown} {part.filename or suffix[1:]!r}".strip()
        return path

    try:
        upload = spool(file, "uploaded file")
        golden_upload = spool(golden_set, "golden set", ".npz") if golden_set else None
        gate = None
        if fp32 is not None and validation is not None:
            gate = GateRequest(spool(fp32, "uploaded FP32 file"),
                               spool(validation, "", ".npz"), gate_config, override)  # fmt: skip
            fp32_length = gate.fp32.stat().st_size
        request = PublishRequest(
            model=upload, name=name, release=release, variant=variant, labels=label_list,
            fp32_length=fp32_length, golden_set=golden_upload, min_accuracy=min_accuracy,
            input_options=options, gate=gate,
        )  # fmt: skip
        result = Publisher(st.repo, st.db, st.publish_lock).publish(request)
    except InvalidInputError as err:
        shown = _shown_error(err, spooled)
        if shown is err:
            raise
        raise shown from err
    finally:
        for path in spooled:
            path.unlink(missing_ok=True)
    out = model_out(result.row, result.gate)
    out.input_notes = list(result.notes)
    out.deltas = [_delta_out(d) for d in result.deltas]
    return out


@router.get("/models", response_model=list[ModelOut])
def list_models(st: State, name: Annotated[ModelName | None, Query()] = None) -> list[ModelOut]:
    with st.db.session() as s:
        gates = gate_summaries(s, name)
        return [
            model_out(m, gates.get((m.name, m.release, m.variant)))
            for m in queries.list_models(s, name)
        ]


ReleasePath = Annotated[Release, Path(description="the release counter")]


@router.get("/models/{name}/{release}", response_model=list[ModelOut])
def show_release(name: Annotated[ModelName, Path()], release: ReleasePath, st: State) -> (
    list[ModelOut]
):  # fmt: skip
    """Every variant of one release, with its gate verdict and the deltas signed into it."""
    with st.db.session() as s:
        rows = queries.release_variants(s, name, release)
        if not rows:
            raise NotFoundError(f"model {name} release {release} is not published")
        gates = gate_summaries(s, name, release)
        every = queries.list_models(s, name)
    deltas = signed_deltas(st.repo.targets(), rows, every)
    out = []
    for m in rows:
        item = model_out(m, gates.get((m.name, m.release, m.variant)))
        item.deltas = [_delta_out(d) for d in deltas.get(m.variant, [])]
        out.append(item)
    return out


@router.get("/models/{name}/{release}/report", response_model=dict[str, Any])
def release_report(
    name: Annotated[ModelName, Path()], release: ReleasePath, st: State,
    variant: Annotated[Variant | None, Query(description="default: the only one, or int8-cpu")]
    = None,
) -> dict[str, Any]:  # fmt: skip
    """The accuracy gate's report stored at publish, with the reference distributions."""
    with st.db.session() as s:
        rows = queries.release_variants(s, name, release)
        chosen = choose_variant(name, release, [m.variant for m in rows], variant)
        report = get_report(s, name, release, chosen)
    if report is None:
        raise NotFoundError(
            f"model {name} release {release} variant {chosen} has no validation report "
            "(it was published without fp32 and validation)"
        )
    return report


@router.post("/assignments", response_model=AssignmentOut, status_code=201)
def assign(body: AssignmentIn, st: State) -> AssignmentOut:
    """Assign a published release to one device or to every device with a tag."""
    with st.db.session() as s:
        row = queries.create_assignment(s, body.name, body.release, body.device_id, body.tag)
        if row.target_kind == "device":
            push_queue.request(s, [row.target_value], "operator")
        else:  # expanded now: a device tagged later learns of it from its own check-in
            key, _, value = row.target_value.partition("=")
            push_queue.request_tag(s, key, value, "operator")
        out = AssignmentOut.model_validate(row)
    log.info("assigned %s@%s to %s %s", body.name, body.release, row.target_kind, row.target_value)
    return out


@router.post("/enrollment-tokens", response_model=TokenOut, status_code=201)
def create_token(st: State, body: Annotated[TokenIn | None, Body()] = None) -> TokenOut:
    """Create an enrollment token (shown once; only its hash is stored)."""
    body = body or TokenIn()
    with st.db.session() as s:
        token, row = queries.create_enrollment_token(s, body.max_uses, body.expires_in_s, body.note)
        return TokenOut(
            token=token, expires_at=row.expires_at, max_uses=row.max_uses, note=row.note
        )
