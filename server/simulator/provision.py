"""Create simulated devices directly in the server's database (for large benchmarks).

Enrolling 65,000 devices over HTTP measures enrollment, not rollouts; this
writes them with the server's own ``queries.enroll_device`` (the same rows,
tags, hashed secrets and ``enrolled`` event as the REST route) and, when
given, records the release they already run with ``queries.record_checkin``.
Batches of ``batch`` devices share one transaction. Everything a device
does afterwards (check-ins, events, telemetry) goes over the wire.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from agent import __version__ as AGENT_VERSION  # noqa: N812
from agent.protocol.api import InstalledModel, MqttCredentials
from server.db import queries
from server.db.tables import Database
from server.simulator.fleet import Credentials
from server.simulator.plan import PlannedDevice

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def provision(
    db: Database,
    plan: Sequence[PlannedDevice],
    mqtt: MqttCredentials | None,
    installed: InstalledModel | None = None,
    *,
    batch: int = 1000,
    progress: Progress | None = None,
) -> list[Credentials]:
    """Create (or re-key) every planned device; ``mqtt`` gives the broker address."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    out: list[Credentials] = []
    for at in range(0, len(plan), batch):
        with db.session() as s:
            for p in plan[at : at + batch]:
                creds = queries.enroll_device(
                    s,
                    hardware_id=p.hardware_id,
                    profile=p.profile,
                    variant_preference=list(p.variants),
                    tags=dict(p.tags),
                    agent_version=AGENT_VERSION,
                    replace=True,  # create or re-key, as over REST
                )
                if installed is not None:
                    device = queries.get_device(s, creds.device_id)
                    queries.record_checkin(s, device, "idle", installed, AGENT_VERSION)
                link = None
                if mqtt is not None:
                    link = MqttCredentials(
                        mqtt.host, mqtt.port, creds.device_id, creds.mqtt_password, mqtt.tls
                    )
                out.append(Credentials(p.hardware_id, creds.device_id, creds.device_token, link))
        if progress is not None:
            progress(len(out), len(plan))
    log.info("provisioned %d devices in the database", len(out))
    return out
