"""Mount the console, its read endpoints and the offline API docs on the app."""

from __future__ import annotations

from fastapi import FastAPI

from server.console import api_docs, pages, read_api


def install_console(app: FastAPI) -> None:
    app.include_router(read_api.router)
    app.include_router(pages.router)
    api_docs.install_docs(app)
