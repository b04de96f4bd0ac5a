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
from agent.common.errors import AgentError, ProfileError, ServerRequestError
from agent.config import (
    DEFAULT_STATE_DIR,
    AgentConfig,
    default_state_dir,
    load_config,
    render_config,
)
from agent.daemon import Agent, ensure_state_dir
from agent.identity import (
    existing_identity,
    hardware_id,
    load_identity,
    save_enrollment,
    save_rotated,
)
from agent.profiles.choice import resolve_profile
from agent.profiles.detect import NoMatchingProfileError
from agent.profiles.listing import list_profiles, render_table
from agent.profiles.schema import Profile, default_profiles_dir, load_profiles
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
    """The existing config, or a new one (written after enrolling) with a default state dir."""
    path = Path(args.config) if args.config else None
    if path is not None and path.exists():
        return load_config(path), path
    if path is None and args.state_dir is None:
        raise AgentError("enroll needs --config FILE (created when absent) or --state-dir DIR")
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    return AgentConfig(state_dir=state_dir.resolve(), server=args.server), path


def _enroll_profile(cfg: AgentConfig, path: Path | None) -> Profile:
    try:
        return resolve_profile(cfg)
    except NoMatchingProfileError as err:
        # The daemon's advice ("set 'profile' in the configuration") does not fit here:
        # enroll is what writes that configuration.
        where = f", or set 'profile' in {path}" if path is not None and path.exists() else ""
        raise ProfileError(
            f"{err.reason}. Choose a profile with --profile NAME{where} "
            f"(known: {', '.join(err.known)}; `edgefleet-agent profiles` describes them)"
        ) from err


def cmd_enroll(args: argparse.Namespace) -> int:
    cfg, path = _config_for_enroll(args)
    if args.profile != "auto":
        cfg = replace(cfg, profile=args.profile)
    profile = _enroll_profile(cfg, path)
    ensure_state_dir(cfg.state_dir)
    root = Path(args.root).read_bytes() if args.root else None
    hw = args.hardware_id or hardware_id(Path(cfg.hw_root))
    # Re-enrolling this device: its current token proves it is the device it replaces.
    current = existing_identity(cfg.state_dir, args.server)
    if current is not None:
        log.info("presenting the device token of %s as proof of identity", current.device_id)
    proof = current.device_token if current is not None else None
    try:
        reply = DeviceClient(args.server, token=proof).enroll(
            args.token,
            hw,
            profile.name,
            list(profile.runtime.variant_preference),
            _tags(args.tag),
            replace=args.replace,
        )
    except ServerRequestError as err:
        if err.status != 409:
            raise
        raise ServerRequestError(
            f"{err} (a second agent on this host needs its own --hardware-id)", err.status
        ) from err
    ident = save_enrollment(cfg.state_dir, args.server, profile.name, reply, root)
    if path is not None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_config(replace(cfg, server=args.server)))
    print(f"enrolled as {ident.device_id} (profile {profile.name}); state in {cfg.state_dir}")
    return 0


def cmd_rotate_credentials(args: argparse.Namespace) -> int:
    """New device token and MQTT password from the server, written atomically to device.json."""
    cfg = load_config(Path(args.config))
    ident = load_identity(cfg.state_dir)
    client = DeviceClient(ident.server, ident.device_id, ident.device_token)
    rotated = save_rotated(cfg.state_dir, ident, client.rotate_credentials())
    # The daemon read the old identity at start; its token no longer works.
    print(
        f"rotated the credentials of {rotated.device_id}; restart the agent "
        "(systemctl restart edgefleet-agent) so the daemon uses them"
    )
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    cfg = load_config(Path(args.config)) if args.config else None
    folder = Path(cfg.profiles_dir) if cfg and cfg.profiles_dir else default_profiles_dir()
    root = Path(args.hw_root or (cfg.hw_root if cfg else "/"))
    listing = list_profiles(load_profiles(folder), root)
    print(json.dumps(listing.rows, indent=2) if args.json else render_table(listing))
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
    enroll.add_argument(
        "--state-dir",
        help="state directory for a new config (default $STATE_DIRECTORY, else "
        f"{DEFAULT_STATE_DIR})",
    )
    enroll.add_argument("--root", help="trusted TUF root.json shipped with the device image")
    enroll.add_argument(
        "--profile",
        default="auto",
        help="firmware profile name (default: detect; `edgefleet-agent profiles` lists them)",
    )
    enroll.add_argument("--hardware-id", help="override the detected hardware id")
    enroll.add_argument("--tag", action="append", default=[], help="key=value, repeatable")
    enroll.add_argument(
        "--replace",
        action="store_true",
        help="take over the server's record of an already enrolled hardware id (needs this "
        "device's current identity in the state dir, or an operator's approve-reenroll)",
    )
    enroll.set_defaults(func=cmd_enroll)

    rotate = sub.add_parser(
        "rotate-credentials", help="get a new device token and MQTT password; the old ones die"
    )
    rotate.add_argument("--config", required=True)
    rotate.set_defaults(func=cmd_rotate_credentials)

    profiles = sub.add_parser(
        "profiles", help="list the firmware profiles; * marks the one this board matches"
    )
    profiles.add_argument("--json", action="store_true", help="print a JSON list")
    profiles.add_argument("--config", help="agent TOML (its profiles_dir and hw_root)")
    profiles.add_argument("--hw-root", help="read the board's facts under this directory")
    profiles.set_defaults(func=cmd_profiles)

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
