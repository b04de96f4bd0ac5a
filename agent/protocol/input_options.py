"""What an operator and a model file say about a model's input, combined into one contract.

Publish flags (``--input-range``, ``--mean``/``--std``, ``--resize``, ``--pad``,
``--crop``, ``--color``; the same names as REST form fields) are parsed here
from their text form, so the CLI, the REST upload and ``edgefleet-agent try``
read them alike. ``resolve_contract`` then combines them with what the model's
TFLite Metadata says: flags win, the metadata fills in, and an image model
whose pixel-to-value mapping neither states is refused. There is no default
mapping: a wrong one costs accuracy without any error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.common.errors import ProtocolError
from agent.protocol.input_contract import (
    COLOR_ORDERS,
    RESIZE_METHODS,
    InputContract,
    image_input_shape,
)

MAPPING_FLAGS = "--input-range LO,HI (e.g. 0,1 or -1,1) or --mean M[,M,M] with --std S[,S,S]"


def _floats(text: str, flag: str) -> tuple[float, ...]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ProtocolError(f"{flag} {text!r} is not a comma-separated list of numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise ProtocolError(f"{flag} {text!r} must hold finite numbers")
    return values


def parse_range(text: str) -> tuple[float, float]:
    values = _floats(text, "--input-range")
    if len(values) != 2 or not values[1] > values[0]:
        raise ProtocolError(f"--input-range {text!r} must be LO,HI with HI > LO, e.g. -1,1")
    return values[0], values[1]


@dataclass(frozen=True)
class ContractOptions:
    """The input choices an operator made; None means "not said"."""

    value_range: tuple[float, float] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: str | None = None
    pad: int | None = None
    crop: float | None = None
    color: str | None = None

    @classmethod
    def parse(
        cls,
        *,
        input_range: str | None = None,
        mean: str | None = None,
        std: str | None = None,
        resize: str | None = None,
        pad: str | int | None = None,
        crop: str | float | None = None,
        color: str | None = None,
    ) -> ContractOptions:
        """From flag or form-field text; ProtocolError names the flag that is wrong."""
        if input_range is not None and (mean is not None or std is not None):
            raise ProtocolError("give --input-range or --mean/--std, not both")
        if (mean is None) != (std is None):
            raise ProtocolError("--mean and --std go together")
        if resize is not None and resize not in RESIZE_METHODS:
            raise ProtocolError(f"--resize {resize!r} is not one of {', '.join(RESIZE_METHODS)}")
        if color is not None and color.upper() not in COLOR_ORDERS:
            raise ProtocolError(f"--color {color!r} must be RGB or BGR")
        return cls(
            value_range=None if input_range is None else parse_range(input_range),
            mean=None if mean is None else _floats(mean, "--mean"),
            std=None if std is None else _floats(std, "--std"),
            resize=resize,
            pad=None if pad is None else _pad(pad),
            crop=None if crop is None else _crop(crop),
            color=None if color is None else color.upper(),
        )

    @property
    def has_mapping(self) -> bool:
        return self.value_range is not None or self.mean is not None

    @property
    def empty(self) -> bool:
        return self == ContractOptions()


def _pad(value: str | int) -> int:
    try:
        pad = int(str(value).strip())
    except ValueError:
        raise ProtocolError(f"--pad {value!r} must be an integer 0..255") from None
    if not 0 <= pad <= 255:
        raise ProtocolError(f"--pad {value!r} must be an integer 0..255")
    return pad


def _crop(value: str | float) -> float:
    try:
        crop = float(str(value).strip())
    except ValueError:
        raise ProtocolError(f"--crop {value!r} must be a number in (0, 1]") from None
    if not 0.0 < crop <= 1.0:
        raise ProtocolError(f"--crop {value!r} must be a number in (0, 1]")
    return crop


@dataclass(frozen=True)
class MetadataHints:
    """What a model's TFLite Metadata says about its image input (all optional)."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    color_space: str | None = None  # "RGB", "GRAYSCALE" or None (UNKNOWN / absent)

    @property
    def has_mapping(self) -> bool:
        return self.mean is not None and self.std is not None


@dataclass(frozen=True)
class ResolvedInput:
    """The contract to sign (None for a non-image input) and where each part came from."""

    contract: InputContract | None
    notes: tuple[str, ...] = ()


def resolve_contract(
    options: ContractOptions, shape: tuple[int, ...] | list[int], hints: MetadataHints | None
) -> ResolvedInput:
    """Combine flags and metadata for an input of ``shape``; refuse when nothing maps pixels."""
    hints = hints or MetadataHints()
    dims = image_input_shape(shape)
    if dims is None:
        if not options.empty:
            raise ProtocolError(
                f"input shape {list(shape)} is not a 1xHxWxC image input with 1 or 3 channels "
                "(NHWC); input contract flags apply only to NHWC image inputs"
            )
        return ResolvedInput(None, (f"input {list(shape)} is not an image: no input contract",))
    height, width, channels = dims
    notes: list[str] = []
    mean = std = None
    value_range = options.value_range
    if options.has_mapping:
        if options.mean is not None:
            mean, std = options.mean, options.std
        if hints.has_mapping:
            notes.append(
                f"value mapping from the flags; they override the model's TFLite Metadata "
                f"normalization (mean {_fmt(hints.mean)} std {_fmt(hints.std)})"
            )
        else:
            notes.append("value mapping from the flags")
    elif hints.has_mapping:
        mean, std = hints.mean, hints.std
        notes.append(
            f"value mapping from the model's TFLite Metadata: mean {_fmt(mean)} std {_fmt(std)}"
        )
    else:
        raise ProtocolError(
            f"cannot tell how pixels map to input values for the image input {list(shape)}: "
            f"the model carries no TFLite Metadata normalization; give {MAPPING_FLAGS}"
        )
    color = options.color or "RGB"
    if options.color is None and hints.color_space is not None:
        notes.append(f"colour space {hints.color_space} from the model's TFLite Metadata")
    if hints.color_space == "GRAYSCALE" and channels != 1:
        notes.append(f"TFLite Metadata says GRAYSCALE but the input has {channels} channels")
    resize = options.resize or "bilinear"
    if options.pad is not None and resize != "letterbox":
        raise ProtocolError("--pad applies only to --resize letterbox")
    try:
        contract = InputContract(
            height, width, channels, resize=resize, pad=options.pad or 0,
            crop=1.0 if options.crop is None else options.crop, color=color,
            value_range=value_range, mean=mean, std=std,
        )  # fmt: skip
    except ProtocolError as err:
        raise ProtocolError(str(err).replace("input contract: ", "", 1)) from err
    return ResolvedInput(contract, (f"input contract: {contract.describe()}", *notes))


def _fmt(values: tuple[float, ...] | None) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values or ()) + "]"
