"""The console's pages: login, logout, the single page at ``/ui/`` and its assets.

The page is static HTML and JavaScript from this package; charts come from
plotly.js inside the installed ``plotly`` package, served here, so nothing is
fetched from another host (the Content-Security-Policy says so to the browser).
The page calls the REST API with the session cookie; its actions carry the
CSRF token the page was rendered with (see ``server.api.deps.caller_role``).
"""

from __future__ import annotations

import html
import importlib.util
import logging
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from server.api.deps import app_state
from server.console.session import COOKIE_NAME, CSRF_HEADER, Session, SessionSigner
from server.errors import ConfigError, ForbiddenError, NotFoundError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PLOTLY_JS = "plotly.min.js"
_OWN_ASSETS = {"console.js": "text/javascript", "console.css": "text/css"}
_MAX_TOKEN_CHARS = 1024
# plotly.js sets inline styles on the elements it draws; scripts and requests stay same-origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; font-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make the login's Origin "null"
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix="/ui", include_in_schema=False)


def _signer(request: Request) -> SessionSigner:
    signer = app_state(request).sessions
    if signer is None:
        raise ConfigError("console sessions are not set up (create_app makes them)")
    return signer


def _current(request: Request) -> Session | None:
    cookie = request.cookies.get(COOKIE_NAME)
    return None if cookie is None else _signer(request).verify(cookie)


@lru_cache(maxsize=4)
def _template(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def plotly_js_path() -> Path:
    """plotly.min.js as the ``plotly`` package installs it (the server extra has it)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError("the console's charts need the plotly package: pip install plotly")
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / PLOTLY_JS
    if not path.is_file():
        raise NotFoundError(f"{path} is missing from the installed plotly package")
    return path


def _page(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=_HEADERS)


@router.get("")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/")
def console(request: Request) -> Response:
    session = _current(request)
    if session is None:
        return RedirectResponse("/ui/login", status_code=303)
    text = _template("index.html")
    text = text.replace("{{role}}", session.role)
    text = text.replace("{{csrf}}", html.escape(_signer(request).csrf_token(session)))
    return _page(text)


@router.get("/login")
def login_form(request: Request, failed: int = 0) -> Response:
    if _current(request) is not None:
        return RedirectResponse("/ui/", status_code=303)
    message = "That token is neither the operator nor the viewer token." if failed else ""
    return _page(_template("login.html").replace("{{message}}", html.escape(message)))


def _same_origin(request: Request) -> bool:
    """Refuse a login form posted from another site (login CSRF). Browsers send
    Sec-Fetch-Site, or at least Origin, on a POST; a client with neither is not a browser."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    return origin is None or origin.split("://", 1)[-1] == request.headers.get("host", "")


@router.post("/login")
def login(request: Request, token: Annotated[str, Form(max_length=_MAX_TOKEN_CHARS)]) -> Response:
    if not _same_origin(request):
        raise ForbiddenError("login refused: the form was posted from another site")
    signer = _signer(request)
    role = signer.role_of_token(token.strip())
    if role is None:
        log.warning("console login refused from %s", request.client.host if request.client else "?")
        return RedirectResponse("/ui/login?failed=1", status_code=303)
    cookie, session = signer.issue(role)
    response = RedirectResponse("/ui/", status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        cookie,
        max_age=signer.max_age_s,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    log.info("console login as %s", session.role)
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    session = _current(request)
    response = RedirectResponse("/ui/login", status_code=303)
    if session is not None:
        if not _signer(request).check_csrf(session, request.headers.get(CSRF_HEADER)):
            raise ForbiddenError(f"logout needs the {CSRF_HEADER} header")
        _signer(request).revoke(session)
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
    return response


@router.get("/assets/{name}")
def asset(name: str) -> FileResponse:
    if name == PLOTLY_JS:
        path, media = plotly_js_path(), "text/javascript"
    elif name in _OWN_ASSETS:
        path, media = STATIC / name, _OWN_ASSETS[name]
    else:
        raise NotFoundError(f"no console asset {name!r}")
    return FileResponse(
        path, media_type=media, headers={"Cache-Control": "public, max-age=3600"}
    )
