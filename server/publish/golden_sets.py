"""Publishing a release's golden set: validate, score as a reference, sign as a TUF target.

The set is scored on the server with LiteRT before anything is signed, through
the release's own input contract (the device's preprocessing code); a model
that misses its own minimum is refused, so a release can never ship a gate it
already fails. Devices then re-score it on their own runtime and delegate.
The format is in docs/data-sets.md.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.common.errors import AgentError
from agent.inference.preprocess import Preprocessor
from agent.inference.runtime import load_model
from agent.inference.scoring import GoldenSetSpec, evaluate, load_set
from agent.protocol.input_contract import InputContract
from server.errors import InvalidInputError, ModelValidationError
from server.publish.tuf_repo import TufRepository

log = logging.getLogger(__name__)

MAX_GOLDEN_SET_BYTES = 64 * 1024 * 1024


def golden_set_path(name: str, digest: str) -> str:
    """Content-addressed: a set unchanged between releases is one target, so devices that
    already hold it (by hash) download nothing."""
    return f"golden/{name}/sha256-{digest}.npz"


def prepare_golden_set(
    repo: TufRepository,
    model_path: Path,
    npz_path: Path,
    *,
    name: str,
    release: int,
    variant: str,
    labels: Sequence[str],
    min_accuracy: float,
    contract: InputContract | None,
) -> dict[str, Any]:
    """Sign the set and return the manifest ``extra`` that points devices at it."""
    if not 0.0 <= min_accuracy <= 1.0:
        raise InvalidInputError("min_accuracy must be between 0 and 1")
    if contract is None:
        raise InvalidInputError(
            "a golden set needs an image model (1xHxWxC input) with an input contract"
        )
    size = npz_path.stat().st_size
    if size > MAX_GOLDEN_SET_BYTES:
        raise InvalidInputError(f"golden set is {size} bytes; the limit is {MAX_GOLDEN_SET_BYTES}")
    try:
        model = load_model(model_path, "litert", num_threads=2)
    except AgentError as err:
        raise ModelValidationError(f"model does not load: {err}") from err
    try:
        preprocess = Preprocessor(contract, model.input)
    except AgentError as err:
        model.close()
        raise ModelValidationError(f"input contract does not fit the model: {err}") from err
    try:
        classes = int(np.prod(model.output.shape))
        x, y = load_set(npz_path.read_bytes(), model.input.shape, classes)
        result = evaluate(model, tuple(labels), x, y, preprocess)
    except AgentError as err:
        raise InvalidInputError(f"golden set rejected: {err}") from err
    finally:
        model.close()
    if result.accuracy < min_accuracy:
        raise ModelValidationError(
            f"the model scores {result.accuracy:.4f} on its own golden set, below the "
            f"minimum {min_accuracy:.4f} it declares; refusing to publish"
        )
    path = golden_set_path(name, hashlib.sha256(npz_path.read_bytes()).hexdigest())
    repo.add_target(path, npz_path, {"kind": "golden_set", "name": name, "release": release})
    spec = GoldenSetSpec(path, min_accuracy, result.count, round(result.accuracy, 6))
    log.info(
        "golden set for %s@%s: %d samples, reference accuracy %.4f (minimum %.4f)",
        name, release, result.count, result.accuracy, min_accuracy,
    )  # fmt: skip
    return {"golden_set": spec.to_extra()}
