"""The publish workflow: one release from spooled upload to signed targets and deltas.

The HTTP handler parses and spools the upload, then hands it here. Nothing is
signed or stored until every check has passed, so a failure leaves nothing
half-published:

1. refuse a release that already exists;
2. refuse a file that is not integer where its INT8 variant needs it;
3. decide the input contract (flags, else the model's TFLite Metadata, else refuse);
4. with an FP32 original and a validation set, run the accuracy gate through that
   contract (``server.publish.publish_gate``); a refusal without an override ends here.
   These steps only read the uploads, so they run outside the publish lock: scoring a
   large set must not hold up other publishes. The rest runs under the lock:
5. refuse an existing release again (one may have been published meanwhile);
6. score the golden set (if any) through the contract as the release's reference, sign it;
7. validate the model, record its golden output and sign it as a TUF target;
8. record the release, and the gate's report if any, in the database, and in the
   same transaction queue one delta job per base the fleet runs
   (``server.publish.delta_jobs``). The background worker builds and signs them
   (``server.publish.delta_worker``): publish returns once the full file is signed,
   and until a delta is signed, devices on its base download the full file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.protocol.input_options import ContractOptions
from agent.protocol.manifest import ModelManifest
from server.db import queries
from server.db.tables import Database, Model
from server.errors import ConflictError
from server.publish import delta_jobs
from server.publish.deltas import BuiltDelta, choose_bases, fleet_bases
from server.publish.golden_sets import prepare_golden_set
from server.publish.pixel_contract import resolve_input
from server.publish.publish_gate import GateRequest, run_gate
from server.publish.registry import check_variant, inspect_model, publish_model
from server.publish.reports import GateSummary, add_report
from server.publish.tuf_repo import TufRepository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishRequest:
    """A release to publish; ``model`` and ``golden_set`` are local files (spooled uploads)."""

    model: Path
    name: str
    release: int
    variant: str
    labels: Sequence[str]
    fp32_length: int | None = None
    golden_set: Path | None = None
    min_accuracy: float | None = None
    input_options: ContractOptions = field(default_factory=ContractOptions)
    gate: GateRequest | None = None


@dataclass(frozen=True)
class PublishResult:
    manifest: ModelManifest
    row: Model
    delta_jobs: list[dict[str, Any]]  # queued, one per base (``delta_jobs.job_json``)
    deltas: list[BuiltDelta] = field(default_factory=list)  # none is built in the request
    notes: tuple[str, ...] = ()  # where the input contract came from
    gate: GateSummary | None = None


class Publisher:
    """Publishes releases into one TUF repository and database, one at a time."""

    def __init__(
        self, repo: TufRepository, db: Database, lock: AbstractContextManager[Any]
    ) -> None:
        self.repo = repo
        self.db = db
        self.lock = lock

    def _refuse_existing(self, req: PublishRequest) -> None:
        with self.db.session() as s:
            if queries.model_exists(s, req.name, req.release, req.variant):
                raise ConflictError(
                    f"model {req.name} release {req.release} variant {req.variant} "
                    "is already published"
                )

    def publish(self, req: PublishRequest) -> PublishResult:
        self._refuse_existing(req)
        inputs, _ = inspect_model(req.model)
        check_variant(req.model, req.variant)
        resolved = resolve_input(req.model, inputs[0], req.input_options)
        gate = None
        if req.gate is not None:
            gate = run_gate(
                req.model, req.gate, contract=resolved.contract, labels=req.labels,
                variant=req.variant, what=f"{req.name}@{req.release} {req.variant}",
            )  # fmt: skip
        with self.lock:
            self._refuse_existing(req)
            extra = None
            if req.golden_set is not None and req.min_accuracy is not None:
                extra = prepare_golden_set(
                    self.repo, req.model, req.golden_set, name=req.name, release=req.release,
                    variant=req.variant, labels=list(req.labels), min_accuracy=req.min_accuracy,
                    contract=resolved.contract,
                )  # fmt: skip
            manifest = publish_model(
                self.repo, req.model, req.name, req.release, req.variant,
                labels=list(req.labels), fp32_length=req.fp32_length, extra=extra,
                input_options=req.input_options,
            )  # fmt: skip
            with self.db.session() as s:
                row = queries.add_model(s, manifest)
                if gate is not None:
                    release = {"name": manifest.name, "release": manifest.release,
                               "variant": manifest.variant, "sha256": manifest.sha256,
                               "length": manifest.length}  # fmt: skip
                    report = {**gate.report, "release": release}
                    add_report(s, req.name, req.release, req.variant, report=report,
                               summary=gate.summary)  # fmt: skip
                published, installed = fleet_bases(s, manifest)
                bases = choose_bases(manifest, published, installed)
                jobs = [delta_jobs.job_json(j) for j in delta_jobs.enqueue(s, manifest, bases)]
        log.info(
            "published model %s@%s %s (%s bytes, %d deltas queued)",
            req.name, req.release, req.variant, manifest.length, len(jobs),
        )  # fmt: skip
        return PublishResult(
            manifest=manifest, row=row, delta_jobs=jobs, notes=resolved.notes,
            gate=None if gate is None else gate.summary,
        )  # fmt: skip
