"""Data-access functions against real SQLite and real PostgreSQL (same tests, both engines)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from agent.protocol.api import InstalledModel
from agent.protocol.manifest import Golden, ModelManifest, TensorSpec, model_target_path
from server.db import hot_path, queries
from server.db.tables import Database, Device, EnrollmentToken, utcnow
from server.errors import AuthError, ConflictError, ForbiddenError, InvalidInputError, NotFoundError

SHA = "ab" * 32


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.production)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'queries.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    database = Database(url)
    database.create_all()
    yield database
    database.dispose()


def manifest(name: str, release: int, variant: str) -> ModelManifest:
    spec = TensorSpec("x", (1, 4), "int8", 0.1, 0)
    return ModelManifest(
        name=name,
        release=release,
        variant=variant,
        sha256=SHA,
        length=100,
        inputs=(spec,),
        outputs=(spec,),
        golden=Golden(seed="s", output_b64="AAAA"),
        labels=("a", "b", "c", "d"),
    )


def enroll(
    db: Database, hw: str, tags: dict[str, str], prefs: list[str], replace: bool = False
) -> queries.Credentials:
    with db.session() as s:
        return queries.enroll_device(
            s,
            hardware_id=hw,
            profile="rpi4",
            variant_preference=prefs,
            tags=tags,
            agent_version="0.1.0",
            replace=replace,
        )


def authenticated(s: Session, device_id: str, token: str) -> Device:
    """The device row, through the same check the device API runs on every request."""
    hot_path.authenticate(s.connection(), device_id, queries.hash_secret(token))
    return queries.get_device(s, device_id)


def desired(db: Database, device_id: str) -> tuple[str, int, str] | None:
    with db.session() as s:
        target = queries.resolve_desired(s, queries.get_device(s, device_id))
    return (target.name, target.release, target.variant) if target else None


def test_enroll_issues_hashed_credentials_and_reenroll_rotates(db: Database) -> None:
    first = enroll(db, "hw-1", {"store": "17"}, ["int8-cpu"])
    with db.session() as s:
        device = authenticated(s, first.device_id, first.device_token)
        # Only digests are stored, never the secrets themselves.
        assert device.token_hash == queries.hash_secret(first.device_token)
        assert first.device_token not in (device.token_hash, device.mqtt_password_hash)
        assert first.mqtt_password not in device.mqtt_password_hash
        assert device.mqtt_password_hash.startswith("$7$101$")
        assert queries.check_mqtt_password(s, first.device_id, first.mqtt_password)
        assert not queries.check_mqtt_password(s, first.device_id, "wrong")
    second = enroll(db, "hw-1", {"store": "18"}, ["edgetpu", "int8-cpu"], replace=True)
    assert second.device_id == first.device_id and second.reenrolled
    assert second.device_token != first.device_token
    with db.session() as s:
        with pytest.raises(AuthError):
            authenticated(s, first.device_id, first.device_token)
        assert not queries.check_mqtt_password(s, first.device_id, first.mqtt_password)
        device = authenticated(s, second.device_id, second.device_token)
        assert device.tags == {"store": "18"}
        assert [d.id for d in queries.list_devices(s, ("store", "18"))] == [device.id]
        assert queries.list_devices(s, ("store", "17")) == []
        events = queries.recent_events(s, device.id, 10)
        assert [e.type for e in events] == ["reenrolled", "enrolled"]


def test_token_of_one_device_is_forbidden_on_another(db: Database) -> None:
    a = enroll(db, "hw-a", {}, ["int8-cpu"])
    b = enroll(db, "hw-b", {}, ["int8-cpu"])
    with pytest.raises(ForbiddenError), db.session() as s:
        authenticated(s, b.device_id, a.device_token)
    with pytest.raises(AuthError), db.session() as s:
        authenticated(s, a.device_id, "not-a-token")


def test_enrollment_tokens_expire_and_run_out(db: Database) -> None:
    with db.session() as s:
        limited, _ = queries.create_enrollment_token(s, 1, None, "one shot")
        expiring, row = queries.create_enrollment_token(s, None, 60, "")
    with db.session() as s:
        queries.consume_enrollment_token(s, limited, ())
    with pytest.raises(AuthError, match="used up"), db.session() as s:
        queries.consume_enrollment_token(s, limited, ())
    with db.session() as s:
        queries.consume_enrollment_token(s, expiring, ())
        s.execute(
            update(EnrollmentToken)
            .where(EnrollmentToken.token_hash == row.token_hash)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    with pytest.raises(AuthError), db.session() as s:
        queries.consume_enrollment_token(s, expiring, ())
    with db.session() as s:
        queries.consume_enrollment_token(s, "static-token", ("other", "static-token"))
        with pytest.raises(AuthError):
            queries.consume_enrollment_token(s, "static-token-x", ("static-token",))
        assert s.scalar(select(EnrollmentToken.uses).where(EnrollmentToken.note == "one shot")) == 1


def test_desired_target_resolution(db: Database) -> None:
    cam = enroll(db, "hw-cam", {"store": "17", "region": "eu"}, ["edgetpu", "int8-cpu"])
    other = enroll(db, "hw-other", {"store": "99"}, ["int8-cpu"])
    with db.session() as s:
        for release, variant in [(1, "int8-cpu"), (2, "int8-cpu"), (2, "edgetpu"), (3, "fp32")]:
            queries.add_model(s, manifest("digits", release, variant))
    assert desired(db, cam.device_id) is None
    with db.session() as s:
        queries.create_assignment(s, "digits", 1, None, "store=17")
    assert desired(db, cam.device_id) == ("digits", 1, "int8-cpu")
    assert desired(db, other.device_id) is None
    with db.session() as s:  # the newest matching tag assignment wins
        queries.create_assignment(s, "digits", 2, None, "region=eu")
    assert desired(db, cam.device_id) == ("digits", 2, "edgetpu")
    with db.session() as s:  # a device assignment beats any tag assignment, even a newer one
        queries.create_assignment(s, "digits", 1, cam.device_id, None)
        queries.create_assignment(s, "digits", 2, None, "store=17")
    assert desired(db, cam.device_id) == ("digits", 1, "int8-cpu")
    with db.session() as s:  # no published variant the device can run
        queries.create_assignment(s, "digits", 3, cam.device_id, None)
        target = queries.resolve_desired(s, queries.get_device(s, cam.device_id))
    assert target is None
    with db.session() as s:
        queries.create_assignment(s, "digits", 2, cam.device_id, None)
        target = queries.resolve_desired(s, queries.get_device(s, cam.device_id))
    assert target is not None and target.target_path == model_target_path("digits", 2, "edgetpu")


def test_assignment_and_model_errors(db: Database) -> None:
    cam = enroll(db, "hw-cam", {}, ["int8-cpu"])
    with db.session() as s:
        queries.add_model(s, manifest("digits", 1, "int8-cpu"))
    with pytest.raises(ConflictError, match="already published"), db.session() as s:
        queries.add_model(s, manifest("digits", 1, "int8-cpu"))
    with db.session() as s:
        with pytest.raises(NotFoundError, match="digits@7"):
            queries.create_assignment(s, "digits", 7, cam.device_id, None)
        with pytest.raises(NotFoundError, match="no device"):
            queries.create_assignment(s, "digits", 1, "dev-nope", None)
        with pytest.raises(InvalidInputError, match="key=value"):
            queries.create_assignment(s, "digits", 1, None, "no-equals-sign")
        with pytest.raises(InvalidInputError, match="exactly one"):
            queries.create_assignment(s, "digits", 1, cam.device_id, "a=b")
        assert [(m.name, m.release) for m in queries.list_models(s)] == [("digits", 1)]
        assert queries.model_exists(s, "digits", 1) and not queries.model_exists(s, "digits", 2)


def test_checkin_and_telemetry_upsert(db: Database) -> None:
    cam = enroll(db, "hw-cam", {}, ["int8-cpu"])
    installed = InstalledModel("digits", 2, "int8-cpu", SHA, "b")
    with db.session() as s:
        queries.record_checkin(s, queries.get_device(s, cam.device_id), "idle", installed, "0.2.0")
    with db.session() as s:
        device = queries.get_device(s, cam.device_id)
        assert (device.installed_release, device.installed_slot, device.agent_version) == (
            2,
            "b",
            "0.2.0",
        )
        assert queries.store_telemetry(s, cam.device_id, "telemetry", {"fps": 10})
        assert queries.store_telemetry(s, cam.device_id, "telemetry", {"fps": 12})
        assert queries.store_telemetry(s, cam.device_id, "events", {"type": "commit", "state": "x"})
        assert not queries.store_telemetry(s, "dev-unknown", "telemetry", {"fps": 1})
    with db.session() as s:
        latest = {t.channel: t.payload for t in queries.latest_telemetry(s, cam.device_id)}
        assert latest == {"telemetry": {"fps": 12}, "events": {"type": "commit", "state": "x"}}
        newest = queries.recent_events(s, cam.device_id, 1)[0]
        assert (newest.type, newest.source, newest.state) == ("commit", "mqtt", "x")
        with pytest.raises(NotFoundError):
            queries.get_device(s, "dev-unknown")


@pytest.mark.parametrize(
    "selector", ["", "=v", "k=", "k", "k=v=w", "k=a b", "-k=v", "k=" + "x" * 200]
)
def test_bad_tag_selectors_are_refused(selector: str) -> None:
    with pytest.raises(InvalidInputError):
        queries.parse_tag(selector)


def test_mqtt_password_hashes_are_mosquitto_compatible() -> None:
    # Written by `mosquitto_passwd -b -c FILE user secretpw` (Mosquitto 2.0.11).
    from_mosquitto = (
        "$7$101$fk6aPWR7Ooi6YjHw$52/946OODC/TF85lCdD70nhe5EYMtnBezDxS3h3ZRRRHX59J9DanG+zOR5w"
        "Fnkh26crvG/48O7K3wKi9BVWFbQ=="
    )
    assert queries.mosquitto_verify("secretpw", from_mosquitto)
    assert not queries.mosquitto_verify("secretpx", from_mosquitto)
    salt = bytes(range(12))
    assert queries.mosquitto_hash("pw", salt) == queries.mosquitto_hash("pw", salt)
    assert queries.mosquitto_verify("pw", queries.mosquitto_hash("pw"))
    for garbage in (
        "",
        "$7$",
        "$6$101$a$b",
        "$7$x$AAAA$AAAA",
        "$7$101$!!$AAAA",
        "$7$0$AAAA$AAAA",
        "$7$101$AAAA$",
    ):
        assert not queries.mosquitto_verify("pw", garbage), garbage
