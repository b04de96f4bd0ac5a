"""Publishing a model: validate the .tflite, record its golden output, sign it as a TUF target.

Everything except ``publish_model`` is free of repository IO, so the CLI and
the REST handler share one code path and tests can check each step apart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.common.errors import ProtocolError
from agent.inference.smoke_vector import compare_golden, default_tolerance, golden_input_array
from agent.protocol.input_options import ContractOptions
from agent.protocol.manifest import (
    VARIANTS,
    Golden,
    ModelManifest,
    TensorSpec,
    check_name,
    model_target_path,
)
from server.errors import ConflictError, InvalidInputError, ModelValidationError
from server.publish.pixel_contract import resolve_input
from server.publish.quantize_graph import Graph
from server.publish.tuf_repo import TufRepository

logger = logging.getLogger(__name__)

TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier at bytes 4..8
MAX_MODEL_BYTES = 512 * 1024 * 1024
MAX_LABELS_BYTES = 1024 * 1024
# Variant -> (Graph.integer_problems variant, float ops allowed inside). CPU-side delegates run
# the quantizer's mixed precision (integer input and output, some float ops); the Edge TPU
# runs int8 only. fp32 takes any model.
INTEGER_VARIANTS = {
    "int8-cpu": ("int8-cpu", True), "int8-xnnpack": ("int8-cpu", True),
    "int8-gpu": ("int8-cpu", True), "edgetpu": ("int8-edgetpu", False),
}  # fmt: skip
_SHOWN_PROBLEMS = 4


def _interpreter(path: Path, num_threads: int = 1) -> Any:
    """A LiteRT interpreter with tensors allocated, or ModelValidationError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as err:
        raise ModelValidationError(f"cannot read model {path}: {err}") from err
    if size > MAX_MODEL_BYTES:
        raise ModelValidationError(f"{path} is {size} bytes, over the {MAX_MODEL_BYTES} limit")
    if len(head) < 8 or head[4:8] != TFLITE_IDENTIFIER:
        raise ModelValidationError(f"{path} is not a .tflite model (no TFL3 file identifier)")
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 - heavy, server-only

    try:
        interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        raise ModelValidationError(f"LiteRT cannot load {path}: {err}") from err
    return interpreter


def _spec(detail: dict[str, Any]) -> TensorSpec:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorSpec(
        name=str(detail["name"]),
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name,
        scale=float(scale),
        zero_point=int(zero_point),
    )


def _specs(interpreter: Any, path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    inputs = tuple(_spec(d) for d in interpreter.get_input_details())
    outputs = tuple(_spec(d) for d in interpreter.get_output_details())
    if len(inputs) != 1:
        raise ModelValidationError(f"{path} has {len(inputs)} inputs; exactly one is supported")
    if not outputs:
        raise ModelValidationError(f"{path} has no outputs")
    try:
        default_tolerance(inputs[0].dtype)
        default_tolerance(outputs[0].dtype)
    except ProtocolError as err:
        raise ModelValidationError(f"{path}: {err}") from err
    return inputs, outputs


def inspect_model(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The model's (inputs, outputs) signature; ModelValidationError if unusable."""
    return _specs(_interpreter(path), Path(path))


def _run_golden(interpreter: Any, seed: str) -> bytes:
    detail = interpreter.get_input_details()[0]
    spec = _spec(detail)
    interpreter.set_tensor(detail["index"], golden_input_array(seed, spec.shape, spec.dtype))
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    return bytes(np.ascontiguousarray(out).astype(out.dtype.newbyteorder("<")).tobytes())


def _golden(interpreter: Any, path: Path, seed: str, output_dtype: str) -> Golden:
    try:
        output = _run_golden(interpreter, seed)
    except (ValueError, RuntimeError) as err:
        raise ModelValidationError(f"{path} fails to run on the golden input: {err}") from err
    return Golden(
        seed=seed,
        output_b64=base64.b64encode(output).decode("ascii"),
        tolerance=default_tolerance(output_dtype),
    )


def make_golden(path: Path, seed: str) -> Golden:
    """Run the seed's input through the model; record output 0 (agent.inference.smoke_vector)."""
    interpreter = _interpreter(path)
    _, outputs = _specs(interpreter, Path(path))
    return _golden(interpreter, Path(path), seed, outputs[0].dtype)


def check_golden(model_path: Path, manifest: ModelManifest, num_threads: int = 1) -> None:
    """Raise ModelValidationError unless the model reproduces the manifest's golden output."""
    interpreter = _interpreter(model_path, num_threads)
    try:
        actual = _run_golden(interpreter, manifest.golden.seed)
    except (ValueError, RuntimeError) as err:
        raise ModelValidationError(f"{model_path} fails on the golden input: {err}") from err
    dtype = manifest.outputs[0].dtype
    reason = compare_golden(manifest.golden.output, actual, dtype, manifest.golden.tolerance)
    if reason is not None:
        raise ModelValidationError(f"{model_path} golden mismatch: {reason}")


def check_variant(path: Path, variant: str) -> None:
    """Refuse a file whose tensors are not integer where an INT8 ``variant`` needs them."""
    need = INTEGER_VARIANTS.get(variant)
    if need is None:
        return
    problems = Graph.read(Path(path)).integer_problems(*need)
    if problems:
        more = len(problems) - _SHOWN_PROBLEMS
        shown = "; ".join(problems[:_SHOWN_PROBLEMS]) + (f" (and {more} more)" if more > 0 else "")
        raise ModelValidationError(
            f"{path} is not integer where variant {variant} needs it: {shown}; publish a float "
            "model as variant fp32"
        )


def _file_digest(path: Path) -> tuple[int, str]:
    digest, length = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
            length += len(chunk)
    return length, digest.hexdigest()


def load_labels(path: Path) -> tuple[str, ...]:
    """Labels from a text file (one per line) or a JSON list of strings."""
    try:
        raw = Path(path).read_bytes()[: MAX_LABELS_BYTES + 1]
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"cannot read labels file {path}: {err}") from err
    if len(raw) > MAX_LABELS_BYTES:
        raise InvalidInputError(f"labels file {path} exceeds {MAX_LABELS_BYTES} bytes")
    if text.lstrip().startswith("["):
        try:
            labels = json.loads(text)
        except ValueError as err:
            raise InvalidInputError(f"labels file {path} is not valid JSON: {err}") from err
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InvalidInputError(f"labels file {path} must be a JSON list of strings")
        return tuple(labels)
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def build_manifest(  # noqa: PLR0917 - the signature the CLI and API use
    path: Path,
    name: str,
    release: int,
    variant: str,
    labels: Sequence[str] = (),
    fp32_length: int | None = None,
    extra: Mapping[str, Any] | None = None,
    input_options: ContractOptions | None = None,
) -> ModelManifest:
    """Everything the device needs to trust, smoke-test and feed this model file.

    ``input_options`` are the publish flags for the input contract; an image
    model is refused unless they or its TFLite Metadata map pixels to values.
    """
    try:
        check_name(name)
    except ProtocolError as err:
        raise InvalidInputError(str(err)) from err
    if isinstance(release, bool) or not isinstance(release, int) or release < 1:
        raise InvalidInputError(f"release must be a positive integer, got {release!r}")
    if variant not in VARIANTS:
        raise InvalidInputError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if fp32_length is not None and fp32_length < 1:
        raise InvalidInputError("fp32_length must be positive")
    interpreter = _interpreter(path)
    inputs, outputs = _specs(interpreter, Path(path))
    check_variant(Path(path), variant)
    classes = outputs[0].shape[-1] if outputs[0].shape else 1
    if labels and len(labels) != classes:
        raise ModelValidationError(f"{len(labels)} labels given but output 0 has {classes} classes")
    contract = resolve_input(Path(path), inputs[0], input_options or ContractOptions()).contract
    length, sha256 = _file_digest(Path(path))
    return ModelManifest(
        name=name,
        release=release,
        variant=variant,
        sha256=sha256,
        length=length,
        inputs=inputs,
        outputs=outputs,
        golden=_golden(interpreter, Path(path), f"{name}/{release}/{variant}", outputs[0].dtype),
        labels=tuple(labels),
        fp32_length=fp32_length,
        extra=dict(extra or {}),
        input=contract,
    )


def publish_model(  # noqa: PLR0917 - the signature the CLI and API use
    repo: TufRepository,
    path: Path,
    name: str,
    release: int,
    variant: str,
    labels: Sequence[str] = (),
    fp32_length: int | None = None,
    extra: Mapping[str, Any] | None = None,
    input_options: ContractOptions | None = None,
) -> ModelManifest:
    """Validate, sign and store a model release. Re-publishing identical bytes is a no-op."""
    manifest = build_manifest(
        path, name, release, variant, labels=labels, fp32_length=fp32_length, extra=extra,
        input_options=input_options,
    )  # fmt: skip
    target = model_target_path(name, release, variant)
    existing = repo.targets().get(target)
    if existing is not None:
        if existing.sha256 == manifest.sha256:
            logger.info("%s is already published with the same bytes", target)
            return ModelManifest.from_custom(existing.custom)
        raise ConflictError(
            f"{name} release {release} ({variant}) is already published with other bytes; "
            "publish a new release instead"
        )
    info = repo.add_target(target, Path(path), manifest.to_custom())
    if info.sha256 != manifest.sha256:
        # The file changed between validation and copy: never sign unvalidated bytes.
        repo.remove_target(target)
        raise ModelValidationError(f"{path} changed while it was being published")
    logger.info("published %s (%d bytes, sha256 %s)", target, manifest.length, manifest.sha256)
    return manifest
