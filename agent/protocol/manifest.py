"""The ``custom`` field of TUF targets: what a model or delta target claims.

Parsing is strict: a manifest that is missing a field or has one of the wrong
type is rejected before any byte of the target is trusted.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.common.errors import ProtocolError
from agent.protocol.input_contract import InputContract

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VARIANTS = ("int8-cpu", "int8-xnnpack", "edgetpu", "int8-gpu", "fp32")


def _req(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise ProtocolError(f"manifest field {key!r} is missing")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"manifest field {key!r} has the wrong type")
    return value


def check_sha256(value: str, what: str = "sha256") -> str:
    if not _SHA256.match(value):
        raise ProtocolError(f"{what} is not a lowercase hex sha256")
    return value


def check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ProtocolError(f"model name {value!r} must match {_NAME.pattern}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0

    @classmethod
    def from_dict(cls, data: Any) -> TensorSpec:
        if not isinstance(data, dict):
            raise ProtocolError("tensor spec must be an object")
        shape = _req(data, "shape", list)
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ProtocolError("tensor shape must be a list of integers")
        return cls(
            name=_req(data, "name", str),
            shape=tuple(shape),
            dtype=_req(data, "dtype", str),
            scale=float(_req(data, "scale", (int, float))),
            zero_point=int(_req(data, "zero_point", int)),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


def golden_input_bytes(seed: str, length: int) -> bytes:
    """Deterministic pseudo-random input, identical on every platform forever.

    SHA-256 in counter mode rather than a numpy generator, whose streams are
    not promised to stay stable across numpy releases.
    """
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:length])


@dataclass(frozen=True)
class Golden:
    """A smoke test: the input regenerated from ``seed`` must give ``output``."""

    seed: str
    output_b64: str
    tolerance: int = 2

    @property
    def output(self) -> bytes:
        return base64.b64decode(self.output_b64, validate=True)

    @classmethod
    def from_dict(cls, data: Any) -> Golden:
        if not isinstance(data, dict):
            raise ProtocolError("golden must be an object")
        golden = cls(
            seed=_req(data, "seed", str),
            output_b64=_req(data, "output_b64", str),
            tolerance=int(_req(data, "tolerance", int)),
        )
        try:
            golden.output  # noqa: B018 - validates the encoding eagerly
        except ValueError as err:
            raise ProtocolError("golden output is not valid base64") from err
        return golden


@dataclass(frozen=True)
class ModelManifest:
    """What the server signs about one model artifact."""

    name: str
    release: int
    variant: str
    sha256: str
    length: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    golden: Golden
    labels: tuple[str, ...] = ()
    min_agent_version: str = "0.1.0"
    fp32_length: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # How camera pixels become input 0; None in releases published before contracts existed.
    input: InputContract | None = None

    kind = "model"

    def to_custom(self) -> dict[str, Any]:
        custom: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "release": self.release,
            "variant": self.variant,
            "sha256": self.sha256,
            "length": self.length,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "golden": asdict(self.golden),
            "labels": list(self.labels),
            "min_agent_version": self.min_agent_version,
            "fp32_length": self.fp32_length,
            "extra": dict(self.extra),
        }
        if self.input is not None:
            custom["input"] = self.input.to_dict()
        return custom

    @classmethod
    def from_custom(cls, data: Any) -> ModelManifest:
        if not isinstance(data, dict) or data.get("kind") != cls.kind:
            raise ProtocolError("target custom field is not a model manifest")
        release = _req(data, "release", int)
        length = _req(data, "length", int)
        if release < 1 or length < 1:
            raise ProtocolError("release and length must be positive")
        variant = _req(data, "variant", str)
        if variant not in VARIANTS:
            raise ProtocolError(f"unknown variant {variant!r}")
        fp32 = data.get("fp32_length")
        if fp32 is not None and (not isinstance(fp32, int) or fp32 < 1):
            raise ProtocolError("fp32_length must be a positive integer or null")
        labels = data.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ProtocolError("labels must be a list of strings")
        extra = data.get("extra", {})
        if not isinstance(extra, dict):
            raise ProtocolError("extra must be an object")
        inputs = tuple(TensorSpec.from_dict(t) for t in _req(data, "inputs", list))
        contract = _contract(data.get("input"), inputs)
        return cls(
            name=check_name(_req(data, "name", str)),
            release=release,
            variant=variant,
            sha256=check_sha256(_req(data, "sha256", str)),
            length=length,
            inputs=inputs,
            outputs=tuple(TensorSpec.from_dict(t) for t in _req(data, "outputs", list)),
            golden=Golden.from_dict(_req(data, "golden", dict)),
            labels=tuple(labels),
            min_agent_version=_req(data, "min_agent_version", str),
            fp32_length=fp32,
            extra=extra,
            input=contract,
        )


def _contract(raw: Any, inputs: tuple[TensorSpec, ...]) -> InputContract | None:
    """The manifest's input contract, which must describe input 0's own shape."""
    if raw is None:
        return None
    contract = InputContract.from_dict(raw)
    want = (1, contract.height, contract.width, contract.channels)
    if not inputs or tuple(inputs[0].shape) != want:
        got = list(inputs[0].shape) if inputs else "no input"
        raise ProtocolError(f"input contract is for {list(want)} but input 0 is {got}")
    return contract


def release_target_prefix(name: str, release: int) -> str:
    """What every variant's target path of one release starts with."""
    return f"models/{check_name(name)}/{release}/"


def model_target_path(name: str, release: int, variant: str) -> str:
    return f"{release_target_prefix(name, release)}{variant}.tflite"


# Delta format versions a target path can name (docs/delta-format.md). Version 1 keeps
# the path every deployed agent asks for; version 2 (ANS) sits beside it, for devices
# that can decode it (constriction installed).
DELTA_FORMAT_VERSIONS = (1, 2)


def delta_target_path(
    name: str, release: int, variant: str, base_sha256: str, format_version: int = 1
) -> str:
    """Where the delta from ``base_sha256`` to a release is signed, per format version."""
    if format_version not in DELTA_FORMAT_VERSIONS:
        raise ProtocolError(f"unknown delta format version {format_version}")
    suffix = ".efd" if format_version == 1 else f".v{format_version}.efd"
    return f"deltas/{check_name(name)}/{release}/{variant}/{check_sha256(base_sha256)}{suffix}"


@dataclass(frozen=True)
class DeltaManifest:
    """What the server signs about one delta: which base it patches into which target."""

    name: str
    release: int
    variant: str
    base_sha256: str
    target_sha256: str
    target_length: int
    target_path: str
    # The patch's format version (its header's): what a device needs to decode it.
    format_version: int = 1

    kind = "delta"

    def to_custom(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_custom(cls, data: Any) -> DeltaManifest:
        if not isinstance(data, dict) or data.get("kind") != cls.kind:
            raise ProtocolError("target custom field is not a delta manifest")
        length = _req(data, "target_length", int)
        if length < 1:
            raise ProtocolError("target_length must be positive")
        return cls(
            name=check_name(_req(data, "name", str)),
            release=_req(data, "release", int),
            variant=_req(data, "variant", str),
            base_sha256=check_sha256(_req(data, "base_sha256", str), "base_sha256"),
            target_sha256=check_sha256(_req(data, "target_sha256", str), "target_sha256"),
            target_length=length,
            target_path=_req(data, "target_path", str),
            format_version=_format_version(data.get("format_version", 1)),
        )


def _format_version(value: Any) -> int:
    """Deltas signed before version 2 existed carry no version: they are version 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ProtocolError("delta format_version must be a positive integer")
    return value
