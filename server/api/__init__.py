"""REST v1 of the fleet server (FastAPI); OpenAPI at /docs."""

from __future__ import annotations

from fastapi import FastAPI

from server import __version__
from server.api import bandwidth, devices, operator, tuf
from server.api.deps import AppState
from server.api.errors import install_error_handlers
from server.api.limits import BodyLimitMiddleware

__all__ = ["AppState", "create_app"]


def create_app(state: AppState) -> FastAPI:
    """Build the ASGI app around one server's state.

    JSON bodies are capped at ``max_json_bytes``; only the model upload route
    gets the larger ``max_upload_bytes``.
    """
    app = FastAPI(
        title="EdgeFleet fleet server",
        version=__version__,
        description="Ships signed INT8 models to edge cameras.",
    )
    app.add_middleware(
        BodyLimitMiddleware,
        default=state.config.max_json_bytes,
        limits={("POST", "/api/v1/models"): state.config.max_upload_bytes},
    )
    app.state.edgefleet = state
    install_error_handlers(app)
    app.include_router(devices.router)
    app.include_router(operator.router)
    app.include_router(operator.upload_router)
    app.include_router(tuf.router)
    app.include_router(bandwidth.router)

    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    return app
