"""HTTP client for the fleet server's device API (enroll, check-in, events).

Responses are size-bounded and parsed with the strict protocol constructors,
so a broken or hostile server yields a ``ProtocolError``, never a crash.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import requests
import urllib3

from agent import __version__
from agent.common.errors import ProtocolError, ServerRequestError
from agent.protocol import api
from agent.transport.deadline import Deadline, DeadlineExceededError, open_stream, read_body
from agent.transport.event_queue import PendingEvent, batch_body

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 4 * 1024 * 1024


class DeviceClient:
    def __init__(
        self,
        base_url: str,
        device_id: str | None = None,
        token: str | None = None,
        timeout_s: float = 15.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.device_id = device_id
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"edgefleet-agent/{__version__}"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _post(self, path: str, body: dict[str, Any], timeout_s: float | None = None) -> Any:
        """One exchange, bounded as a whole: ``timeout_s`` is an overall deadline (connect,
        headers and body), not a per-read timeout (``agent.transport.deadline``)."""
        _status, raw, _etag = self._exchange(path, body, timeout_s=timeout_s)
        try:
            return json.loads(raw)
        except ValueError as err:
            raise ProtocolError(f"reply from {path} is not JSON") from err

    def _exchange(
        self,
        path: str,
        body: dict[str, Any],
        *,
        etag: str | None = None,
        timeout_s: float | None = None,
    ) -> tuple[int, bytes, str | None]:
        """POST ``body`` (with ``If-None-Match: etag`` when given): the status, the raw
        body and the answer's ETag; 4xx/5xx and oversized answers are errors."""
        url = self.base_url + path
        deadline = Deadline(self.timeout_s if timeout_s is None else timeout_s)
        headers = {"If-None-Match": etag} if etag else {}
        try:
            budget = deadline.budget_s
            with open_stream(
                self.session, "POST", url, deadline, budget, json=body, headers=headers
            ) as resp:
                raw = read_body(resp, deadline, budget, MAX_RESPONSE_BYTES)
        except DeadlineExceededError:
            raise
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as err:
            raise ServerRequestError(f"cannot reach {url}: {err}") from err
        if len(raw) > MAX_RESPONSE_BYTES:
            raise ProtocolError(f"reply from {path} exceeds {MAX_RESPONSE_BYTES} bytes")
        if resp.status_code >= 400:
            raise ServerRequestError(
                f"{path} answered {resp.status_code}: {_error_text(raw)}", resp.status_code
            )
        return resp.status_code, raw, resp.headers.get("ETag")

    def enroll(
        self,
        token: str,
        hardware_id: str,
        profile: str,
        variant_preference: list[str],
        tags: dict[str, str],
        *,
        replace: bool = False,
    ) -> api.EnrollResponse:
        """``replace``: take over the record of an already enrolled hardware id (else 409)."""
        body = {
            "token": token,
            "hardware_id": hardware_id,
            "profile": profile,
            "variant_preference": variant_preference,
            "tags": tags,
            "agent_version": __version__,
            "replace": replace,
        }
        return api.EnrollResponse.from_json(self._post(api.ENROLL_PATH, body))

    def rotate_credentials(self) -> api.CredentialsResponse:
        """A new device token and MQTT password; the ones this client holds stop working."""
        reply = self._post(self._device_path(api.CREDENTIALS_PATH), {})
        return api.CredentialsResponse.from_json(reply)

    def checkin(
        self,
        state: str,
        installed: api.InstalledModel | None,
        previous: api.CheckinResponse | None = None,
    ) -> api.CheckinResponse:
        """Check in; with ``previous`` (the last answer) conditionally: a 304 from the
        server means nothing changed, and ``previous`` is the answer."""
        body = api.checkin_body(state, installed, __version__)
        etag = previous.etag if previous is not None else None
        path = self._device_path(api.CHECKIN_PATH)
        status, raw, new_etag = self._exchange(path, body, etag=etag)
        if status == HTTPStatus.NOT_MODIFIED:
            if previous is None:
                raise ProtocolError(f"{path} answered 304 to an unconditional check-in")
            return previous
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise ProtocolError(f"reply from {path} is not JSON") from err
        return dataclasses.replace(api.CheckinResponse.from_json(data), etag=new_etag)

    def event(self, kind: str, state: str, detail: dict[str, Any]) -> None:
        body = {"type": kind, "state": state, "detail": detail}
        self._post(self._device_path(api.EVENTS_PATH), body)

    def events(self, batch: Sequence[PendingEvent], timeout_s: float | None = None) -> int:
        """POST one batch of queued events; the number the server stored."""
        path = self._device_path(api.EVENTS_BATCH_PATH)
        reply = self._post(path, batch_body(batch), timeout_s)
        stored = reply.get("stored") if isinstance(reply, dict) else None
        if not isinstance(stored, int) or isinstance(stored, bool):
            raise ProtocolError(f"reply from {path} lacks a valid 'stored'")
        return stored

    def _device_path(self, template: str) -> str:
        if not self.device_id:
            raise ServerRequestError("device is not enrolled")
        return template.format(device_id=self.device_id)


def _error_text(raw: bytes) -> str:
    try:
        data = json.loads(raw)
    except ValueError:
        return raw[:200].decode("utf-8", "replace")
    if isinstance(data, dict):
        return str(data.get("error") or data.get("detail") or data)[:300]
    return str(data)[:300]
