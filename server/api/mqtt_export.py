"""``GET /api/v1/mqtt/broker-files``: Mosquitto password and ACL files (operator only).

The operator CLI (``edgefleet mqtt export-acl DIR``) calls this, like every
other operator command: the database stays on the server, and the files are
built from one consistent read. See ``server.mqtt.acl`` for the rules.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from server.api.deps import AppState, OperatorRoute, app_state, bearer_scheme
from server.api.schemas import ErrorOut
from server.mqtt.acl import export_broker_files

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/api/v1/mqtt",
    tags=["mqtt"],
    route_class=OperatorRoute,
    dependencies=[Depends(bearer_scheme)],
    responses={401: {"model": ErrorOut}},
)
State = Annotated[AppState, Depends(app_state)]


class BrokerFilesOut(BaseModel):
    passwd: str
    acl: str
    devices: int
    ingest_user: str
    warnings: list[str]


@router.get("/broker-files", response_model=BrokerFilesOut)
def broker_files(st: State) -> BrokerFilesOut:
    """Mosquitto ``password_file`` and ``acl_file`` contents for every enrolled device."""
    with st.db.session() as s:
        files = export_broker_files(s, st.config)
    log.info("exported Mosquitto files for %d devices", files.devices)
    return BrokerFilesOut(
        passwd=files.passwd,
        acl=files.acl,
        devices=files.devices,
        ingest_user=files.ingest_user,
        warnings=list(files.warnings),
    )
