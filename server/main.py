"""``edgefleet-server``: run the fleet server (API, embedded broker, telemetry ingest)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from server import __version__
from server.app import start_server
from server.config import DEFAULT_PUSH_RATE_PER_S, OPERATOR_TOKEN_ENV, ServerConfig
from server.db.commands import add_db_parser, run_db
from server.errors import ConfigError, ServerError

log = logging.getLogger("edgefleet.server")
ENROLLMENT_TOKEN_ENV = "EDGEFLEET_ENROLLMENT_TOKEN"  # noqa: S105 - a variable name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefleet-server", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgefleet-server {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the fleet server until SIGTERM/SIGINT")
    run.add_argument("--data", type=Path, required=True, help="data directory (DB, keys, repo)")
    run.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        help="TUF signing keys made by `edgefleet keys init DIR` (default: DATA/keys, "
        "generated on first start)",
    )
    run.add_argument("--port", type=int, default=8080, help="HTTP port (0 = any free port)")
    run.add_argument("--host", default="127.0.0.1", help="HTTP listen address")
    run.add_argument(
        "--db-url",
        default=os.environ.get("EDGEFLEET_DB_URL") or None,
        help="sqlite:///PATH or postgresql://USER@HOST/DB (default $EDGEFLEET_DB_URL, else SQLite)",
    )
    run.add_argument(
        "--mqtt-url",
        default=os.environ.get("EDGEFLEET_MQTT_URL") or None,
        help="external broker mqtt://user:pass@host:port (default $EDGEFLEET_MQTT_URL, "
        "else the embedded broker)",
    )
    run.add_argument("--mqtt-host", default="127.0.0.1", help="embedded broker listen address")
    run.add_argument("--mqtt-port", type=int, default=0, help="embedded broker port (0 = free)")
    run.add_argument("--mqtt-public-host", help="MQTT host handed to devices")
    run.add_argument("--mqtt-public-port", type=int, help="MQTT port handed to devices")
    run.add_argument("--mqtt-tls-cert", type=Path, help="embedded broker: TLS certificate (PEM)")
    run.add_argument("--mqtt-tls-key", type=Path, help="embedded broker: TLS private key (PEM)")
    run.add_argument("--mqtt-ca-file", type=Path, help="CA bundle to verify an mqtts:// broker")
    run.add_argument(
        "--metrics-token-file",
        type=Path,
        help="read-only bearer token for GET /metrics (also $EDGEFLEET_METRICS_TOKEN)",
    )
    run.add_argument(
        "--ingest-ack-after-commit",
        action="store_true",
        help="external broker: acknowledge telemetry only once stored (Mosquitto needs "
        "max_queued_messages 0, or it drops what waits)",
    )
    run.add_argument(
        "--telemetry-retention-days",
        type=float,
        default=30.0,
        help="keep telemetry rollups this long (default 30)",
    )
    run.add_argument(
        "--operator-token",
        help=f"operator bearer token (default: ${OPERATOR_TOKEN_ENV} "
        "or DATA/operator.token, generated on first start)",
    )
    run.add_argument(
        "--operator-token-file",
        type=Path,
        help="read the operator token from this file (e.g. a systemd credential)",
    )
    run.add_argument(
        "--enrollment-token",
        action="append",
        default=[],
        help=f"a static enrollment token (repeatable; also ${ENROLLMENT_TOKEN_ENV})",
    )
    run.add_argument(
        "--ingest-client-id",
        default="edgefleet-server-ingest",
        help="MQTT client id of the telemetry subscriber (unique per server replica)",
    )
    run.add_argument(
        "--poll-interval",
        type=float,
        default=0.0,
        help="device check-in seconds (default: 900 while pushing check-ins over MQTT, else 30)",
    )
    run.add_argument(
        "--push-rate",
        type=float,
        default=DEFAULT_PUSH_RATE_PER_S,
        help=f"check-in commands pushed per second (default {DEFAULT_PUSH_RATE_PER_S:g}; "
        "0 = no pushes: devices poll)",
    )
    run.add_argument(
        "--rollout-scheduler",
        choices=("auto", "thread", "process"),
        default="auto",
        help="where rollouts tick: auto = its own process on PostgreSQL, else a thread",
    )
    run.add_argument(
        "--http-threads", type=int, default=16, help="request threads and pooled DB connections"
    )
    run.add_argument("--max-upload-mb", type=int, default=256, help="model upload size limit")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="HTTP worker processes (PostgreSQL only); background services run once",
    )
    run.add_argument(
        "--delta-workers",
        type=int,
        default=1,
        help="deltas built at a time after publish; 0: this server builds none",
    )
    run.add_argument(
        "--artifact-store",
        metavar="DIR|s3://BUCKET/PREFIX",
        help="where TUF metadata and targets are stored (default DATA/repo); S3 credentials "
        "from the usual AWS_* variables",
    )
    run.add_argument(
        "--s3-endpoint-url", help="S3-compatible endpoint (default $AWS_ENDPOINT_URL, else AWS)"
    )
    run.add_argument(
        "--targets-url",
        metavar="URL",
        help="base URL devices fetch TUF metadata and targets from (a CDN or the bucket's "
        "public URL; default this server)",
    )
    # Rate limits, per server process (N replicas admit N times as much); 0 = no limit.
    run.add_argument(
        "--enroll-rate", type=float, default=5.0, help="enrollments/s per enrollment token"
    )
    run.add_argument("--enroll-burst", type=int, default=1000, help="enrollments at once")
    run.add_argument("--checkin-rate", type=float, default=5.0, help="check-ins/s per device")
    run.add_argument("--checkin-burst", type=int, default=30, help="check-ins at once")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_db_parser(sub)  # edgefleet-server db upgrade|current|check|history
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    tokens = list(args.enrollment_token)
    operator_token = args.operator_token
    if args.operator_token_file is not None:
        try:
            operator_token = args.operator_token_file.read_text().strip()
        except OSError as err:
            raise ConfigError(f"cannot read {args.operator_token_file}: {err}") from err
        if not operator_token:
            raise ConfigError(f"{args.operator_token_file} is empty")
    if os.environ.get(ENROLLMENT_TOKEN_ENV):
        tokens.append(os.environ[ENROLLMENT_TOKEN_ENV])
    metrics_token = None
    if args.metrics_token_file is not None:
        try:
            metrics_token = args.metrics_token_file.read_text().strip()
        except OSError as err:
            raise ConfigError(f"cannot read {args.metrics_token_file}: {err}") from err
        if not metrics_token:
            raise ConfigError(f"{args.metrics_token_file} is empty")
    if args.keys is not None:
        from server.publish.keys import check_keys_dir  # noqa: PLC0415 - only with --keys

        check_keys_dir(args.keys)  # refuse before anything starts, naming the bad file
    return ServerConfig(
        data_dir=args.data,
        keys_dir=args.keys,
        host=args.host,
        port=args.port,
        db_url=args.db_url,
        mqtt_url=args.mqtt_url,
        mqtt_bind_host=args.mqtt_host,
        mqtt_bind_port=args.mqtt_port,
        mqtt_public_host=args.mqtt_public_host,
        mqtt_public_port=args.mqtt_public_port,
        operator_token=operator_token,
        enrollment_tokens=tuple(tokens),
        poll_interval_s=args.poll_interval,
        push_rate_per_s=args.push_rate,
        http_threads=args.http_threads,
        rollout_scheduler=args.rollout_scheduler,
        ingest_client_id=args.ingest_client_id,
        max_upload_bytes=args.max_upload_mb * 1024 * 1024,
        workers=args.workers,
        delta_workers=args.delta_workers,
        artifact_store=args.artifact_store,
        s3_endpoint_url=args.s3_endpoint_url,
        targets_url=args.targets_url,
        enroll_rate_per_s=args.enroll_rate,
        enroll_burst=args.enroll_burst,
        checkin_rate_per_s=args.checkin_rate,
        checkin_burst=args.checkin_burst,
        log_level=args.log_level,
        mqtt_tls_cert_file=args.mqtt_tls_cert,
        mqtt_tls_key_file=args.mqtt_tls_key,
        mqtt_ca_file=args.mqtt_ca_file,
        metrics_token=metrics_token,
        telemetry_retention_days=args.telemetry_retention_days,
        ingest_ack_after_commit=args.ingest_ack_after_commit,
    )


def run(config: ServerConfig) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    handle = start_server(config)
    source = (
        "given"
        if config.operator_token or os.environ.get(OPERATOR_TOKEN_ENV)
        else (f"in {handle.config.token_file}")
    )
    log.info("EdgeFleet server %s: API %s (OpenAPI %s/docs)", __version__, handle.url, handle.url)
    log.info(
        "MQTT for devices: %s:%s; operator token %s", handle.mqtt_host, handle.mqtt_port, source
    )
    try:
        stop.wait()
    finally:
        handle.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level != "debug":
        # Alembic logs its setup at INFO (server.db.schema logs the upgrade itself).
        for noisy in ("alembic",):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "db":
            return run_db(args)
        return run(config_from_args(args))
    except ServerError as err:
        print(f"edgefleet-server: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
