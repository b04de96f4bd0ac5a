"""What the demo prints for an operator: the URLs this server answers, and the tokens.

Kept apart from ``demo.py`` so a test can check every printed URL against a running
server without starting the demo fleet.
"""

from __future__ import annotations

from pathlib import Path

import requests


def access_lines(
    url: str, token: str, token_file: Path | None, *, viewer_token: str | None = None
) -> list[str]:
    """Where an operator goes next: every URL that this server answers, and the token.

    Each URL is probed with the token first and left out if the server does not
    serve it (the web console at /ui/ is optional), so nothing printed is a 404.
    """
    urls = [
        ("console", "/ui/", "log in with the operator token"),
        ("API", "/api/v1/devices", "send Authorization: Bearer <operator token>"),
        ("API docs", "/docs", "OpenAPI at /openapi.json"),
        ("metrics", "/metrics", "Prometheus; needs the operator or the metrics token"),
        ("TUF root", "/tuf/metadata/root.json", "what devices pin: edgefleet root export"),
    ]
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    lines = []
    for label, path, note in urls:
        try:
            status = session.get(url + path, timeout=10).status_code
        except requests.RequestException:
            status = 0
        if 200 <= status < 400:
            lines.append(f"{label + ':':<17}{url}{path}  ({note})")
    stored = f" (stored in {token_file})" if token_file is not None else ""
    lines += [
        f"{'operator token:':<17}{token}{stored}",
        *(
            [f"{'viewer token:':<17}{viewer_token} (read-only: the console and REST GETs)"]
            if viewer_token
            else []
        ),
        f"{'CLI:':<17}export EDGEFLEET_SERVER={url} EDGEFLEET_TOKEN={token}",
        f"{'':<17}edgefleet device list; edgefleet telemetry; edgefleet rollout list",
    ]
    return lines
