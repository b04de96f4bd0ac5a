"""Deltas built after publish by the background worker (issue 14, item 3).

Publish returns with one queued job per base; a device that checks in before its
delta is signed downloads the full file and that is counted as full_before_delta;
the worker then signs the delta and the next device on that base gets it. Failures
are recorded, never retried; a job left ``building`` by a stopped server is built
after restart; two servers on one PostgreSQL never claim the same job.
Servers run with ``delta_workers=0`` where a test must see a job before it is built;
the test then drives the same ``DeltaWorker`` the server runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import FIXTURES, Operator, enroll_agent, wait_for_deltas
from sqlalchemy import select

from agent.protocol.manifest import delta_target_path, model_target_path
from server.cli import main as cli_main
from server.db.tables import Database, DeltaJob, utcnow
from server.publish import delta_jobs
from server.publish.delta_worker import DeltaWorker

NAME, VARIANT = "digits", "int8-cpu"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


def jobs_of(op: Operator, release: int) -> list[dict[str, Any]]:
    return list(op.call("GET", f"/api/v1/models/{NAME}/{release}/deltas")["jobs"])


def test_device_before_delta_gets_full_file_counted_then_delta(
    server_factory: Callable[..., Any], db_url: str | None, tmp_path: Path, capsys: Any
) -> None:
    viewer = "viewer-" + "v" * 32
    srv = server_factory(tmp_path / "server", db_url=db_url, delta_workers=0, viewer_token=viewer)
    op = Operator(srv.url, srv.operator_token)
    r1 = op.publish(1, wait_deltas=False)
    agents = [
        enroll_agent(
            srv.url,
            srv.config.enrollment_tokens[0],
            root_json=srv.repo.metadata_dir / "1.root.json",
            work=tmp_path / f"cam{i}",
            tags=(f"cam={i}",),
        )
        for i in range(2)
    ]
    for agent in agents:
        agent.start()
    try:
        op.assign(1, tag="cam=0")
        op.assign(1, tag="cam=1")
        assert all(agent.checkin_once() for agent in agents)

        r2 = op.publish(2, wait_deltas=False)  # returns with the delta queued, not built
        [job] = jobs_of(op, 2)
        assert (job["state"], job["base_release"], job["base_sha256"]) == (
            "queued",
            1,
            r1["sha256"],
        )
        delta_path = delta_target_path(NAME, 2, VARIANT, r1["sha256"])
        assert delta_path not in srv.repo.targets()

        op.assign(2, tag="cam=0")  # this camera checks in before the delta exists
        assert agents[0].checkin_once() is True
        assert agents[0].updater.installed().release == 2  # type: ignore[union-attr]
        bw = op.call("GET", "/api/v1/bandwidth")
        assert (bw["fleet"]["deltas"], bw["fleet"]["full_before_delta"]) == (0, 1)
        rel2 = next(r for r in bw["releases"] if r["release"] == 2)
        assert rel2["full_before_delta"] == 1

        outcome = DeltaWorker(srv.db, srv.repo).run_once()  # what the server's worker runs
        assert outcome is not None and outcome.state == "done"
        [job] = jobs_of(op, 2)
        assert (job["state"], job["progress"], job["attempts"]) == ("done", 1.0, 1)
        assert job["delta_bytes"] < r2["length"] and 0 < job["ratio"] < 1
        assert job["full_before_delta"] == 1
        info = srv.repo.targets()[delta_path]  # signed into the targets metadata
        assert info.custom["base_sha256"] == r1["sha256"] and info.length == job["delta_bytes"]

        op.assign(2, tag="cam=1")  # this one finds the delta
        assert agents[1].checkin_once() is True
        assert agents[1].updater.installed().sha256 == r2["sha256"]  # type: ignore[union-attr]
        bw = op.call("GET", "/api/v1/bandwidth")
        assert (bw["fleet"]["deltas"], bw["fleet"]["full_before_delta"]) == (1, 1)
    finally:
        for agent in agents:
            agent.stop()

    console = Operator(srv.url, viewer).call("GET", "/api/v1/models/delta-jobs")  # the console's
    assert console["pending"] == 0 and [j["state"] for j in console["jobs"]] == ["done"]
    auth = ["--server", srv.url, "--token", srv.operator_token]
    assert cli_main([*auth, "model", "show", f"{NAME}@2"]) == 0
    out = capsys.readouterr().out
    assert f"delta from release 1: done, {job['delta_bytes']} bytes" in out
    assert cli_main([*auth, "bandwidth"]) == 0
    assert "full before delta" in capsys.readouterr().out


def test_failed_job_is_recorded_with_its_reason_and_not_retried(
    server_factory: Callable[..., Any], db_url: str | None, tmp_path: Path, capsys: Any
) -> None:
    srv = server_factory(tmp_path / "server", db_url=db_url, delta_workers=0)
    op = Operator(srv.url, srv.operator_token)
    op.publish(1, wait_deltas=False)
    op.publish(2, wait_deltas=False)
    srv.repo.remove_target(model_target_path(NAME, 1, VARIANT))  # the base is revoked
    worker = DeltaWorker(srv.db, srv.repo)
    outcome = worker.run_once()
    assert outcome is not None and outcome.state == "failed"
    assert worker.run_once() is None  # nothing left to claim: a failure is final
    [job] = jobs_of(op, 2)
    assert (job["state"], job["attempts"]) == ("failed", 1)
    assert "digits/1/int8-cpu" in job["reason"] and "not in the repository" in job["reason"]
    assert cli_main(["--server", srv.url, "--token", srv.operator_token, "model", "show",
                     f"{NAME}@2"]) == 0  # fmt: skip
    assert "delta from release 1: failed: " in capsys.readouterr().out


def test_building_job_left_by_a_stopped_server_is_built_after_restart(
    server_factory: Callable[..., Any], db_url: str | None, tmp_path: Path
) -> None:
    srv = server_factory(tmp_path / "server", db_url=db_url, delta_workers=0)
    op = Operator(srv.url, srv.operator_token)
    op.publish(1, wait_deltas=False)
    r2 = op.publish(2, wait_deltas=False)
    with srv.db.session() as s:  # the crashed builder: claimed, no lease, never finished
        claimed = delta_jobs.claim_next(s, "crashed-server")
    assert claimed is not None
    assert jobs_of(op, 2)[0]["state"] == "building"
    srv.stop()

    again = server_factory(tmp_path / "server", db_url=db_url, delta_workers=1,
                           operator_token=srv.operator_token)  # fmt: skip
    op = Operator(again.url, again.operator_token)
    [job] = wait_for_deltas(op.call, NAME, 2)
    assert (job["state"], job["attempts"]) == ("done", 2)
    assert delta_target_path(NAME, 2, VARIANT, claimed.base_sha256) in again.repo.targets()
    assert job["delta_bytes"] < r2["length"]


def test_a_clean_stop_puts_the_delta_it_was_building_back_in_the_queue(
    server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    srv = server_factory(tmp_path / "server")
    op = Operator(srv.url, srv.operator_token)
    # Two MobileNetV2 files (0.6 and 2.8 MB): seconds of work, long enough to stop midway.
    for release, model, classes in ((1, "mobilenetv2_035_96_int8.tflite", 10),
                                    (2, "mobilenetv2_int8.tflite", 100)):  # fmt: skip
        with open(FIXTURES / model, "rb") as fh:
            op.call("POST", "/api/v1/models", files={"file": (model, fh)},
                    data={"name": "mnet", "release": str(release), "variant": VARIANT,
                          "labels": ",".join(map(str, range(classes))),
                          "input_range": "-1,1"})  # fmt: skip
    deadline = time.monotonic() + 120
    while op.call("GET", "/api/v1/models/mnet/2/deltas")["jobs"][0]["state"] == "queued":
        assert time.monotonic() < deadline, "the worker never claimed the job"
        time.sleep(0.05)
    srv.stop()
    db = Database(str(srv.config.db_url))
    try:
        with db.session() as s:
            [job] = s.scalars(select(DeltaJob)).all()
            assert (job.state, job.attempts, job.started_at) == ("queued", 1, None)
    finally:
        db.dispose()


def _queue(db: Database, count: int) -> None:
    with db.session() as s:
        s.add_all(
            DeltaJob(
                name="m",
                release=9,
                variant=VARIANT,
                target_sha256="f" * 64,
                target_bytes=100,
                base_release=i,
                base_sha256=f"{i:064x}",
                state=delta_jobs.QUEUED,
                progress=0.0,
                attempts=0,
                full_downloads=0,
                created_at=utcnow(),
            )
            for i in range(1, count + 1)
        )


def test_two_servers_on_postgresql_never_claim_the_same_job(pg_url: str) -> None:
    a, b = Database(pg_url, pool_size=2), Database(pg_url, pool_size=2)
    try:
        a.create_all()
        _queue(a, 2)
        lease_a = delta_jobs.JobLease(a.engine)
        with a.session() as sa:
            first = delta_jobs.claim_next(sa, "server-a", lease_a)
            assert first is not None
            # A's claim is not committed yet: B skips the locked row instead of taking it.
            with b.session() as sb:
                second = delta_jobs.claim_next(sb, "server-b")
            assert second is not None and second.id != first.id
        with b.session() as sb:
            assert delta_jobs.claim_next(sb, "server-b") is None
        # B's sweep leaves A's job alone while A holds its lease (A is alive) ...
        assert delta_jobs.requeue_orphans(b.engine) == [second.id]  # B never took a lease
        lease_a.close()  # ... and takes it back once A is gone
        assert delta_jobs.requeue_orphans(b.engine) == [first.id]
    finally:
        a.dispose()
        b.dispose()


def test_sqlite_claims_each_job_once(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'edgefleet.db'}")
    try:
        db.create_all()
        _queue(db, 2)
        with db.session() as s:
            first = delta_jobs.claim_next(s, "w")
        with db.session() as s:
            second = delta_jobs.claim_next(s, "w")
        with db.session() as s:
            assert delta_jobs.claim_next(s, "w") is None
        assert first is not None and second is not None and first.id != second.id
        assert sorted(delta_jobs.requeue_orphans(db.engine)) == sorted([first.id, second.id])
    finally:
        db.dispose()
