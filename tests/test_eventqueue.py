"""The batching of HTTP event copies: the queue's flush policy (pure, a hand-driven clock),
its bounds and requeueing, and ``DeviceClient.events`` against a scripted loopback server
and the real fleet server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest
from fleet_helpers import Operator

from agent.common.errors import AgentError, ProtocolError, ServerRequestError, UpdateError
from agent.protocol.api import EVENTS_BATCH_PATH, MAX_EVENT_BATCH
from agent.transport.device_api import DeviceClient
from agent.transport.event_queue import EventQueue, PendingEvent, batch_body, flush
from agent.update.state_machine import Event, State, UpdateRecord

if TYPE_CHECKING:
    from server.app import ServerHandle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _queue(clock: Clock | None = None, **kw: Any) -> EventQueue:
    return EventQueue(clock=clock or Clock(), **kw)


def _chain(*events: Event) -> list[tuple[str, str]]:
    """The ``update`` events an update reports: one per transition of the real table."""
    record, out = UpdateRecord(), []
    for event in events:
        record = record.advance(event)
        out.append(("update", record.state.value))
    return out


E, S = Event, Event.SUCCESS
COMMITTED = _chain(E.START, E.UPDATE_AVAILABLE, S, S, S, S, S, E.DONE)
ROLLED_BACK = _chain(E.START, E.UPDATE_AVAILABLE, S, S, S, E.FAILURE, E.DONE)
FAILED_DOWNLOAD = _chain(E.START, E.UPDATE_AVAILABLE, E.FAILURE)
NOTHING_NEW = _chain(E.START, E.NO_UPDATE)


# --- the flush policy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "due_at"),
    [
        # A whole update is one batch: due only once its last event is queued.
        ([*COMMITTED[:3], ("download", "done"), *COMMITTED[3:]], [9]),
        ([*ROLLED_BACK[:4], ("golden_set", "scored"), *ROLLED_BACK[4:]], [8]),
        (FAILED_DOWNLOAD, [3]),
        (NOTHING_NEW, [2]),
        # The rollback state starts undoing the update; its DONE (to idle) ends it.
        ([("update", "check_in"), ("update", "rollback")], []),
        # Only the update record returning to idle ends an update, not any "idle" text.
        ([("download", "idle"), ("golden_set", "scored")], []),
        # A full batch is due whatever its events are.
        ([("download", "done")] * (MAX_EVENT_BATCH - 1), []),
        ([("download", "done")] * MAX_EVENT_BATCH, [MAX_EVENT_BATCH]),
    ],
    ids=[
        "commit",
        "rollback",
        "failed-download",
        "no-update",
        "rollback-started",
        "not-an-update",
        "one-short",
        "full-batch",
    ],
)
def test_a_flush_is_due_when_an_update_ends_or_a_batch_is_full(
    events: list[tuple[str, str]], due_at: list[int]
) -> None:
    queue = _queue()
    due = [n for n, (kind, state) in enumerate(events, 1) if queue.add(kind, state, {})]
    assert due == due_at
    assert queue.due() is bool(due_at) and len(queue) == len(events)


def test_the_end_states_are_where_every_update_path_of_the_table_ends() -> None:
    for path in (COMMITTED, ROLLED_BACK, FAILED_DOWNLOAD, NOTHING_NEW):
        assert path[-1] == ("update", State.IDLE.value)
        assert all(state != State.IDLE.value for _, state in path[:-1])


@pytest.mark.parametrize(
    ("waits", "due"),
    [
        ([0.0, 10.0, 19.9], [False, False, False]),  # oldest waited 29.9 s
        ([0.0, 10.0, 20.0], [False, False, True]),  # oldest waited 30 s: show progress
        ([0.0, 45.0], [False, True]),
        ([31.0], [False]),  # the clock before the first event does not count
    ],
)
def test_a_flush_is_due_when_the_oldest_event_has_waited_max_age(
    waits: list[float], due: list[bool]
) -> None:
    clock = Clock()
    queue = _queue(clock, max_age_s=30.0)
    got = []
    for wait in waits:
        clock.now += wait
        got.append(queue.add("update", "download", {}))
    assert got == due


def test_the_age_rule_holds_without_a_new_event() -> None:
    clock = Clock()
    queue = _queue(clock, max_age_s=30.0)
    assert queue.due() is False  # empty
    queue.add("update", "download", {})
    clock.now += 30.0
    assert queue.due() is True
    queue.take()
    assert queue.due() is False


# --- take, requeue, bounds -------------------------------------------------------------------


def _fill(queue: EventQueue, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        queue.add("download", "done", {"i": i})


def _numbers(batch: list[PendingEvent]) -> list[int]:
    return [e.detail["i"] for e in batch]


@pytest.mark.parametrize(
    ("queued", "batches"),
    [
        (0, []),
        (1, [1]),
        (MAX_EVENT_BATCH, [MAX_EVENT_BATCH]),
        (150, [MAX_EVENT_BATCH, MAX_EVENT_BATCH, 22]),
    ],
)
def test_take_hands_out_batches_in_order(queued: int, batches: list[int]) -> None:
    queue = _queue()
    _fill(queue, queued)
    got: list[int] = []
    sizes = []
    while batch := queue.take():
        sizes.append(len(batch))
        got += _numbers(batch)
    assert sizes == batches and got == list(range(queued)) and len(queue) == 0


def test_a_requeued_batch_goes_back_in_front_with_its_age() -> None:
    clock = Clock()
    queue = _queue(clock, max_age_s=30.0)
    _fill(queue, 3)
    batch = queue.take()
    clock.now += 40.0
    _fill(queue, 2, start=3)  # queued while the POST was failing
    queue.requeue(batch)
    assert queue.due() is True  # the requeued events are still 40 s old
    assert _numbers(queue.take()) == [0, 1, 2, 3, 4]
    assert queue.dropped == 0


@pytest.mark.parametrize(
    ("capacity", "queued", "left", "first"),
    [
        (100, 100, 100, 0),
        (100, 101, 100, 1),
        (100, 250, 100, 150),
    ],
)
def test_the_queue_is_bounded_and_drops_the_oldest(
    capacity: int, queued: int, left: int, first: int
) -> None:
    queue = _queue(capacity=capacity)
    _fill(queue, queued)
    assert (len(queue), queue.dropped) == (left, queued - left)
    assert _numbers(queue.take())[0] == first


def test_a_requeue_beyond_capacity_drops_the_oldest() -> None:
    queue = _queue(capacity=MAX_EVENT_BATCH)
    _fill(queue, MAX_EVENT_BATCH)
    batch = queue.take()
    _fill(queue, 10, start=MAX_EVENT_BATCH)
    queue.requeue(batch)
    assert (len(queue), queue.dropped) == (MAX_EVENT_BATCH, 10)
    assert _numbers(queue.take()) == list(range(10, MAX_EVENT_BATCH + 10))


def test_a_capacity_below_one_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one batch"):
        EventQueue(capacity=MAX_EVENT_BATCH - 1)


@pytest.mark.parametrize(
    ("error", "requeued"),
    [
        (ServerRequestError("cannot reach server"), True),
        (ServerRequestError("no such path", 404), True),  # a server without the endpoint yet
        (ServerRequestError("bad token", 401), True),
        (ServerRequestError("not yours", 403), True),
        (ServerRequestError("overloaded", 503), True),
        (ProtocolError("reply is not JSON"), True),
        (ServerRequestError("bad body", 422), False),  # sending it again cannot help
        (ServerRequestError("bad request", 400), False),
        (ServerRequestError("too large", 413), False),
    ],
)
def test_a_failed_batch_is_requeued_unless_the_server_refused_its_body(
    error: AgentError, requeued: bool
) -> None:
    queue = _queue()
    _fill(queue, 5)
    batch = queue.take()
    assert queue.failed(batch, error) is requeued
    assert (len(queue), queue.dropped) == ((5, 0) if requeued else (0, 5))


# --- flush and the wire body -----------------------------------------------------------------


class Server:
    """Where ``flush`` sends: records batches, fails the n-th send."""

    def __init__(self, fail_on: int | None = None, error: AgentError | None = None) -> None:
        self.fail_on = fail_on
        self.error = error or ServerRequestError("server down")
        self.batches: list[list[int]] = []
        self.sends = 0

    def send(self, batch: list[PendingEvent]) -> int:
        self.sends += 1
        if self.sends == self.fail_on:
            raise self.error
        self.batches.append(_numbers(batch))
        return len(batch)


def test_flush_sends_everything_in_batches() -> None:
    queue, server = _queue(), Server()
    _fill(queue, 130)
    assert flush(queue, server.send) == 130
    assert [len(b) for b in server.batches] == [64, 64, 2]
    assert [i for batch in server.batches for i in batch] == list(range(130)) and len(queue) == 0
    assert flush(queue, server.send) == 0 and server.sends == 3  # nothing queued: no request


def test_flush_stops_at_a_failure_and_keeps_the_order() -> None:
    queue, server = _queue(), Server(fail_on=2)
    _fill(queue, 130)
    with pytest.raises(ServerRequestError, match="server down"):
        flush(queue, server.send)
    assert server.batches == [list(range(64))] and len(queue) == 66
    assert flush(queue, server.send) == 66
    assert [i for batch in server.batches for i in batch] == list(range(130))


def test_flush_lets_other_errors_through_untouched() -> None:
    queue, server = _queue(), Server(fail_on=1, error=UpdateError("x", "not a send error"))
    _fill(queue, 3)
    with pytest.raises(UpdateError):
        flush(queue, server.send)
    assert len(queue) == 3  # any AgentError keeps the batch; only a refused body drops it


@pytest.mark.parametrize("size", [0, MAX_EVENT_BATCH + 1])
def test_a_batch_body_holds_one_to_max_events(size: int) -> None:
    event = PendingEvent("update", "idle", {}, 0.0)
    with pytest.raises(ValueError, match="a batch holds"):
        batch_body([event] * size)


# --- DeviceClient.events over loopback HTTP --------------------------------------------------


class Recorder(BaseHTTPRequestHandler):
    requests: list[tuple[str, str | None, Any]]
    answer: tuple[int, bytes]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append((self.path, self.headers.get("Authorization"), body))
        status, raw = self.answer
        self.send_response(status)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output quiet


@pytest.fixture
def http_server() -> Iterator[tuple[str, type[Recorder]]]:
    handler = type("Handler", (Recorder,), {"requests": [], "answer": (201, b"")})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_the_client_posts_a_batch_to_the_batch_path(
    http_server: tuple[str, type[Recorder]],
) -> None:
    url, handler = http_server
    handler.answer = (201, b'{"stored": 2}')
    queue = _queue()
    queue.add("update", "check_in", {"target": "models/x"})
    queue.add("download", "done", {"bytes": 10})
    client = DeviceClient(url, "dev-1", "tok-1")
    assert client.events(queue.take()) == 2
    path, auth, body = handler.requests[0]
    assert path == EVENTS_BATCH_PATH.format(device_id="dev-1") and auth == "Bearer tok-1"
    assert body == {
        "events": [
            {"type": "update", "state": "check_in", "detail": {"target": "models/x"}},
            {"type": "download", "state": "done", "detail": {"bytes": 10}},
        ]
    }


@pytest.mark.parametrize(
    ("answer", "error", "status"),
    [
        ((404, b'{"detail": "Not Found"}'), ServerRequestError, 404),
        ((422, b'{"detail": "bad"}'), ServerRequestError, 422),
        ((201, b'{"stored": "all"}'), ProtocolError, None),
        ((201, b"[]"), ProtocolError, None),
    ],
)
def test_the_client_refuses_errors_and_malformed_answers(
    http_server: tuple[str, type[Recorder]],
    answer: tuple[int, bytes],
    error: type[AgentError],
    status: int | None,
) -> None:
    url, handler = http_server
    handler.answer = answer
    queue = _queue()
    queue.add("update", "idle", {})
    with pytest.raises(error) as info:
        DeviceClient(url, "dev-1", "tok-1").events(queue.take())
    assert getattr(info.value, "status", None) == status


def test_a_whole_update_reaches_the_fleet_server_as_one_batch(
    module_server: ServerHandle,
) -> None:
    server = module_server
    token = server.config.enrollment_tokens[0]
    enrolled = DeviceClient(server.url).enroll(token, "hw-batch", "rpi4", ["int8-cpu"], {})
    device = DeviceClient(server.url, enrolled.device_id, enrolled.device_token)
    queue, server_batches = _queue(), []
    for kind, state in [*FAILED_DOWNLOAD[:2], ("download", "done"), FAILED_DOWNLOAD[2]]:
        if queue.add(kind, state, {"target": "models/digits/1/int8-cpu.tflite"}):
            server_batches.append(flush(queue, device.events))
    assert server_batches == [4]
    events = Operator(server.url, server.operator_token).device(enrolled.device_id)["events"]
    stored = [(e["type"], e["state"]) for e in reversed(events) if e["source"] == "http"]
    assert stored[-4:] == [*FAILED_DOWNLOAD[:2], ("download", "done"), FAILED_DOWNLOAD[2]]

    queue.add("update", "idle", {})
    stranger = DeviceClient(server.url, enrolled.device_id, "not-the-token")
    with pytest.raises(ServerRequestError) as info:
        flush(queue, stranger.events)
    assert info.value.status in (401, 403) and len(queue) == 1  # kept for a later flush
