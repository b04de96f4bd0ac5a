"""Console sessions: signed, opaque cookies and their CSRF tokens (no IO, no web framework).

A cookie is ``<payload>.<mac>``: the payload holds the role, the expiry and a
random session id, never a token. The MAC key is derived from the operator and
viewer tokens, so every replica that shares the tokens accepts the same
sessions, and rotating a token ends every session signed with it. The CSRF
token is a second MAC of the session id: the page gets it in its HTML, a
cross-site form cannot read it, and the server recomputes it instead of
storing it. Logout remembers the session id until it would have expired
(per process: a replica that did not see the logout still honours the cookie
until its expiry, which ``max_age_s`` bounds).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Literal

Role = Literal["viewer", "operator"]
ROLES: tuple[Role, ...] = ("viewer", "operator")
COOKIE_NAME = "edgefleet_session"
CSRF_HEADER = "X-CSRF-Token"
DEFAULT_MAX_AGE_S = 12 * 3600
_MAX_COOKIE_CHARS = 512
_MAX_REVOKED = 100_000


@dataclass(frozen=True)
class Session:
    role: Role
    session_id: str
    expires: int  # Unix seconds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """Issues and checks session cookies for one pair of operator and viewer tokens."""

    def __init__(
        self, operator_token: str, viewer_token: str, max_age_s: int = DEFAULT_MAX_AGE_S
    ) -> None:
        material = b"\0".join([b"edgefleet-console-v1", operator_token.encode(),
                               viewer_token.encode()])
        self._key = hashlib.sha256(material).digest()
        self._tokens: dict[Role, bytes] = {
            "operator": operator_token.encode(),
            "viewer": viewer_token.encode(),
        }
        self.max_age_s = max_age_s
        self._revoked: dict[str, int] = {}
        self._lock = threading.Lock()

    def role_of_token(self, token: str) -> Role | None:
        """Which role a bearer token grants, compared in constant time; None if neither."""
        given = token.encode()
        found: Role | None = None
        for role in ROLES:  # no early exit: the time does not say which one matched
            if hmac.compare_digest(given, self._tokens[role]):
                found = role
        return found

    def issue(self, role: Role, now: float | None = None) -> tuple[str, Session]:
        """A new cookie value and the session it stands for."""
        expires = int(now if now is not None else time.time()) + self.max_age_s
        session = Session(role, secrets.token_urlsafe(18), expires)
        payload = _b64(json.dumps([role, session.session_id, expires]).encode())
        return f"{payload}.{self._mac('session', payload)}", session

    def verify(self, cookie: str, now: float | None = None) -> Session | None:
        """The session a cookie stands for, or None if it is forged, expired or logged out."""
        session = self._decode(cookie)
        if session is None or session.expires <= (now if now is not None else time.time()):
            return None
        with self._lock:
            return None if session.session_id in self._revoked else session

    def _decode(self, cookie: str) -> Session | None:
        if len(cookie) > _MAX_COOKIE_CHARS or cookie.count(".") != 1:
            return None
        payload, mac = cookie.split(".")
        if not hmac.compare_digest(mac.encode(), self._mac("session", payload).encode()):
            return None
        try:
            role, session_id, expires = json.loads(_unb64(payload))
        except (ValueError, TypeError):
            return None
        if role not in ROLES or not isinstance(session_id, str) or not isinstance(expires, int):
            return None
        return Session(role, session_id, expires)

    def csrf_token(self, session: Session) -> str:
        return self._mac("csrf", session.session_id)

    def check_csrf(self, session: Session, given: str | None) -> bool:
        expected = self.csrf_token(session).encode()
        return given is not None and hmac.compare_digest(given.encode(), expected)

    def revoke(self, session: Session, now: float | None = None) -> None:
        """Forget a session at logout, so a copied cookie stops working here too."""
        current = now if now is not None else time.time()
        with self._lock:
            if len(self._revoked) >= _MAX_REVOKED:
                self._revoked = {k: v for k, v in self._revoked.items() if v > current}
            self._revoked[session.session_id] = session.expires

    def _mac(self, purpose: str, text: str) -> str:
        digest = hmac.new(self._key, f"{purpose}:{text}".encode(), hashlib.sha256).digest()
        return _b64(digest)
