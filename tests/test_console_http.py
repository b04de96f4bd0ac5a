"""The console and /docs over plain HTTP: pages answer, reference only this host, and the
session, CSRF and viewer rules hold (the browser tests are in test_console_browser.py)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
import requests

from server.app import ServerHandle
from server.config import VIEWER_TOKEN_FILE
from server.console.session import COOKIE_NAME, SessionSigner


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href", "action") and v]


def references(html: str) -> list[str]:
    """Every URL the HTML names: attributes, and string literals in inline scripts."""
    parser = _Refs()
    parser.feed(html)
    return parser.urls + re.findall(r"""['"]((?:https?:)?//[^'"]+)['"]""", html)


def assert_same_host(html: str) -> None:
    for url in references(html):
        parts = urlsplit(url)
        assert not parts.netloc and parts.scheme in ("", "data"), f"off-host reference {url!r}"


def viewer_token(server: ServerHandle) -> str:
    return (server.config.data_dir / VIEWER_TOKEN_FILE).read_text().strip()


def login(server: ServerHandle, token: str) -> requests.Session:
    session = requests.Session()
    resp = session.post(f"{server.url}/ui/login", data={"token": token}, allow_redirects=False,
                        timeout=10)
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/"
    return session


def csrf_of(session: requests.Session, server: ServerHandle) -> str:
    page = session.get(f"{server.url}/ui/", timeout=10).text
    found = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert found is not None
    return found.group(1)


@pytest.mark.parametrize("path", ["/ui/login", "/docs", "/redoc"])
def test_pages_answer_and_name_only_this_host(module_server: ServerHandle, path: str) -> None:
    resp = requests.get(module_server.url + path, timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert_same_host(resp.text)
    for url in references(resp.text):
        if url.startswith("/") and not url.startswith("//"):
            asset = requests.get(module_server.url + url, timeout=30)
            assert asset.status_code == 200, url


def test_the_console_needs_a_login_and_names_only_this_host(module_server: ServerHandle) -> None:
    url = module_server.url
    anonymous = requests.get(f"{url}/ui/", allow_redirects=False, timeout=10)
    assert anonymous.status_code == 303 and anonymous.headers["location"] == "/ui/login"
    session = login(module_server, module_server.operator_token)
    page = session.get(f"{url}/ui/", timeout=10)
    assert page.status_code == 200 and 'data-role="operator"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert_same_host(page.text)
    for asset in ("plotly.min.js", "console.js", "console.css"):
        assert session.get(f"{url}/ui/assets/{asset}", timeout=30).status_code == 200
    assert session.get(f"{url}/ui/assets/..%2Fsession.py", timeout=10).status_code == 404


def test_the_session_cookie_is_opaque_http_only_and_strict(module_server: ServerHandle) -> None:
    resp = requests.post(f"{module_server.url}/ui/login",
                         data={"token": module_server.operator_token}, allow_redirects=False,
                         timeout=10)
    header = resp.headers["set-cookie"]
    assert "HttpOnly" in header and "SameSite=strict" in header and "Path=/" in header
    assert module_server.operator_token not in header
    wrong = requests.post(f"{module_server.url}/ui/login", data={"token": "x" * 40},
                          allow_redirects=False, timeout=10)
    assert wrong.status_code == 303 and wrong.headers["location"] == "/ui/login?failed=1"
    assert "set-cookie" not in wrong.headers
    forged = requests.post(f"{module_server.url}/ui/login", timeout=10,
                           data={"token": module_server.operator_token},
                           headers={"Origin": "http://evil.example"}, allow_redirects=False)
    assert forged.status_code == 403


def test_console_actions_need_the_csrf_token(module_server: ServerHandle) -> None:
    url = module_server.url
    session = login(module_server, module_server.operator_token)
    assert session.get(f"{url}/api/v1/fleet", timeout=10).status_code == 200
    refused = session.post(f"{url}/api/v1/enrollment-tokens", json={}, timeout=10)
    assert refused.status_code == 403 and "X-CSRF-Token" in refused.json()["error"]
    token = csrf_of(session, module_server)
    made = session.post(f"{url}/api/v1/enrollment-tokens", json={}, timeout=10,
                        headers={"X-CSRF-Token": token})
    assert made.status_code == 201
    # Logout ends the session: the same cookie no longer reads anything.
    cookie = session.cookies[COOKIE_NAME]
    out = session.post(f"{url}/ui/logout", headers={"X-CSRF-Token": token},
                       allow_redirects=False, timeout=10)
    assert out.status_code == 303 and COOKIE_NAME not in session.cookies
    stale = requests.get(f"{url}/api/v1/fleet", cookies={COOKIE_NAME: cookie}, timeout=10)
    assert stale.status_code == 401 and "/ui/login" in stale.json()["error"]


def test_a_viewer_reads_but_never_acts(module_server: ServerHandle) -> None:
    url, token = module_server.url, viewer_token(module_server)
    bearer = {"Authorization": f"Bearer {token}"}
    for path in ("/api/v1/devices", "/api/v1/fleet", "/api/v1/rollouts", "/api/v1/bandwidth"):
        assert requests.get(url + path, headers=bearer, timeout=10).status_code == 200, path
    secrets_ = requests.get(f"{url}/api/v1/mqtt/broker-files", headers=bearer, timeout=10)
    assert secrets_.status_code == 403
    act = requests.post(f"{url}/api/v1/enrollment-tokens", json={}, headers=bearer, timeout=10)
    assert act.status_code == 403 and "viewer" in act.json()["error"]
    session = login(module_server, token)
    page = session.get(f"{url}/ui/", timeout=10).text
    assert 'data-role="viewer"' in page
    refused = session.post(f"{url}/api/v1/enrollment-tokens", json={}, timeout=10,
                           headers={"X-CSRF-Token": csrf_of(session, module_server)})
    assert refused.status_code == 403 and "viewer" in refused.json()["error"]


def test_sessions_are_signed_expire_and_follow_the_tokens() -> None:
    signer = SessionSigner("o" * 32, "v" * 32, max_age_s=60)
    cookie, session = signer.issue("viewer", now=1000.0)
    assert signer.verify(cookie, now=1001.0) == session
    assert signer.verify(cookie, now=1061.0) is None  # expired
    payload, mac = cookie.split(".")
    assert signer.verify(f"{payload}.{mac[:-2]}xx", now=1001.0) is None
    other = SessionSigner("o" * 32, "w" * 32)
    assert other.verify(cookie, now=1001.0) is None  # a rotated token ends old sessions
    assert signer.role_of_token("o" * 32) == "operator" and signer.role_of_token("nope") is None
    assert signer.check_csrf(session, signer.csrf_token(session))
    assert not signer.check_csrf(session, "é" * 10) and not signer.check_csrf(session, None)
    signer.revoke(session, now=1001.0)
    assert signer.verify(cookie, now=1001.0) is None
