"""Shared fixtures: a real running fleet server, and PostgreSQL / Mosquitto URLs.

``pg_url`` and ``mosquitto_url`` skip their test when the service is not
reachable on 127.0.0.1, unless ``EDGEFLEET_PRODUCTION=1`` (CI), where a missing
service fails the test instead.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

if TYPE_CHECKING:
    from rollout_helpers import Fleet, Telemetry

    from server.app import ServerHandle
    from server.config import ServerConfig

# The server stack is imported inside the fixtures, so agent-only test runs stay light.

PG_ENV = "EDGEFLEET_PG_URL"
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MOSQUITTO_ENV = "EDGEFLEET_MOSQUITTO_URL"
MOSQUITTO_DEFAULT = "mqtt://127.0.0.1:1883"
PRODUCTION_ENV = "EDGEFLEET_PRODUCTION"

ServerFactory = Callable[..., "ServerHandle"]


def service_unavailable(what: str, why: object) -> NoReturn:
    """Skip, or fail when EDGEFLEET_PRODUCTION=1 says every service must be there."""
    message = f"{what} is not reachable: {why}"
    if os.environ.get(PRODUCTION_ENV) == "1":
        pytest.fail(f"{message} (required because {PRODUCTION_ENV}=1)")
    pytest.skip(message)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL SQLAlchemy URL whose search_path is a fresh schema, dropped afterwards."""
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415
    from sqlalchemy.engine import make_url  # noqa: PLC0415

    url = make_url(os.environ.get(PG_ENV, PG_DEFAULT))
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    schema = f"ef_test_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(conninfo, connect_timeout=3, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    except psycopg.Error as err:
        service_unavailable(f"PostgreSQL at {url.render_as_string()}", err)
    yield url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )
    with psycopg.connect(conninfo, connect_timeout=3, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


_purged: set[str] = set()


def purge_retained_state(host: str, port: int, settle_s: float = 1.0) -> int:
    """Clear retained device ``state`` messages left on a shared broker by earlier runs.

    Every test device leaves a retained online/offline message; thousands of them
    arrive at once when an ingest subscribes and overflow Mosquitto's per-client
    queue, so a shared broker is cleaned once per session before it is used.
    """
    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    retained: set[str] = set()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"purge-{secrets.token_hex(4)}")
    client.on_message = lambda _c, _u, msg: retained.add(msg.topic) if msg.retain else None
    client.connect(host, port)
    client.loop_start()
    try:
        client.subscribe("edgefleet/v1/devices/+/state", qos=1)
        time.sleep(settle_s)
        infos = [client.publish(topic, b"", qos=1, retain=True) for topic in sorted(retained)]
        for info in infos:
            info.wait_for_publish(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()
    return len(retained)


@pytest.fixture
def mosquitto_url() -> str:
    """The URL of an external MQTT broker (Mosquitto) that allows anonymous clients."""
    from server.config import parse_mqtt_url  # noqa: PLC0415

    url = os.environ.get(MOSQUITTO_ENV, MOSQUITTO_DEFAULT)
    endpoint = parse_mqtt_url(url)
    try:
        socket.create_connection((endpoint.host, endpoint.port), timeout=3).close()
    except OSError as err:
        service_unavailable(f"MQTT broker at {endpoint.host}:{endpoint.port}", err)
    if url not in _purged:
        _purged.add(url)
        # The broker hands a new subscriber at most its queue limit at once: repeat.
        for _ in range(50):
            if purge_retained_state(endpoint.host, endpoint.port) < 500:
                break
    return url


def server_config(data_dir: Path, **overrides: Any) -> ServerConfig:
    """Test defaults: free ports, one known enrollment token, a unique ingest client id."""
    from server.config import ServerConfig  # noqa: PLC0415

    values: dict[str, Any] = {
        "port": 0,
        "operator_token": "op-" + secrets.token_urlsafe(24),
        "enrollment_tokens": ("enroll-" + secrets.token_urlsafe(16),),
        "poll_interval_s": 1.0,
        "ingest_client_id": "edgefleet-test-ingest-" + secrets.token_hex(6),
        "log_level": "warning",
    }
    values.update(overrides)
    return ServerConfig(data_dir=data_dir, **values)


def _stop(handle: ServerHandle) -> None:
    from server.errors import ServerError  # noqa: PLC0415
    from server.mqtt.ingest import discard_session  # noqa: PLC0415

    handle.stop()
    endpoint = handle.config.mqtt_endpoint()
    if endpoint is not None:
        # Do not leave a persistent session queueing messages on a shared broker.
        with contextlib.suppress(ServerError):
            discard_session(endpoint, handle.config.ingest_client_id)


@pytest.fixture
def server_factory() -> Iterator[ServerFactory]:
    """``server_factory(data_dir, db_url=None, mqtt_url=None, **config)`` -> running server.

    The handle carries ``url``, ``operator_token``, ``mqtt_host``/``mqtt_port``
    and ``config.enrollment_tokens[0]``; every server is stopped at teardown.
    """
    from server.app import start_server  # noqa: PLC0415

    handles: list[ServerHandle] = []

    def factory(
        data_dir: Path, *, db_url: str | None = None, mqtt_url: str | None = None, **kw: Any
    ) -> ServerHandle:
        handle = start_server(server_config(data_dir, db_url=db_url, mqtt_url=mqtt_url, **kw))
        handles.append(handle)
        return handle

    yield factory
    for handle in reversed(handles):
        _stop(handle)


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """One SQLite + embedded-broker server shared by a test module (for read-mostly tests)."""
    from server.app import start_server  # noqa: PLC0415

    handle = start_server(server_config(tmp_path_factory.mktemp("server")))
    yield handle
    _stop(handle)


# --- rollouts driven through the real server (a module defines ``server``) -------------------
@pytest.fixture
def fleet(server: ServerHandle) -> Fleet:
    """An operator and REST devices on the module's ``server``: releases 1 and 2 published,
    1 assigned to fleet=test."""
    from rollout_helpers import published_fleet  # noqa: PLC0415 - paho and requests on use

    return published_fleet(server)


@pytest.fixture
def telemetry(server: ServerHandle) -> Iterator[Telemetry]:
    """Telemetry and results windows over MQTT with each device's own credentials."""
    from rollout_helpers import Telemetry  # noqa: PLC0415

    sender = Telemetry(server.mqtt_host, server.mqtt_port)
    yield sender
    sender.close()
