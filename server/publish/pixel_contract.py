"""The input contract a release is signed with: from publish flags, or the model's metadata.

``resolve_input`` is the one place that decides how camera pixels map to a
model's input values at publish time. Flags win over the model's TFLite
Metadata, and an image model that neither describes is refused with a message
naming the flags: a wrong mapping costs accuracy silently, so there is no default.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.common.errors import ModelError, ProtocolError
from agent.inference.model_metadata import read_metadata
from agent.protocol.input_options import ContractOptions, ResolvedInput, resolve_contract
from agent.protocol.manifest import TensorSpec
from server.errors import InvalidInputError, ModelValidationError

log = logging.getLogger(__name__)

IMAGE_DTYPES = ("int8", "uint8", "float32")  # what a uint8 frame can be mapped into


def resolve_input(model: Path, spec: TensorSpec, options: ContractOptions) -> ResolvedInput:
    """The contract for ``model``'s input ``spec`` and where it came from, or a 4xx error."""
    try:
        hints = read_metadata(model)
    except ModelError as err:
        raise ModelValidationError(str(err)) from err
    try:
        resolved = resolve_contract(options, spec.shape, hints)
    except ProtocolError as err:
        raise InvalidInputError(str(err)) from err
    if resolved.contract is not None and spec.dtype not in IMAGE_DTYPES:
        raise ModelValidationError(
            f"image input {spec.name!r} is {spec.dtype}; camera frames can be mapped only into "
            f"{', '.join(IMAGE_DTYPES)} inputs"
        )
    notes = resolved.notes
    if hints is None:
        notes = (*notes, "the model carries no TFLite Metadata")
    for note in notes:
        log.info("%s: %s", model.name, note)
    return ResolvedInput(resolved.contract, notes)
