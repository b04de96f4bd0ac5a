"""Delta updates end to end: precomputed on publish, applied on the device, accounted for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleet_helpers import FIXTURES, Operator, enroll_agent

from agent.protocol.manifest import delta_target_path
from server.cli import main as cli_main


def test_second_release_goes_out_as_a_delta_and_is_accounted(
    server_factory: Callable[..., Any], tmp_path: Path, capsys: Any
) -> None:
    srv = server_factory(tmp_path / "server")
    op = Operator(srv.url, srv.operator_token)
    r1 = op.publish(1)
    assert r1["deltas"] == []
    agent = enroll_agent(
        srv.url,
        srv.config.enrollment_tokens[0],
        root_json=srv.repo.metadata_dir / "1.root.json",
        work=tmp_path / "cam",
    )
    agent.start()
    try:
        op.assign(1, tag="fleet=test")
        assert agent.checkin_once() is True

        r2 = op.publish(2)
        assert [d["base_release"] for d in r2["deltas"]] == [1]
        delta = r2["deltas"][0]
        assert delta["length"] < r2["length"] // 2
        op.assign(2, tag="fleet=test")
        assert agent.checkin_once() is True
        assert agent.updater.installed().release == 2  # type: ignore[union-attr]

        report = op.call("GET", "/api/v1/bandwidth")
        fleet = report["fleet"]
        assert (fleet["updates"], fleet["deltas"], fleet["fallbacks"]) == (2, 1, 0)
        # Sent: the models, plus the TUF metadata each update fetched (its aux row).
        assert fleet["aux_bytes"] > 0
        assert fleet["bytes_sent"] == r1["length"] + delta["length"] + fleet["aux_bytes"]
        assert fleet["full_int8_bytes"] == r1["length"] + r2["length"]
        rel2 = next(r for r in report["releases"] if r["release"] == 2)
        assert rel2["bytes_sent"] == delta["length"] + rel2["aux_bytes"]
        assert rel2["saving_vs_int8"] > 0.5

        # A damaged delta is refused by its signed hash; the device falls back to the full file.
        r3 = op.publish_file(FIXTURES / "digits_int8_r1.tflite", release=3)
        # The delta the agent takes: the ANS-coded one where it is signed (as on x86_64).
        [path] = [d["target_path"] for d in r3["deltas"] if d["base_sha256"] == r2["sha256"]]
        assert path.startswith(delta_target_path("digits", 3, "int8-cpu", r2["sha256"])[:-4])
        stored = srv.repo.target_file(path)
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0xFF
        stored.write_bytes(bytes(data))
        op.assign(3, tag="fleet=test")
        assert agent.checkin_once() is True
        assert agent.updater.installed().sha256 == r3["sha256"]  # type: ignore[union-attr]
        fleet = op.call("GET", "/api/v1/bandwidth")["fleet"]
        assert (fleet["updates"], fleet["deltas"], fleet["fallbacks"]) == (3, 1, 1)
    finally:
        agent.stop()

    code = cli_main(
        ["--server", srv.url, "--token", srv.operator_token, "bandwidth", "--price-per-gb", "0.5"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "digits@2 int8-cpu" in out and "fleet" in out and "$0.5/GB" in out
