"""The agent process: wires identity, profile, trust, slots, updater, inference and MQTT.

The main thread checks in, runs updates and pings the systemd watchdog; the
inference thread runs the active model; paho's thread and the outbox drain
thread carry messages. Everything stops on SIGTERM within a few seconds.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__, sdnotify
from agent.common.errors import AgentError, ConfigError, SmokeTestError
from agent.config import AgentConfig
from agent.identity import Identity, load_identity, pinned_root
from agent.profiles.choice import resolve_profile, runtime_choice
from agent.protocol.api import CheckinResponse, ShadowTarget
from agent.protocol.manifest import ModelManifest
from agent.telemetry.sensors import idle_mw, make_sampler
from agent.transport.device_api import DeviceClient
from agent.transport.event_queue import EventQueue, flush
from agent.transport.mqtt import MqttSettings, Publisher
from agent.transport.outbox import Outbox, OutboxConfig
from agent.update.download import DownloadError, DownloadLimits
from agent.update.fetch import FetchLimits, TufFetcher
from agent.update.golden_cache import GoldenCache
from agent.update.shadow_fetch import ShadowFetcher
from agent.update.slots import SlotStore
from agent.update.smoke import golden_set_problem, score_golden_set, smoke_test
from agent.update.trust import TrustClient, TrustUnavailableError
from agent.update.updater import Updater
from agent.worker import InferenceWorker

if TYPE_CHECKING:
    from agent.inference.capture import CaptureOptions

log = logging.getLogger(__name__)

# The last flush on the way out must not hold up a SIGTERM stop for the full request timeout.
STOP_FLUSH_TIMEOUT_S = 3.0
# Each wait between polls is the interval times a draw from this range, so a fleet that
# started together (a power cut, a site restart) does not keep polling in step.
POLL_JITTER = (0.9, 1.1)


def capture_options(cfg: AgentConfig) -> CaptureOptions:
    """Live-source timings from the ``[camera]`` table."""
    from agent.inference.capture import CaptureOptions  # noqa: PLC0415 - numpy with the model

    cam = cfg.camera
    return CaptureOptions(
        stall_after_s=cam.stall_after_s,
        read_timeout_s=cam.read_timeout_s,
        open_timeout_s=cam.open_timeout_s,
        backoff_max_s=max(cam.backoff_max_s, 0.5),
        rtsp_transport=cam.rtsp_transport,
    )


@dataclass
class Status:
    """What the agent last did, for logs, sd_notify STATUS and the demo."""

    checkins: int = 0
    last_error: str | None = None
    updates_committed: int = 0


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.identity: Identity = load_identity(cfg.state_dir)
        self.profile = resolve_profile(cfg)
        self.choice = runtime_choice(cfg, self.profile)
        server = cfg.server or self.identity.server
        self.client = DeviceClient(server, self.identity.device_id, self.identity.device_token)
        self.events = EventQueue()  # HTTP copies of update events, sent in batches
        self.slots = SlotStore(cfg.state_dir / "slots")
        self.outbox = Outbox(
            cfg.state_dir / "outbox.sqlite", OutboxConfig(max_bytes=cfg.telemetry.outbox_max_bytes)
        )
        mq = self.identity.mqtt
        self.publisher = Publisher(
            self.identity.device_id,
            MqttSettings(
                mq.host,
                mq.port,
                mq.username,
                mq.password,
                mq.tls,
                ca_file=cfg.mqtt_ca_file or None,
            ),
            self.outbox,
        )
        self.sampler = make_sampler(self.profile, cfg.hw_root, window_s=cfg.telemetry.window_s)
        self.worker = InferenceWorker(
            self.choice,
            cfg.inference.frames,
            self.publisher.publish,
            window_s=cfg.telemetry.window_s,
            top_k=cfg.inference.top_k,
            max_fps=cfg.inference.max_fps,
            warmup=cfg.telemetry.warmup_inferences,
            extra_telemetry=self._static_telemetry,
            power=self.sampler,
            idle_mw=idle_mw(self.profile),
            capture=lambda: capture_options(cfg),  # built with the first model: PyAV is lazy
            on_camera=self._camera_changed,
        )
        tuf_base = self.identity.tuf_url or server  # a CDN or bucket the server named
        trust = TrustClient(cfg.state_dir / "tuf", tuf_base, pinned_root(cfg.state_dir))
        up = cfg.update
        limits = FetchLimits(
            max_model_bytes=up.max_model_bytes,
            download=DownloadLimits(
                retries=up.download_retries,
                backoff_base_s=up.download_backoff_s,
                timeout_s=up.download_timeout_s,
            ),
        )
        fetcher = TufFetcher(trust, tuf_base, limits, current=self._current_model)
        self.shadow_fetcher = ShadowFetcher(fetcher, cfg.state_dir / "shadow")
        self.trust = trust
        self.golden = GoldenCache(fetcher, cfg.state_dir / "golden")
        self._metadata_mark = 0  # trust.bytes_fetched already reported
        # The candidate last tried and the serving model's generation then: tried once
        # per pair, so a failed candidate is not fetched again at every check-in.
        self._shadow_key: tuple[ShadowTarget, int] | None = None
        self.updater = Updater(
            cfg.state_dir,
            self.slots,
            fetcher,
            smoke_test=self._smoke_test,
            activate=self.worker.swap,
            health_check=lambda: self.worker.wait_healthy(up.health_inferences, timeout_s=60.0),
            report=self._report,
        )
        self.status = Status()
        self.poll_interval_s = up.poll_interval_s
        # The last answer: its ETag makes the next check-in conditional, and a 304 means
        # this answer still holds.
        self.last_reply: CheckinResponse | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.publisher.on_command = self._wake.set  # a pushed check-in is served at once
        # Camera transitions come from the inference thread; the main loop reports them.
        self._camera_events: queue.SimpleQueue[tuple[str, str | None]] = queue.SimpleQueue()
        self.camera_error: str | None = None

    def _smoke_test(self, path: Path, manifest: ModelManifest) -> None:
        """Golden output first, then the release's golden set when it ships one."""
        smoke_test(path, manifest, self.choice)
        golden_before = self.golden.downloaded
        try:
            scored = score_golden_set(
                path, manifest, self.choice, self.golden.fetch, self.updater.staging
            )
        finally:
            self._report_aux(manifest, self.golden.downloaded - golden_before)
        if scored is None:
            return
        spec, result = scored
        detail = {
            **result.to_json(),
            "release": manifest.release,
            "min_accuracy": spec.min_accuracy,
        }
        self._report("golden_set", "scored", detail)
        problem = golden_set_problem(spec, result)
        if problem:
            raise SmokeTestError(problem)

    def _report_aux(self, manifest: ModelManifest, golden_bytes: int) -> None:
        """What the update cost besides the model: its golden set (0 when already held)
        and the TUF metadata fetched since the last report; counted by the server."""
        metadata = self.trust.bytes_fetched - self._metadata_mark
        self._metadata_mark = self.trust.bytes_fetched
        self._report("download", "aux", {
            "update_id": f"{self.updater.record.update_id}:aux"[:64], "via": "aux",
            "name": manifest.name, "release": manifest.release, "variant": manifest.variant,
            "bytes_downloaded": golden_bytes + metadata, "target_bytes": 0,
            "golden_set_bytes": golden_bytes, "metadata_bytes": metadata,
        })  # fmt: skip

    def _current_model(self) -> tuple[str, Path] | None:
        """The running model's sha256 and file: the base a delta is made against."""
        slot = self.slots.active()
        manifest = self.slots.manifest(slot) if slot else None
        if slot is None or manifest is None:
            return None
        return str(manifest["sha256"]), self.slots.model_path(slot)

    def _static_telemetry(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name,
            "runtime": self.choice.runtime,
            "threads": self.choice.num_threads,
            "agent_version": __version__,
        }

    def _report(self, kind: str, state: str, detail: dict[str, Any]) -> None:
        """Every event on MQTT now; its HTTP copy in the next batch (``transport.event_queue``)."""
        self.publisher.publish("events", {"type": kind, "state": state, "detail": detail})
        if self.events.add(kind, state, detail):
            self.flush_events()

    def flush_events(self, timeout_s: float | None = None) -> None:
        """POST every queued event; a failed batch stays queued for the next flush."""
        try:
            flush(self.events, lambda batch: self.client.events(batch, timeout_s))
        except AgentError as err:
            log.debug("%d events wait for HTTP (MQTT has them): %s", len(self.events), err)

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self.sampler.start()
        self.publisher.start()
        self.updater.resume(forward=False)  # undo a switched-in candidate before loading it
        active = self.slots.active()
        if active is not None:
            try:
                self.worker.swap(self.slots.model_path(active), self.slots.manifest(active))
            except AgentError as err:
                log.error("active model in slot %s does not load: %s", active, err)
                self.status.last_error = str(err)
        self.worker.start()
        self.updater.resume()  # a cut download/verify/install: its health check needs the worker
        log.info(
            "agent %s started: device %s, profile %s, runtime %s x%d",
            __version__,
            self.identity.device_id,
            self.profile.name,
            self.choice.runtime,
            self.choice.num_threads,
        )

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        sdnotify.stopping()
        self.flush_events(STOP_FLUSH_TIMEOUT_S)
        self.worker.stop()
        self.sampler.stop()
        self.publisher.stop()
        self.outbox.close()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def checkin_once(self) -> bool:
        """One check-in, and the update it asks for. True when a model was committed."""
        self.flush_events()  # whatever an earlier flush could not deliver
        try:
            reply = self.client.checkin(
                self.updater.record.state.value, self.updater.installed(), self.last_reply
            )
        except AgentError as err:
            self.status.last_error = str(err)
            log.warning("check-in failed: %s", err)
            return False
        self.last_reply = reply
        self.status.checkins += 1
        self.poll_interval_s = max(1.0, reply.poll_interval_s)
        committed = False
        if self.updater.wants(reply.desired):
            assert reply.desired is not None
            committed = self.updater.update(reply.desired)
            if committed:
                self.status.updates_committed += 1
            else:
                self.status.last_error = self.updater.record.reason
        self._reconcile_shadow(reply.shadow)
        return committed

    def _reconcile_shadow(self, target: ShadowTarget | None) -> None:
        """Start, replace or stop the rollout's shadow candidate; never fatal.

        A serving model swap drops the candidate in the worker, and starts a new
        generation, so the same target is tried again against the new model.
        """
        key = None if target is None else (target, self.worker.generation)
        if key == self._shadow_key:
            return
        self._shadow_key = key
        if target is None:
            log.info("shadow evaluation ended")
            self.worker.clear_shadow()
            self.shadow_fetcher.clear()
            return
        detail: dict[str, Any] = target.to_json()
        installed = self.updater.installed()
        try:
            model = self.shadow_fetcher.fetch(target, installed.sha256 if installed else None)
            if model is None:
                log.info("shadow candidate %s@%s is the installed model; not shadowed",
                         target.name, target.release)  # fmt: skip
                self.worker.clear_shadow()
                return
            self.worker.set_shadow(model.path, model.manifest, target)
        except AgentError as err:
            if isinstance(err, DownloadError | TrustUnavailableError):
                self._shadow_key = None  # the network's fault, not the candidate's: retry
            log.warning("shadow candidate %s@%s not run: %s", target.name, target.release, err)
            self._report("shadow", "error", {**detail, "error": str(err)})
            return
        log.info("shadowing %s@%s on 1 frame in %d", target.name, target.release, target.every_n)
        self._report("shadow", "started", {**detail, "downloaded": model.downloaded})

    def run_forever(self) -> None:
        self.start()
        sdnotify.ready()
        watchdog = sdnotify.watchdog_interval()
        ping_every = watchdog / 2 if watchdog else 5.0
        next_checkin = 0.0
        try:
            while not self._stop.is_set():
                # Commands first: a pushed check-in and a due poll make one check-in, not two.
                if self._handle_commands():
                    next_checkin = 0.0
                if time.monotonic() >= next_checkin:
                    self.checkin_once()
                    next_checkin = time.monotonic() + self.poll_delay_s()
                self._report_camera()
                if self.worker.alive:
                    sdnotify.watchdog()
                sdnotify.status(self._status_line())
                self._wake.wait(timeout=min(ping_every, max(0.1, next_checkin - time.monotonic())))
                if self._wake.is_set() and not self._stop.is_set():
                    next_checkin = 0.0
                self._wake.clear()
        finally:
            self.stop()

    def _camera_changed(self, state: str, error: str | None) -> None:
        self._camera_events.put((state, error))
        self._wake.set()

    def _report_camera(self) -> None:
        """A dead camera is an error state the server hears of; the watchdog is still fed."""
        while not self._camera_events.empty():
            state, error = self._camera_events.get_nowait()
            self.camera_error = error
            self._report("camera", state, {"source": self.cfg.inference.frames, "error": error})

    def poll_delay_s(self) -> float:
        """Until the next poll: the server's fallback interval with jitter. A server that
        pushes asks for a long interval, and a push brings the check-in forward."""
        return self.poll_interval_s * random.uniform(*POLL_JITTER)  # noqa: S311 - not a secret

    def _handle_commands(self) -> bool:
        """Act on queued ``cmd`` messages; True when one asks for a check-in now."""
        checkin = False
        while not self.publisher.commands.empty():
            command = self.publisher.commands.get_nowait()
            action = command.get("action")
            if action == "checkin":
                log.info("check-in pushed by the server (%s)", command.get("reason", "no reason"))
                checkin = True
            elif action is None:
                # Not a command (an older broker replayed a device's own retained state
                # message to its cmd subscription); nothing to do.
                log.debug("ignored a message without an action on the cmd topic: %r", command)
            else:
                log.warning("unknown command %r", action)
        return checkin

    def _status_line(self) -> str:
        installed = self.updater.installed()
        model = f"{installed.name}@{installed.release}" if installed else "no model"
        camera = f"; camera error: {self.camera_error}" if self.camera_error else ""
        return (
            f"{model}; {self.worker.total_inferences} inferences; "
            f"{self.status.checkins} check-ins{camera}"
        )


def ensure_state_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise ConfigError(f"cannot create state directory {path}: {err}") from err
