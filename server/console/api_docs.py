"""``/docs`` (Swagger UI) and ``/redoc`` with their assets served here, not from a CDN.

The assets come from the ``fastapi-offline`` package (Swagger UI 5, which
reads FastAPI's OpenAPI 3.1, and ReDoc), installed with the server extra; we
use its files only. Without it ``/docs`` answers 404 with the reason rather
than a blank page.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse

from server.errors import NotFoundError

ASSETS = "/docs/assets"
_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
_OAUTH2_REDIRECT = "/docs/oauth2-redirect"


@lru_cache(maxsize=1)
def assets_dir() -> Path:
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError("/docs needs its offline assets: pip install fastapi-offline")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def install_docs(app: FastAPI) -> None:
    """Add /docs and /redoc to an app built with ``docs_url=None, redoc_url=None``."""
    router = APIRouter(include_in_schema=False)
    openapi_url = app.openapi_url or "/openapi.json"
    title = app.title

    @router.get("/docs")
    def swagger_ui() -> HTMLResponse:
        assets_dir()  # a clear 404 when the package is missing
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} - API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
            oauth2_redirect_url=_OAUTH2_REDIRECT,
            # The default validator is a remote service; never call out.
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True},
        )

    @router.get(_OAUTH2_REDIRECT)
    def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    def redoc() -> HTMLResponse:
        assets_dir()
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=f"{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS}/favicon.png",
            with_google_fonts=False,
        )

    @router.get(ASSETS + "/{name}")
    def asset(name: str) -> FileResponse:
        if name not in _FILES:
            raise NotFoundError(f"no docs asset {name!r}")
        return FileResponse(
            assets_dir() / name,
            media_type=_FILES[name],
            headers={"Cache-Control": "public, max-age=86400"},
        )

    app.include_router(router)
