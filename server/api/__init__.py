"""REST v1 of the fleet server (FastAPI); OpenAPI at /docs, the console at /ui/."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from server import __version__
from server.api import (
    accuracy,
    bandwidth,
    credentials,
    delta_jobs,
    devices,
    mqtt_export,
    operator,
    rollouts,
    telemetry,
    tuf,
)
from server.api.deps import AppState
from server.api.error_handlers import install_error_handlers
from server.api.limits import BodyLimitMiddleware
from server.api.rate_limit import install_rate_limits
from server.config import ensure_viewer_token
from server.console.routes import install_console
from server.console.session import SessionSigner
from server.telemetry.metrics import FleetMetrics

__all__ = ["AppState", "create_app"]


def create_app(state: AppState, metrics: FleetMetrics | None = None) -> FastAPI:
    """Build the ASGI app around one server's state.

    JSON bodies are capped at ``max_json_bytes``; only the model upload route
    gets the larger ``max_upload_bytes``. ``metrics`` adds this process's
    ingest counters to ``/metrics`` (fleet gauges come from the database).
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Sync routes run on this loop's worker threads; as many as pooled connections.
        anyio.to_thread.current_default_thread_limiter().total_tokens = state.config.http_threads
        yield

    app = FastAPI(
        lifespan=lifespan,
        title="EdgeFleet fleet server",
        version=__version__,
        description="Ships signed INT8 models to edge cameras.",
        docs_url=None,  # served by the console with local assets: /docs works offline
        redoc_url=None,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        default=state.config.max_json_bytes,
        limits={("POST", "/api/v1/models"): state.config.max_upload_bytes},
    )
    if state.viewer_token is None:
        state.viewer_token = ensure_viewer_token(state.config, state.operator_token)
    if state.sessions is None:
        state.sessions = SessionSigner(state.operator_token, state.viewer_token)
    app.state.edgefleet = state
    app.state.edgefleet_metrics = metrics or FleetMetrics(state.db, state.config)
    install_error_handlers(app)
    install_rate_limits(app, state.config)
    app.include_router(devices.router)
    app.include_router(operator.router)
    app.include_router(operator.upload_router)
    app.include_router(tuf.router)
    app.include_router(telemetry.router)
    app.include_router(telemetry.metrics_router)
    app.include_router(mqtt_export.router)
    app.include_router(bandwidth.router)
    app.include_router(delta_jobs.router)
    app.include_router(accuracy.router)
    app.include_router(rollouts.router)
    app.include_router(credentials.router)
    app.include_router(credentials.operator_router)
    install_console(app)

    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    return app
