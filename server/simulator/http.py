"""The device REST API over one shared async HTTP connection pool.

The same paths and bodies as ``agent.transport.device_api.DeviceClient`` (the paths and
the check-in body come from ``agent.protocol.api``) and the same strict
parsing of answers, but asynchronous, so thousands of devices share a few
dozen keep-alive connections (``http_pool``). At most ``connections``
requests are in flight; a request's latency is measured from the moment it
has a connection slot, so the figure is the server's answer time, not the
simulator's own queueing.

Check-ins are conditional, as the protocol allows: a 200 answer's ``ETag`` is sent
back as ``If-None-Match`` next time, and ``304 Not Modified`` (empty body) means
the last answer still holds. A server that sends no ETag is simply polled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent import __version__ as AGENT_VERSION  # noqa: N812
from agent.common.errors import ProtocolError, ServerRequestError
from agent.protocol import api
from agent.transport.event_queue import PendingEvent, batch_body
from server.simulator.http_pool import Answer, HttpPool, HttpPoolError, PoolLimits
from server.simulator.stats import FleetStats

MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # as agent.transport.device_api
_MAX_ERROR_CHARS = 200


@dataclass(frozen=True)
class Checkin:
    """A check-in's outcome: a fresh answer, or None when the server said 304."""

    reply: api.CheckinResponse | None
    etag: str | None  # to send as If-None-Match next time


class DeviceHttp:
    def __init__(
        self, base_url: str, connections: int, timeout_s: float, stats: FleetStats
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.stats = stats
        self._pool = HttpPool(
            self.base_url,
            PoolLimits(connections=connections, timeout_s=timeout_s, max_body=MAX_RESPONSE_BYTES),
            f"edgefleet-sim/{AGENT_VERSION}",
        )

    async def close(self) -> None:
        await self._pool.close()

    async def _post(
        self,
        path: str,
        body: dict[str, Any],
        token: str | None,
        what: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> tuple[Any, Answer]:
        """(parsed JSON answer or None for a 304, the answer); ServerRequestError or
        ProtocolError.

        Everything but a routine check-in is urgent: it is part of an enrollment or an
        update in progress, which a real device would not hold back (see ``http_pool``).
        """
        try:
            answer = await self._pool.request(
                "POST",
                path,
                json.dumps(body).encode(),
                token,
                headers=headers,
                urgent=what != "checkin",
            )
        except HttpPoolError as err:
            self.stats.error(f"{what}: {'timeout' if 'timed out' in str(err) else 'connection'}")
            raise ServerRequestError(f"{path}: {err}") from err
        except ProtocolError:
            self.stats.error(f"{what}: malformed HTTP")
            raise
        status, raw = answer.status, answer.body
        if status == 304:
            return None, answer
        if status >= 400:
            self.stats.error(f"{what}: HTTP {status}")
            text = raw[:_MAX_ERROR_CHARS].decode("utf-8", "replace")
            raise ServerRequestError(f"{path} answered {status}: {text}", status)
        try:
            return json.loads(raw), answer
        except ValueError as err:
            self.stats.error(f"{what}: not JSON")
            raise ProtocolError(f"reply from {path} is not JSON") from err

    async def enroll(
        self,
        token: str,
        hardware_id: str,
        profile: str,
        variants: tuple[str, ...],
        tags: dict[str, str],
    ) -> api.EnrollResponse:
        body = {
            "token": token,
            "hardware_id": hardware_id,
            "profile": profile,
            "variant_preference": list(variants),
            "tags": tags,
            "agent_version": AGENT_VERSION,
            "replace": True,  # a plan's hardware ids are stable: a rerun takes its devices over
        }
        data, _ = await self._post(api.ENROLL_PATH, body, None, "enroll")
        try:
            return api.EnrollResponse.from_json(data)
        except ProtocolError:
            self.stats.error("enroll: malformed reply")
            raise

    async def checkin(
        self,
        device_id: str,
        token: str,
        state: str,
        installed: api.InstalledModel | None,
        etag: str | None = None,
    ) -> Checkin:
        body = api.checkin_body(state, installed, AGENT_VERSION)
        path = api.CHECKIN_PATH.format(device_id=device_id)
        headers = [("If-None-Match", etag)] if etag else []
        data, answer = await self._post(path, body, token, "checkin", headers)
        if answer.status == 304:
            if not etag:  # 304 to an unconditional request: nothing to reuse
                self.stats.error("checkin: 304 unasked")
                raise ProtocolError(f"{path} answered 304 to a request without If-None-Match")
            self.stats.checkin(answer.took, not_modified=True)
            return Checkin(None, etag)
        try:
            reply = api.CheckinResponse.from_json(data)
        except ProtocolError:
            self.stats.error("checkin: malformed reply")
            raise
        self.stats.checkin(answer.took)
        return Checkin(reply, answer.header("etag"))

    async def events(self, device_id: str, token: str, batch: Sequence[PendingEvent]) -> int:
        """POST one batch of queued events (``agent.transport.event_queue``); the number stored."""
        path = api.EVENTS_BATCH_PATH.format(device_id=device_id)
        data, _ = await self._post(path, batch_body(batch), token, "events")
        stored = data.get("stored") if isinstance(data, dict) else None
        if not isinstance(stored, int) or isinstance(stored, bool):
            self.stats.error("events: malformed reply")
            raise ProtocolError(f"reply from {path} lacks a valid 'stored'")
        self.stats.events += len(batch)
        return stored
