"""``edgefleet-agent``: enroll this camera, run the daemon, show its state."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from types import FrameType

from agent import __version__, trial
from agent.common.errors import AgentError
from agent.config import AgentConfig, load_config, render_config
from agent.daemon import Agent, ensure_state_dir, resolve_profile
from agent.identity import hardware_id, load_identity, save_enrollment
from agent.transport.device_api import DeviceClient
from agent.update.slots import SlotStore

log = logging.getLogger("edgefleet.agent")


def _tags(values: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise argparse.ArgumentTypeError(f"--tag must look like key=value, got {item!r}")
        tags[key] = value
    return tags


def _config_for_enroll(args: argparse.Namespace) -> tuple[AgentConfig, Path | None]:
    path = Path(args.config) if args.config else None
    if path is not None and path.exists():
        return load_config(path), path
    if args.state_dir is None:
        raise AgentError("enroll needs --config (existing or to create) or --state-dir")
    cfg = AgentConfig(
        state_dir=Path(args.state_dir).resolve(), server=args.server, profile=args.profile
    )
    return cfg, path


def cmd_enroll(args: argparse.Namespace) -> int:
    cfg, path = _config_for_enroll(args)
    if args.profile != "auto":
        cfg = replace(cfg, profile=args.profile)
    ensure_state_dir(cfg.state_dir)
    profile = resolve_profile(cfg)
    root = Path(args.root).read_bytes() if args.root else None
    hw = args.hardware_id or hardware_id(Path(cfg.hw_root))
    reply = DeviceClient(args.server).enroll(
        args.token, hw, profile.name, list(profile.runtime.variant_preference), _tags(args.tag)
    )
    ident = save_enrollment(cfg.state_dir, args.server, profile.name, reply, root)
    if path is not None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_config(replace(cfg, server=args.server)))
    print(f"enrolled as {ident.device_id} (profile {profile.name}); state in {cfg.state_dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(Path(args.config))
    logging.getLogger().setLevel(cfg.log_level.upper())
    agent = Agent(cfg)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        agent.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # `kill -USR1 <pid>` dumps every thread's stack: a hung agent can be diagnosed in the field.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    agent.run_forever()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(Path(args.config))
    ident = load_identity(cfg.state_dir)
    slots = SlotStore(cfg.state_dir / "slots")
    record_path = cfg.state_dir / "update.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"state": "idle"}
    manifest = slots.active_manifest()
    out = {
        "device_id": ident.device_id,
        "server": ident.server,
        "profile": ident.profile,
        "active_slot": slots.active(),
        "active_model": (
            {k: manifest.get(k) for k in ("name", "release", "variant", "sha256")}
            if manifest
            else None
        ),
        "update_state": record.get("state"),
        "last_reason": record.get("reason"),
    }
    print(json.dumps(out, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefleet-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgefleet-agent {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    enroll = sub.add_parser("enroll", help="register this camera with a fleet server")
    enroll.add_argument("--server", required=True, help="fleet server URL, e.g. https://fleet:8080")
    enroll.add_argument("--token", required=True, help="enrollment token from the operator")
    enroll.add_argument("--config", help="agent TOML; created when absent")
    enroll.add_argument("--state-dir", help="state directory when no config exists yet")
    enroll.add_argument("--root", help="trusted TUF root.json shipped with the device image")
    enroll.add_argument("--profile", default="auto", help="firmware profile name (default: detect)")
    enroll.add_argument("--hardware-id", help="override the detected hardware id")
    enroll.add_argument("--tag", action="append", default=[], help="key=value, repeatable")
    enroll.set_defaults(func=cmd_enroll)

    run = sub.add_parser("run", help="run the agent daemon")
    run.add_argument("--config", required=True)
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="print this device's identity and installed model")
    status.add_argument("--config", required=True)
    status.set_defaults(func=cmd_status)

    trial.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = args.command == "try"  # its output is the per-frame lines, not the log
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (AgentError, argparse.ArgumentTypeError) as err:
        print(f"edgefleet-agent: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `edgefleet-agent try ... | head`: the reader left
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the final flush does not fail again
        os.close(devnull)
        return 0
    except OSError as err:
        print(f"edgefleet-agent: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
