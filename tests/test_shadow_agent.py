"""Shadow evaluation on the device: a rollout's candidate beside the serving model.

Real parts only: LiteRT on the committed digits models (and one with a class
collapsed by ``damage_class``), a real InferenceWorker on a ``dir:`` source of
camera-space digits, a real power sampler on the Jetson board tree, the TUF
client against a python-tuf repository served over loopback, and, for the
daemon, a real fleet server. Waits have generous timeouts; nothing asserts a
duration.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_helpers import Operator, enroll_agent
from quantize_helpers import damage_class, digits_pixels
from tuf_sim import RepoServer
from waiting import wait_for

from agent.common.errors import ModelError, ProtocolError, VerificationError
from agent.profiles.schema import load_profiles
from agent.protocol.api import CheckinResponse, DesiredTarget, ShadowTarget
from agent.protocol.input_contract import InputContract
from agent.protocol.input_options import ContractOptions
from agent.protocol.manifest import model_target_path
from agent.telemetry.sampler import PowerSampler
from agent.telemetry.sensors import idle_mw, make_sampler
from agent.update.fetch import FetchLimits, TufFetcher
from agent.update.shadow_fetch import ShadowFetcher
from agent.update.smoke import RuntimeChoice
from agent.update.trust import TrustClient
from agent.worker import InferenceWorker, WorkerLimits
from server.publish.keys import init_keys
from server.publish.registry import publish_model
from server.publish.tuf_repo import TufRepository

FIXTURES = Path(__file__).parent / "fixtures"
BOARD = Path(__file__).parent / "boards" / "jetson-orin-nano"
PROFILE = load_profiles()["jetson-orin-nano"]
LABELS = (FIXTURES / "digits_labels.txt").read_text().split()
CHOICE = RuntimeChoice("litert", 1)
TIMEOUT_S = 60.0
CONTRACT = InputContract(32, 32, 3, value_range=(0.0, 1.0)).to_dict()
UNIT = ContractOptions(value_range=(0.0, 1.0))


class Sink:
    """The worker's publish callable: keeps every message, wakes waiters."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()

    def __call__(self, channel: str, payload: dict[str, Any]) -> None:
        with self._cond:
            self.messages.append((channel, payload))
            self._cond.notify_all()

    def results(self) -> list[dict[str, Any]]:
        with self._cond:
            return [p for c, p in self.messages if c == "results"]

    def no_shadow_from_now(self) -> None:
        """Two results windows go by, and (past the one under way) none has a shadow block."""
        seen = len(self.results())
        wait_for("two results windows", lambda: len(self.results()) >= seen + 2)
        assert all("shadow" not in r for r in self.results()[seen + 1 :])

    def shadow_blocks(
        self, count: int, match: Callable[[dict[str, Any]], bool] = lambda _b: True
    ) -> list[dict[str, Any]]:
        """Wait for ``count`` results messages whose shadow block matches; all such blocks."""

        def found() -> list[dict[str, Any]]:
            return [
                p["shadow"] for c, p in self.messages
                if c == "results" and "shadow" in p and match(p["shadow"])
            ]  # fmt: skip

        with self._cond:
            if not self._cond.wait_for(lambda: len(found()) >= count, timeout=TIMEOUT_S):
                raise AssertionError(f"fewer than {count} matching shadow blocks")
            return found()


def manifest(release: int) -> dict[str, Any]:
    """A slot manifest as the worker takes it: the signed custom field's useful part."""
    return {"name": "digits", "release": release, "variant": "int8-cpu", "labels": LABELS,
            "input": CONTRACT}  # fmt: skip


def target(release: int, every_n: int = 1, cpu_budget: float = 1.0) -> ShadowTarget:
    path = model_target_path("digits", release, "int8-cpu")
    return ShadowTarget("r-1", path, "digits", release, "int8-cpu", every_n, cpu_budget)


def frames_dir(path: Path, only_class: int | None = None) -> str:
    """A ``dir:`` source of camera-space digits (64x64 RGB uint8), optionally of one class."""
    x, y = digits_pixels()
    if only_class is not None:
        x = x[y == only_class]
    path.mkdir()
    np.save(path / "digits.npy", x)
    return f"dir:{path}"


@pytest.fixture
def sampler() -> Iterator[PowerSampler]:
    with make_sampler(PROFILE, BOARD, window_s=0.3) as running:
        yield running


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def make_worker(
    tmp_path: Path, sink: Sink, sampler: PowerSampler
) -> Iterator[Callable[..., InferenceWorker]]:
    """A started worker serving release 1 on digits frames; stopped at teardown."""
    workers: list[InferenceWorker] = []

    def make(only_class: int | None = None) -> InferenceWorker:
        worker = InferenceWorker(
            CHOICE, frames_dir(tmp_path / f"frames{len(workers)}", only_class), sink,
            window_s=0.3, max_fps=300, warmup=2, power=sampler, idle_mw=idle_mw(PROFILE),
            limits=WorkerLimits(error_backoff_s=0.01),
        )  # fmt: skip
        workers.append(worker)
        worker.start()
        worker.swap(FIXTURES / "digits_int8_r1.tflite", manifest(1))
        assert worker.wait_healthy(5, TIMEOUT_S) is None
        return worker

    yield make
    for worker in workers:
        worker.stop()


def check_block(block: dict[str, Any], release: int) -> None:
    """What every block must satisfy, whatever the candidate."""
    assert (block["rollout_id"], block["name"], block["release"]) == ("r-1", "digits", release)
    assert block["labels"] == LABELS
    assert sum(n for _, _, n in block["pairs"]) == block["shadowed"]
    assert sum(n for s, c, n in block["pairs"] if s == c) == block["agreed"]
    assert all(n > 0 for _, _, n in block["pairs"])
    assert block["shadowed"] + block["skipped"] <= block["frames"]
    if block["shadowed"]:
        cand, serv = block["candidate_latency_ms"], block["serving_latency_ms"]
        assert 0 < cand["p50"] <= cand["p95"] <= cand["max"] and 0 < serv["p50"] <= serv["p95"]


# -- the wire: check-in replies ---------------------------------------------------------
SHADOW_JSON = {"rollout_id": "r-7", "target_path": "models/digits/2/int8-cpu.tflite",
               "name": "digits", "release": 2, "variant": "int8-cpu", "every_n": 10,
               "cpu_budget": 0.25}  # fmt: skip


def test_checkin_reply_with_and_without_shadow() -> None:
    old = CheckinResponse.from_json({"desired": None, "poll_interval_s": 30})
    assert old.shadow is None and old.poll_interval_s == 30.0
    assert CheckinResponse.from_json({"poll_interval_s": 5, "shadow": None}).shadow is None
    reply = CheckinResponse.from_json({"poll_interval_s": 5, "shadow": SHADOW_JSON})
    path = "models/digits/2/int8-cpu.tflite"
    assert reply.shadow == ShadowTarget("r-7", path, "digits", 2, "int8-cpu", 10, 0.25)
    assert reply.shadow.to_json() == SHADOW_JSON
    assert reply.shadow.desired == DesiredTarget(path, "digits", 2, "int8-cpu")
    whole = CheckinResponse.from_json({"poll_interval_s": 5, "shadow": {**SHADOW_JSON,
                                       "cpu_budget": 1}})  # fmt: skip
    assert whole.shadow is not None and whole.shadow.cpu_budget == 1.0


@pytest.mark.parametrize(
    "shadow",
    [
        "digits@2", [], 7, True, {},
        {k: v for k, v in SHADOW_JSON.items() if k != "rollout_id"},
        {k: v for k, v in SHADOW_JSON.items() if k != "every_n"},
        {**SHADOW_JSON, "every_n": 0}, {**SHADOW_JSON, "every_n": 10_001},
        {**SHADOW_JSON, "every_n": 2.0}, {**SHADOW_JSON, "every_n": True},
        {**SHADOW_JSON, "cpu_budget": 0}, {**SHADOW_JSON, "cpu_budget": 1.01},
        {**SHADOW_JSON, "cpu_budget": -0.5}, {**SHADOW_JSON, "cpu_budget": float("nan")},
        {**SHADOW_JSON, "cpu_budget": "25%"}, {**SHADOW_JSON, "cpu_budget": True},
        {**SHADOW_JSON, "release": "2"}, {**SHADOW_JSON, "release": False},
        {**SHADOW_JSON, "name": None}, {**SHADOW_JSON, "variant": 1},
    ],
)  # fmt: skip
def test_garbage_shadow_is_a_protocol_error(shadow: Any) -> None:
    with pytest.raises(ProtocolError):
        CheckinResponse.from_json({"poll_interval_s": 5, "shadow": shadow})


# -- the worker and the runner on real models ------------------------------------------
def test_identical_candidate_agrees_on_every_frame(
    tmp_path: Path, make_worker: Callable[..., InferenceWorker], sink: Sink
) -> None:
    worker = make_worker()
    twin = tmp_path / "candidate.tflite"
    shutil.copy(FIXTURES / "digits_int8_r1.tflite", twin)
    worker.set_shadow(twin, manifest(1), target(1))
    blocks = sink.shadow_blocks(3, lambda b: b["shadowed"] > 0)
    for block in blocks:
        check_block(block, 1)
        assert block["error"] is None and block["skipped"] == 0
        assert block["shadowed"] == block["frames"]  # every_n 1, the whole budget
        assert block["agreed"] == block["shadowed"]
        assert all(s == c for s, c, _ in block["pairs"])
        assert block["candidate_mj"] is not None and block["candidate_mj"] >= 0
    # Several digits were seen: the matrix is not one cell.
    assert len({s for b in blocks for s, _, _ in b["pairs"]}) > 3
    # A serving model swap ends shadowing: no block after it.
    worker.swap(FIXTURES / "digits_int8_r2.tflite", manifest(2))
    sink.no_shadow_from_now()


def test_a_collapsed_class_shows_as_its_row_of_disagreement(
    tmp_path: Path, make_worker: Callable[..., InferenceWorker], sink: Sink
) -> None:
    worker = make_worker(only_class=3)
    damaged = damage_class(tmp_path / "no_three.tflite", 3)
    worker.set_shadow(damaged, manifest(5), target(5))
    blocks = sink.shadow_blocks(2, lambda b: b["shadowed"] > 0)
    pairs: dict[tuple[int, int], int] = {}
    for block in blocks:
        check_block(block, 5)
        for s, c, n in block["pairs"]:
            pairs[s, c] = pairs.get((s, c), 0) + n
    assert all(c != 3 for (_, c) in pairs)  # the candidate never says 3
    row = {c: n for (s, c), n in pairs.items() if s == 3}
    shadowed = sum(b["shadowed"] for b in blocks)
    assert sum(row.values()) > shadowed // 2  # the serving model mostly says 3 on threes
    assert sum(b["agreed"] for b in blocks) < shadowed // 2


def test_one_frame_in_n_and_the_cpu_budget(
    tmp_path: Path, make_worker: Callable[..., InferenceWorker], sink: Sink
) -> None:
    worker = make_worker()
    twin = tmp_path / "candidate.tflite"
    shutil.copy(FIXTURES / "digits_int8_r2.tflite", twin)
    worker.set_shadow(twin, manifest(2), target(2, every_n=7))
    blocks = sink.shadow_blocks(4, lambda b: b["release"] == 2)
    frames = sum(b["frames"] for b in blocks)
    # The schedule runs across windows: exactly every 7th frame since shadowing began.
    assert sum(b["shadowed"] for b in blocks) == frames // 7
    assert all(b["skipped"] == 0 for b in blocks) and frames >= 7
    for block in blocks:
        check_block(block, 2)
        assert abs(block["shadowed"] - block["frames"] / 7) <= 1

    # A new target replaces the old one: a budget of 0.01% of a core starves nearly all
    # due frames; the bucket's first second of budget lets the first one run.
    worker.set_shadow(twin, manifest(3), target(3, every_n=1, cpu_budget=0.0001))
    blocks = sink.shadow_blocks(4, lambda b: b["release"] == 3)
    shadowed = sum(b["shadowed"] for b in blocks)
    skipped = sum(b["skipped"] for b in blocks)
    for block in blocks:
        check_block(block, 3)
        assert block["shadowed"] + block["skipped"] == block["frames"]  # every frame is due
    assert shadowed >= 1 and skipped > 20 * shadowed
    worker.clear_shadow()
    sink.no_shadow_from_now()


@pytest.mark.parametrize(
    ("candidate", "words"),
    [
        ("mobilenet", "candidate has 100 output classes, the serving model 10"),
        ("garbage", "candidate does not load"),
    ],
)
def test_a_candidate_that_cannot_run_is_reported_once_and_serving_goes_on(
    tmp_path: Path,
    make_worker: Callable[..., InferenceWorker],
    sink: Sink,
    candidate: str,
    words: str,
) -> None:
    worker = make_worker()
    if candidate == "mobilenet":
        path = FIXTURES / "mobilenetv2_int8.tflite"
        meta = {"name": "mobilenet", "release": 9, "variant": "int8-cpu", "labels": []}
    else:
        path = tmp_path / "garbage.tflite"
        path.write_bytes(b"TFL3 is not enough to be a model")
        meta = manifest(9)
    with pytest.raises(ModelError, match=words):
        worker.set_shadow(path, meta, target(9))
    block = sink.shadow_blocks(1, lambda b: b["error"] is not None)[0]
    assert words in block["error"]
    assert block["shadowed"] == 0 and block["pairs"] == [] and block["candidate_mj"] is None
    assert block["labels"] == LABELS
    # Reported once; then no shadow block, and the serving model keeps running.
    before = worker.total_inferences
    sink.no_shadow_from_now()
    assert worker.total_inferences > before
    assert worker.wait_healthy(5, TIMEOUT_S) is None


# -- fetching the candidate through TUF --------------------------------------------------
@pytest.fixture
def repo(tmp_path: Path) -> TufRepository:
    init_keys(tmp_path / "keys")
    repo = TufRepository.create(tmp_path / "repo", tmp_path / "keys")
    for release in (1, 2):
        publish_model(repo, FIXTURES / f"digits_int8_r{release}.tflite", "digits", release,
                      "int8-cpu", LABELS, input_options=UNIT)  # fmt: skip
    return repo


def shadow_fetcher(state: Path, server: RepoServer) -> ShadowFetcher:
    root = (server.repo_dir / "metadata" / "1.root.json").read_bytes()
    trust = TrustClient(state / "tuf", server.url, root)
    return ShadowFetcher(TufFetcher(trust, server.url, FetchLimits()), state / "shadow")


def test_the_candidate_is_downloaded_verified_and_reused(
    tmp_path: Path, repo: TufRepository
) -> None:
    r1_sha = repo.targets()[model_target_path("digits", 1, "int8-cpu")].sha256
    with RepoServer(repo.repo_dir) as server:
        fetcher = shadow_fetcher(tmp_path / "device", server)
        model = fetcher.fetch(target(2), skip_sha256=r1_sha)
        assert model is not None and model.downloaded
        assert model.path.read_bytes() == (FIXTURES / "digits_int8_r2.tflite").read_bytes()
        assert model.path.parent == tmp_path / "device" / "shadow"
        assert model.manifest["release"] == 2 and model.manifest["labels"] == LABELS
        assert model.manifest["input"]["range"] == [0.0, 1.0]
        # Again: the file on disk matches the signed sha256 and is reused.
        hits = len(server.hits)
        again = fetcher.fetch(target(2))
        assert again is not None and not again.downloaded and again.path == model.path
        assert not any(h.path.startswith("/tuf/targets/") for h in server.hits[hits:])
        # A candidate equal to the installed model is not fetched at all.
        assert fetcher.fetch(target(1), skip_sha256=r1_sha) is None
        # Another candidate replaces the older one: one model in the directory.
        other = fetcher.fetch(target(1))
        assert other is not None and other.downloaded
        assert sorted(p.name for p in model.path.parent.iterdir()) == [other.path.name]
        # A corrupted local copy is not trusted: downloaded afresh.
        other.path.write_bytes(b"\0" * other.path.stat().st_size)
        fixed = fetcher.fetch(target(1))
        assert fixed is not None and fixed.downloaded
        assert fixed.path.read_bytes() == (FIXTURES / "digits_int8_r1.tflite").read_bytes()
        fetcher.clear()
        assert list(model.path.parent.iterdir()) == []


def test_a_tampered_or_unsigned_candidate_is_refused(tmp_path: Path, repo: TufRepository) -> None:
    stored = repo.target_file(model_target_path("digits", 2, "int8-cpu"))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    with RepoServer(repo.repo_dir) as server:
        fetcher = shadow_fetcher(tmp_path / "device", server)
        with pytest.raises(VerificationError, match="sha256"):
            fetcher.fetch(target(2))
        assert list((tmp_path / "device" / "shadow").iterdir()) == []
        with pytest.raises(VerificationError, match="not a signed target"):
            fetcher.fetch(target(4))
        # The director names release 1's file but claims it is release 2: TUF says otherwise.
        lying = ShadowTarget("r-1", model_target_path("digits", 1, "int8-cpu"), "digits", 2,
                             "int8-cpu", 1, 1.0)  # fmt: skip
        with pytest.raises(VerificationError, match="signed as digits@1"):
            fetcher.fetch(lying)


# -- the daemon, against a real fleet server -------------------------------------------
def test_the_daemon_fetches_runs_and_ends_a_shadow_candidate(
    server_factory: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = server_factory(tmp_path / "server")
    op = Operator(fleet.url, fleet.operator_token)
    op.publish(1)
    op.publish(2)
    agent = enroll_agent(fleet.url, fleet.config.enrollment_tokens[0],
                         root_json=fleet.repo.metadata_dir / "1.root.json",
                         work=tmp_path / "cam", board="jetson-orin-nano")  # fmt: skip
    device_id = agent.identity.device_id
    agent.start()
    try:
        op.assign(1, tag="fleet=test")
        assert agent.checkin_once() is True

        def events() -> list[tuple[str, str]]:
            return [(e["type"], e["state"]) for e in op.device(device_id)["events"]]

        # The candidate is the installed model: nothing to compare, nothing fetched.
        shadow_dir = tmp_path / "cam" / "state" / "shadow"
        agent._reconcile_shadow(target(1))
        assert list(shadow_dir.iterdir()) == []
        agent._reconcile_shadow(target(2, every_n=2))
        wait_for("the shadow started event", lambda: ("shadow", "started") in events())
        shadow = wait_for(
            "a results window with a shadow block",
            lambda: (op.latest(device_id, "results").get("shadow") or {}).get("shadowed"),
        )
        assert shadow > 0
        # The same target at the next check-in changes nothing.
        started = events().count(("shadow", "started"))
        agent._reconcile_shadow(target(2, every_n=2))
        assert events().count(("shadow", "started")) == started
        # The rollout ends: shadowing stops and the candidate leaves the disk.
        agent._reconcile_shadow(None)
        assert list(shadow_dir.iterdir()) == []
        # A message without an action on the cmd topic (the broker's replay of a retained
        # message) is not a command and is not warned about.
        agent.publisher.commands.put({"status": "online", "device_id": device_id})
        with caplog.at_level(logging.DEBUG, logger="agent.daemon"):
            agent._handle_commands()
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("without an action" in r.getMessage() for r in caplog.records)
    finally:
        agent.stop()
