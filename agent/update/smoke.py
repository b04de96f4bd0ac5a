"""Smoke test of a freshly installed model, before it is switched in.

The candidate is loaded with the device's real runtime and delegate; its
signature must match what the signed manifest declares, its input contract
(if the release carries one) must fit its input tensor, and the golden input
(regenerated from the manifest's seed) must reproduce the golden output
within tolerance. Any failure is a ``SmokeTestError`` and the update rolls back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.common.errors import AgentError, SmokeTestError
from agent.inference.preprocess import Preprocessor, preprocessor_for
from agent.inference.runtime import Model, TensorDetails, load_model
from agent.inference.scoring import GoldenSetResult, GoldenSetSpec, evaluate_file
from agent.inference.smoke_vector import compare_golden, golden_input_array
from agent.protocol.manifest import ModelManifest, TensorSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeChoice:
    """How this board runs models (from its firmware profile and config)."""

    runtime: str = "auto"
    num_threads: int = 1
    delegate: str | None = None
    delegate_device: str = ""

    def load(self, path: Path) -> Model:
        return load_model(path, self.runtime, self.num_threads, self.delegate, self.delegate_device)


def signature_problem(
    declared: tuple[TensorSpec, ...], actual: tuple[TensorDetails, ...], what: str
) -> str | None:
    """Why a model's tensors differ from the manifest's, or None."""
    if len(declared) != len(actual):
        return f"model has {len(actual)} {what}s, manifest declares {len(declared)}"
    for want, got in zip(declared, actual, strict=True):
        if tuple(want.shape) != got.shape or want.dtype != got.dtype:
            return (
                f"{what} {got.name!r} is {got.dtype}{list(got.shape)}, "
                f"manifest declares {want.dtype}{list(want.shape)}"
            )
    return None


def contract_problem(manifest: ModelManifest, model: Model) -> str | None:
    """Why the release's input contract cannot drive this model's input, or None."""
    assert manifest.input is not None
    try:
        Preprocessor(manifest.input, model.input)
    except AgentError as err:
        return f"input contract does not fit the model: {err}"
    return None


def run_golden(model: Model, manifest: ModelManifest) -> str | None:
    inp, out = model.input, model.output
    x = golden_input_array(manifest.golden.seed, inp.shape, inp.dtype)
    y = np.ascontiguousarray(model.invoke_raw(x))
    return compare_golden(manifest.golden.output, y.tobytes(), out.dtype, manifest.golden.tolerance)


def smoke_test(path: Path, manifest: ModelManifest, choice: RuntimeChoice) -> None:
    try:
        model = choice.load(path)
    except AgentError as err:
        raise SmokeTestError(f"model does not load: {err}") from err
    try:
        problem = signature_problem(
            manifest.inputs, model.input_details, "input"
        ) or signature_problem(manifest.outputs, model.output_details, "output")
        if problem is None and manifest.input is not None:
            problem = contract_problem(manifest, model)
        if problem is None:
            problem = run_golden(model, manifest)
    except AgentError as err:
        problem = f"golden inference failed: {err}"
    finally:
        model.close()
    if problem:
        raise SmokeTestError(problem)
    log.info("smoke test passed for %s release %s", manifest.name, manifest.release)


FetchAux = Callable[[str, Path], Path]


def score_golden_set(
    path: Path,
    manifest: ModelManifest,
    choice: RuntimeChoice,
    fetch: FetchAux,
    workdir: Path,
    *,
    legacy_range: tuple[float, float] = (0.0, 1.0),
) -> tuple[GoldenSetSpec, GoldenSetResult] | None:
    """Score the release's golden set on this device's runtime, if the release ships one.

    Its images go through the release's own input contract (or, for a release
    without one, the same fallback the inference loop uses), so the score covers
    the whole pixel path.
    """
    try:
        spec = GoldenSetSpec.from_extra(manifest.extra)
    except AgentError as err:
        raise SmokeTestError(f"golden set declaration invalid: {err}") from err
    if spec is None:
        return None
    npz = fetch(spec.path, workdir / "golden_set.npz")
    try:
        model = choice.load(path)
        try:
            preprocess = preprocessor_for(manifest.input, model.input, legacy_range)
            result = evaluate_file(model, manifest.labels, npz, preprocess)
        finally:
            model.close()
    except AgentError as err:
        raise SmokeTestError(f"golden set could not be scored: {err}") from err
    finally:
        npz.unlink(missing_ok=True)
    log.info(
        "golden set: accuracy %.4f on %d samples (minimum %.4f)",
        result.accuracy, result.count, spec.min_accuracy,
    )  # fmt: skip
    return spec, result


def golden_set_problem(spec: GoldenSetSpec, result: GoldenSetResult) -> str | None:
    if result.accuracy < spec.min_accuracy:
        return (
            f"golden-set accuracy {result.accuracy:.4f} is below the release minimum "
            f"{spec.min_accuracy:.4f} ({result.count} samples)"
        )
    return None
