"""Calibration and validation sets, labels and the input contract, checked before any work.

Sets are camera-space ``.npz`` files (docs/data-sets.md): ``x`` uint8 images
N x H x W x 3 RGB at any size, ``y`` integer class ids (a calibration set may
leave ``y`` out). Every check names the file and what is wrong in one line,
because ``edgefleet model quantize|validate`` turn these errors into exit 2.
Images then go through the release's input contract once, to the model's
size (``model_pixels``, the device's steps 1-4); each model evaluated then
maps them with its own value table (``ModelInput``, the device's step 5).
Preprocessor has no entry point for pixels already at the model's size (it
would crop or letterbox them again), so the table is applied here directly.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.common.errors import AgentError
from agent.inference.classifier import load_labels
from agent.inference.preprocess import Preprocessor
from agent.inference.runtime import TensorDetails
from agent.inference.value_tables import tensor_tables
from agent.protocol.input_contract import InputContract
from agent.protocol.input_options import ContractOptions
from agent.protocol.manifest import TensorSpec
from server.errors import InvalidInputError
from server.publish.pixel_contract import resolve_input

MAX_SIDE = 4096
MAX_PIXEL_BYTES = 2 * 1024**3  # decoded x; a set larger than this is sampled down first


@dataclass(frozen=True)
class LabelledSet:
    role: str  # "calibration" or "validation"
    path: Path
    x: npt.NDArray[np.uint8]
    y: npt.NDArray[np.int64] | None  # None only for a calibration set without labels

    def __len__(self) -> int:
        return len(self.x)


def _header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    with zf.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(shape), dtype


def load_set(path: Path, role: str, classes: int, need_labels: bool = True) -> LabelledSet:
    """Read and check a camera-space set; InvalidInputError names the file and the fault."""
    what = f"{role} set {path}"
    if not path.is_file():
        raise InvalidInputError(f"{what} does not exist")
    try:
        data = path.read_bytes()
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            if "x" not in members or (need_labels and "y" not in members):
                found = ", ".join(sorted(members)) or "none"
                raise InvalidInputError(
                    f"{what} needs arrays x (uint8 N x H x W x 3) and y (class ids); has: {found}"
                )
            x_shape, x_dtype = _header(zf, members["x"])
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise InvalidInputError(f"{what} is not an .npz file: {err}") from err
    if x_dtype != np.uint8 or len(x_shape) != 4 or x_shape[3] != 3 or min(x_shape) < 1:
        raise InvalidInputError(
            f"{what}: x is {x_dtype} {list(x_shape)}; it must be uint8 camera-space RGB images "
            "N x H x W x 3"
        )
    if max(x_shape[1:3]) > MAX_SIDE or int(np.prod(x_shape, dtype=np.int64)) > MAX_PIXEL_BYTES:
        raise InvalidInputError(f"{what}: x {list(x_shape)} is too large")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            x = np.ascontiguousarray(npz["x"])
            y = np.asarray(npz["y"]) if "y" in members else None
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"{what} cannot be read: {err}") from err
    if y is None:
        return LabelledSet(role, path, x, None)
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
        raise InvalidInputError(
            f"{what}: y is {y.dtype} {list(y.shape)}; it must hold one integer class id per "
            f"image ({len(x)})"
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise InvalidInputError(
            f"{what}: class ids must be 0..{classes - 1} for a model with {classes} classes; "
            f"found {int(y.min())}..{int(y.max())}"
        )
    return LabelledSet(role, path, x, y.astype(np.int64))


def read_labels(path: Path, classes: int) -> tuple[str, ...]:
    """The labels file, which must name every output class of the model."""
    if not path.is_file():
        raise InvalidInputError(f"labels file {path} does not exist")
    try:
        labels = load_labels(path)
    except AgentError as err:
        raise InvalidInputError(str(err)) from err
    if len(labels) != classes:
        raise InvalidInputError(
            f"labels file {path} has {len(labels)} labels; the model has {classes} output classes"
        )
    return labels


def resolve(models: list[Path], spec: TensorSpec, options: ContractOptions) -> InputContract:
    """The contract from flags, else the first of ``models`` whose TFLite Metadata says one."""
    first: InvalidInputError | None = None
    for model in models:
        try:
            contract = resolve_input(model, spec, options).contract
        except InvalidInputError as err:
            first = first or err
            continue
        if contract is None:
            raise InvalidInputError(
                f"model {model} input {list(spec.shape)} is not an image; quantize and validate "
                "take image classifiers"
            )
        return contract
    assert first is not None
    raise first


def model_pixels(contract: InputContract, tensor: TensorDetails, x: npt.NDArray[np.uint8]) -> (
    npt.NDArray[np.uint8]
):  # fmt: skip
    """Steps 1-4 of the device's preprocessing for every image: N x h x w x c uint8."""
    pre = Preprocessor(contract, tensor)
    out = np.empty((len(x), contract.height, contract.width, contract.channels), np.uint8)
    for i, frame in enumerate(x):
        out[i] = pre.pixels(frame)  # copied: pixels() may return a buffer it reuses
    return out


class ModelInput:
    """The device's value mapping into one model's input tensor, for pixels at its size."""

    def __init__(self, contract: InputContract, tensor: TensorDetails) -> None:
        self.tables = tensor_tables(contract, tensor)  # (channels, 256) in the tensor's dtype
        self.shape = (1, contract.height, contract.width, contract.channels)
        self._shared = bool(np.all(self.tables == self.tables[0]))

    def tensor(self, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[Any]:
        out = np.empty(self.shape, self.tables.dtype)
        if self._shared:
            np.take(self.tables[0], pixels, out=out[0])
        else:
            for c, table in enumerate(self.tables):
                np.take(table, pixels[..., c], out=out[0, ..., c])
        return out
