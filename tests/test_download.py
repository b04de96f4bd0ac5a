"""agent.update.download against a real HTTP server on 127.0.0.1 with injected faults."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf_sim import Fault, RepoServer

from agent.common.errors import ProtocolError, UpdateError, VerificationError
from agent.update.download import (
    DownloadError,
    DownloadLimits,
    DownloadResult,
    download,
    target_url,
)

DATA = bytes(range(256)) * 1024  # 256 KiB, several chunks
SHA = hashlib.sha256(DATA).hexdigest()
URL_PATH = f"/tuf/targets/models/m/1/{SHA}.int8-cpu.tflite"
FAST = DownloadLimits(retries=3, backoff_base_s=0.001, backoff_max_s=0.01, timeout_s=5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RepoServer]:
    stored = tmp_path / "repo" / "targets" / "models/m/1" / f"{SHA}.int8-cpu.tflite"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(DATA)
    (tmp_path / "repo" / "metadata").mkdir()
    with RepoServer(tmp_path / "repo") as srv:
        yield srv


def _get(
    srv: RepoServer,
    dest: Path,
    limits: DownloadLimits = FAST,
    max_length: int = len(DATA),
    sha: str | None = SHA,
) -> DownloadResult:
    return download(srv.url + URL_PATH, dest, max_length, sha, limits)


def test_target_url_uses_consistent_snapshot_names() -> None:
    url = target_url("http://h:1/", "models/m/1/int8-cpu.tflite", SHA)
    assert url == f"http://h:1/tuf/targets/models/m/1/{SHA}.int8-cpu.tflite"
    assert target_url("http://h", "x.bin", SHA) == f"http://h/tuf/targets/{SHA}.x.bin"
    with pytest.raises(ProtocolError):
        target_url("http://h", "x.bin", "not-a-hash")


def test_plain_download(server: RepoServer, tmp_path: Path) -> None:
    seen: list[int] = []
    dest = tmp_path / "dl" / "model.tflite"
    result = download(
        server.url + URL_PATH, dest, len(DATA), SHA, FAST, progress=lambda n, _: seen.append(n)
    )
    assert result == DownloadResult(len(DATA), False, len(DATA), SHA)
    assert dest.read_bytes() == DATA
    assert not dest.with_name("model.tflite.part").exists()
    assert seen == sorted(seen) and seen[-1] == len(DATA)


def test_dropped_connection_resumes_with_range_inside_one_call(
    server: RepoServer, tmp_path: Path
) -> None:
    server.add_fault(URL_PATH, Fault.drop(100_000))
    dest = tmp_path / "model.tflite"
    result = _get(server, dest)
    assert dest.read_bytes() == DATA and result.resumed
    hits = server.hits_for(URL_PATH)
    assert [(h.range, h.status) for h in hits] == [(None, 200), ("bytes=100000-", 206)]
    assert hits[1].body_bytes == len(DATA) - 100_000
    assert result.bytes_transferred == len(DATA)  # nothing fetched twice


def test_resume_across_calls_fetches_only_the_rest(server: RepoServer, tmp_path: Path) -> None:
    server.add_fault(URL_PATH, Fault.drop(70_000))
    dest = tmp_path / "model.tflite"
    with pytest.raises(DownloadError, match="giving up"):
        _get(server, dest, DownloadLimits(retries=0, timeout_s=5))
    assert dest.with_name("model.tflite.part").stat().st_size == 70_000
    assert not dest.exists()
    result = _get(server, dest)  # e.g. after an agent restart
    assert result.resumed and result.bytes_transferred == len(DATA) - 70_000
    assert result.bytes_transferred < len(DATA)
    assert dest.read_bytes() == DATA


def test_server_ignoring_range_restarts_cleanly(server: RepoServer, tmp_path: Path) -> None:
    server.add_fault(URL_PATH, Fault.drop(50_000), Fault("ignore_range"))
    dest = tmp_path / "model.tflite"
    result = _get(server, dest)
    assert dest.read_bytes() == DATA and not result.resumed
    assert [h.status for h in server.hits_for(URL_PATH)] == [200, 200]


def test_complete_part_left_by_a_crash_needs_no_request(server: RepoServer, tmp_path: Path) -> None:
    dest = tmp_path / "model.tflite"
    dest.with_name("model.tflite.part").write_bytes(DATA)
    result = _get(server, dest)
    assert result.bytes_transferred == 0 and dest.read_bytes() == DATA
    assert server.hits_for(URL_PATH) == []


def test_stale_part_of_another_file_is_discarded(server: RepoServer, tmp_path: Path) -> None:
    dest = tmp_path / "model.tflite"
    dest.with_name("model.tflite.part").write_bytes(b"\xff" * 1000)
    result = _get(server, dest)
    assert dest.read_bytes() == DATA and not result.resumed
    assert [h.range for h in server.hits_for(URL_PATH)] == ["bytes=1000-", None]


def test_part_longer_than_remote_gets_416_and_restarts(server: RepoServer, tmp_path: Path) -> None:
    dest = tmp_path / "model.tflite"
    dest.with_name("model.tflite.part").write_bytes(b"\x00" * len(DATA))
    result = _get(server, dest, max_length=len(DATA) + 10)
    assert dest.read_bytes() == DATA and result.sha256 == SHA
    assert [h.status for h in server.hits_for(URL_PATH)] == [416, 200]


def test_announced_over_length_aborts_before_reading(server: RepoServer, tmp_path: Path) -> None:
    dest = tmp_path / "model.tflite"
    with pytest.raises(DownloadError, match="more than the allowed"):
        _get(server, dest, max_length=len(DATA) - 1)
    assert not dest.exists() and not dest.with_name("model.tflite.part").exists()
    assert len(server.hits_for(URL_PATH)) == 1  # no retry: the server is lying


def test_unannounced_over_length_stream_is_cut(server: RepoServer, tmp_path: Path) -> None:
    server.add_fault(URL_PATH, Fault.oversize(b"x" * 200_000, send_length=False))
    dest = tmp_path / "model.tflite"
    with pytest.raises(DownloadError, match="sent more than the allowed"):
        _get(server, dest)
    assert not dest.exists() and not dest.with_name("model.tflite.part").exists()
    assert len(server.hits_for(URL_PATH)) == 1


def test_404_stops_without_retry(server: RepoServer, tmp_path: Path) -> None:
    dest = tmp_path / "gone.tflite"
    with pytest.raises(DownloadError) as info:
        download(server.url + "/tuf/targets/nope.bin", dest, 10, None, FAST)
    assert info.value.status == 404 and isinstance(info.value, UpdateError)
    assert info.value.step == "download"
    assert len(server.hits_for("/tuf/targets/nope.bin")) == 1


def test_500_once_is_retried(server: RepoServer, tmp_path: Path) -> None:
    server.add_fault(URL_PATH, Fault.error(500))
    dest = tmp_path / "model.tflite"
    assert _get(server, dest).sha256 == SHA
    assert [h.status for h in server.hits_for(URL_PATH)] == [500, 200]


def test_persistent_503_gives_up_after_bounded_retries(server: RepoServer, tmp_path: Path) -> None:
    server.add_fault(URL_PATH, *[Fault.error(503)] * 10)
    with pytest.raises(DownloadError, match="after 4 attempts") as info:
        _get(server, tmp_path / "model.tflite")
    assert info.value.status == 503
    assert len(server.hits_for(URL_PATH)) == FAST.retries + 1


def test_refused_connection_gives_up(tmp_path: Path) -> None:
    with RepoServer(tmp_path) as srv:
        url = srv.url
    with pytest.raises(DownloadError, match="connection failed"):
        download(
            url + URL_PATH, tmp_path / "m", 10, None, DownloadLimits(retries=1, backoff_base_s=0)
        )


def test_wrong_hash_is_verification_error_and_leaves_nothing(
    server: RepoServer, tmp_path: Path
) -> None:
    dest = tmp_path / "model.tflite"
    with pytest.raises(VerificationError, match="does not match expected"):
        _get(server, dest, sha="0" * 64)
    assert not dest.exists() and not dest.with_name("model.tflite.part").exists()
    assert len(server.hits_for(URL_PATH)) == 1


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError):
        download("http://127.0.0.1:9/x", tmp_path / "m", 10, "xyz", FAST)
    with pytest.raises(DownloadError, match="negative"):
        download("http://127.0.0.1:9/x", tmp_path / "m", -1, None, FAST)
    with pytest.raises(DownloadError, match="cannot download"):
        download("not a url", tmp_path / "m", 10, None, FAST)


def test_backoff_is_exponential_and_capped() -> None:
    limits = DownloadLimits(backoff_base_s=0.5, backoff_max_s=30.0)
    assert [limits.backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert limits.backoff(20) == 30.0
