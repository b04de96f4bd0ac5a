"""The engine's in-memory snapshot against a real server on SQLite and on PostgreSQL.

After every tick, the facts the ticking process keeps must equal the facts a
fresh load from the tables gives, whatever arrived in between: events, check-
ins, another replica's tick, an operator's action, and (on PostgreSQL) an
event whose lower id commits after a higher one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from rollout_helpers import Fleet, SimDevice, published_fleet
from sqlalchemy import select
from sqlalchemy.orm import Session
from waiting import wait_for

from server.app import ServerHandle
from server.db import queries
from server.db.tables import Database, utcnow
from server.rollout.core.spec import RolloutSpec
from server.rollout.core.states import DeviceFacts, InstallStatus
from server.rollout.service import Rollout, ServiceConfig, tick
from server.rollout.service.facts import collect
from server.rollout.service.records import spec_of
from server.rollout.service.snapshot import CACHE

ServerFactory = Callable[..., ServerHandle]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.production)])
def db_url(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


@pytest.fixture
def server(server_factory: ServerFactory, tmp_path: Path, db_url: str | None) -> ServerHandle:
    # The scheduler in this process: a spawned one may take its first round (and the
    # rollout's row lock) seconds later, just as a test ticks by hand.
    return server_factory(tmp_path / "server", db_url=db_url, rollout_tick_interval_s=3600,
                          rollout_scheduler="thread")


@pytest.fixture
def fleet(server: ServerHandle) -> Fleet:
    return published_fleet(server)


def fresh_facts(db: Database, rollout_id: str, cfg: ServiceConfig) -> dict[str, DeviceFacts]:
    """What a process with no snapshot would see now (its writes rolled back)."""
    with db.session() as s:
        row = s.scalars(select(Rollout).where(Rollout.id == rollout_id)).one()
        spec: RolloutSpec = spec_of(row)
        facts, _ = collect(s, row, spec, cfg, utcnow())
        s.rollback()
    return {f.device_id: f for f in facts}


def kept_facts(db: Database, rollout_id: str) -> dict[str, DeviceFacts]:
    with db.session() as s:
        version = s.scalar(select(Rollout.version).where(Rollout.id == rollout_id))
    snap = CACHE.take(db.url, rollout_id, int(version or 0))
    assert snap is not None, "the ticking process kept no current snapshot"
    CACHE.give_back(db.url, snap)
    return {d.device_id: d.facts for d in snap.devices.values() if d.facts is not None}


def check(db: Database, rollout_id: str, cfg: ServiceConfig) -> dict[str, DeviceFacts]:
    kept = kept_facts(db, rollout_id)
    assert kept == fresh_facts(db, rollout_id, cfg)
    return kept


def started(facts: dict[str, DeviceFacts]) -> set[str]:
    return {d for d, f in facts.items() if f.started_at is not None}


def test_kept_facts_match_a_fresh_load_through_a_rollout(
    server: ServerHandle, fleet: Fleet
) -> None:
    cfg = ServiceConfig.from_server(server.config)
    devices = fleet.enroll(8, tags=lambda i: {"fleet": "test", "store": f"s{i % 4}"})
    by_id = {d.device_id: d for d in devices}
    fleet.bring_to(devices, 1)
    rid = fleet.create(release="digits@2", select=["fleet=test"], stages="25%,50%,100%",
                       soak="0s", max_failure="60%", start=True)["id"]
    assert tick(server.db, rid, cfg) is not None
    facts = check(server.db, rid, cfg)
    first = sorted(started(facts))
    assert len(first) == 2
    fleet.install(by_id[first[0]], 2)
    fleet.install(by_id[first[1]], 2)
    assert tick(server.db, rid, cfg) is not None
    facts = check(server.db, rid, cfg)
    assert {facts[d].status for d in first} == {InstallStatus.INSTALLED}

    # Another replica ticks in between: this process's snapshot is then stale (an
    # older version of the rollout row) and must be rebuilt, not trusted.
    with server.db.session() as s:
        version = int(s.scalar(select(Rollout.version).where(Rollout.id == rid)) or 0)
    stale = CACHE.take(server.db.url, rid, version)
    assert stale is not None
    assert tick(server.db, rid, cfg) is not None  # "the other replica" (no snapshot)
    later = sorted(started(fresh_facts(server.db, rid, cfg)) - set(first))
    assert later
    CACHE.give_back(server.db.url, stale)
    fleet.install(by_id[later[0]], 2, outcome="rollback")
    for device_id in later[1:]:
        fleet.install(by_id[device_id], 2)
    assert tick(server.db, rid, cfg) is not None
    facts = check(server.db, rid, cfg)
    assert facts[later[0]].status is InstallStatus.ROLLED_BACK
    assert all(facts[d].status is InstallStatus.INSTALLED for d in later[1:])

    # The rollback tripped a gate; the operator's resume bumps the rollout's version
    # and the next tick reloads.
    assert fleet.rollout(rid)["state"] == "paused"
    fleet.act(rid, "resume")
    silent = [d for d in devices if d.device_id not in started(facts)]
    fleet.checkin(silent[0])
    assert tick(server.db, rid, cfg) is not None
    check(server.db, rid, cfg)


@pytest.mark.production
def test_an_event_committed_after_a_higher_id_is_still_folded(
    server_factory: ServerFactory, tmp_path: Path, pg_url: str
) -> None:
    server = server_factory(tmp_path / "server", db_url=pg_url, rollout_tick_interval_s=3600,
                            rollout_scheduler="thread")  # see ``server`` above
    f = published_fleet(server)
    cfg = ServiceConfig.from_server(server.config)
    devices: list[SimDevice] = f.enroll(2, tags=lambda i: {"fleet": "test"})
    f.bring_to(devices, 1)
    rid = f.create(release="digits@2", select=["fleet=test"], stages="100%", soak="0s",
                   start=True)["id"]
    assert tick(server.db, rid, cfg) is not None
    a, b = sorted(started(check(server.db, rid, cfg)))
    target = "models/digits/2/int8-cpu.tflite"
    commit = {"target": target, "slot": "b", "reason": None}
    slow = Session(server.db.engine)  # an insert that takes its id now and commits later
    try:
        queries.add_event(slow, a, "update", state="commit", detail=commit, source="http")
        slow.flush()
        with server.db.session() as s:  # a higher id, committed first
            queries.add_event(s, b, "update", state="commit", detail=commit, source="http")
        assert tick(server.db, rid, cfg) is not None
        facts = kept_facts(server.db, rid)
        assert facts[b].status is InstallStatus.INSTALLED
        assert facts[a].status is InstallStatus.PENDING  # not visible yet: a gap
        slow.commit()
    finally:
        slow.close()
    assert tick(server.db, rid, cfg) is not None
    facts = check(server.db, rid, cfg)
    assert facts[a].status is InstallStatus.INSTALLED


def metric(server: ServerHandle, name: str) -> float | None:
    text = requests.get(f"{server.url}/metrics", timeout=10,
                        headers={"Authorization": f"Bearer {server.operator_token}"}).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_the_scheduler_reports_its_tick_time(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = server_factory(tmp_path / "server", rollout_tick_interval_s=0.2)
    assert metric(server, "edgefleet_rollout_ticks_total") == 0.0
    f = published_fleet(server)
    devices = f.enroll(3, tags=lambda i: {"fleet": "test"})
    f.bring_to(devices, 1)
    rid = f.create(release="digits@2", select=["fleet=test"], stages="100%", soak="1h",
                   start=True)["id"]
    wait_for("two ticks", lambda: (metric(server, "edgefleet_rollout_ticks_total") or 0) >= 2)
    seconds = metric(server, "edgefleet_rollout_tick_seconds_total")
    assert seconds is not None and seconds > 0
    last = f.rollout(rid)["decision"]
    assert isinstance(last["tick_ms"], float) and last["tick_ms"] > 0


def test_a_large_stage_is_told_over_several_ticks(server: ServerHandle, fleet: Fleet) -> None:
    cfg = dataclasses.replace(ServiceConfig.from_server(server.config), max_starts_per_tick=2)
    devices = fleet.enroll(5, tags=lambda i: {"fleet": "test", "store": f"s{i}"})
    fleet.bring_to(devices, 1)
    rid = fleet.create(release="digits@2", select=["fleet=test"], stages="100%", soak="0s",
                       start=True)["id"]
    told: list[str] = []
    for expected in (2, 2, 1, 0):
        result = tick(server.db, rid, cfg)
        assert result is not None
        assert len(result.started) == expected
        told.extend(result.started)
        check(server.db, rid, cfg)
    assert sorted(told) == sorted(d.device_id for d in devices)  # each told once
