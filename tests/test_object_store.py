"""TUF metadata and targets in an S3-compatible bucket (moto's S3 server on loopback).

The server publishes into the bucket; a device told ``--targets-url`` (the
bucket's public URL) verifies and installs the model straight from it. A second
server instance on the same PostgreSQL database and bucket serves the same
repository from its own cache, and publishes into it without losing the first's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped,unused-ignore]
import pytest
import requests
from fleet_helpers import FIXTURES, Operator, enroll_agent
from moto.server import ThreadedMotoServer  # type: ignore[import-untyped,unused-ignore]

from agent.protocol.manifest import model_target_path
from agent.update.download import target_url
from agent.update.trust import TrustClient
from server.errors import ConfigError, NotFoundError
from server.main import build_parser, config_from_args
from server.publish.artifact_store import ArtifactStoreError, S3Store, open_store
from server.publish.tuf_rules import stored_name, target_key

BUCKET = "edgefleet-artifacts"
R1 = model_target_path("digits", 1, "int8-cpu")


@dataclass(frozen=True)
class S3:
    endpoint: str
    client: Any

    def keys(self, prefix: str) -> set[str]:
        reply = self.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return {obj["Key"] for obj in reply.get("Contents", [])}


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets per Python process, not per server: start from nothing.
    requests.post(f"{endpoint}/moto-api/reset", timeout=10).raise_for_status()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    # Devices read anonymously, as from a CDN or a public bucket; only the server writes.
    public = {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
              "Resource": f"arn:aws:s3:::{BUCKET}/*"}  # fmt: skip
    policy = {"Version": "2012-10-17", "Statement": [public]}
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(policy))
    yield S3(endpoint, client)
    requests.post(f"{endpoint}/moto-api/reset", timeout=10)
    server.stop()


def test_s3_store_reads_writes_and_reports_what_is_missing(s3: S3, tmp_path: Path) -> None:
    store = open_store(f"s3://{BUCKET}/fleet", tmp_path, s3.endpoint)
    assert isinstance(store, S3Store) and store.local_root is None
    store.write("metadata/timestamp.json", b"{}")
    assert store.read("metadata/timestamp.json") == b"{}"
    assert s3.keys("fleet/") == {"fleet/tuf/metadata/timestamp.json"}
    head = s3.client.head_object(Bucket=BUCKET, Key="fleet/tuf/metadata/timestamp.json")
    assert head["CacheControl"] == "no-store"  # changes in place: a CDN must not keep it
    source = tmp_path / "model.bin"
    source.write_bytes(b"x" * 100_000)
    store.upload("targets/m/abc.model.bin", source)
    head = s3.client.head_object(Bucket=BUCKET, Key="fleet/tuf/targets/m/abc.model.bin")
    assert "immutable" in head["CacheControl"]
    store.download("targets/m/abc.model.bin", tmp_path / "copy" / "m.bin")
    assert (tmp_path / "copy" / "m.bin").read_bytes() == source.read_bytes()
    store.delete("targets/m/abc.model.bin")
    with pytest.raises(NotFoundError):
        store.read("targets/m/abc.model.bin")
    with pytest.raises(NotFoundError):
        store.download("targets/m/abc.model.bin", tmp_path / "gone.bin")
    assert not list((tmp_path / "copy").glob(".download.*"))  # no partial file left behind
    missing_bucket = S3Store("no-such-bucket", "", s3.endpoint)
    with pytest.raises(ArtifactStoreError) as err:
        missing_bucket.write("metadata/root.json", b"{}")
    assert err.value.key == "metadata/root.json"


def test_a_device_installs_from_the_bucket_it_is_told(
    s3: S3, server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    targets_url = f"{s3.endpoint}/{BUCKET}/fleet"
    fleet = server_factory(tmp_path / "server", artifact_store=f"s3://{BUCKET}/fleet",
                           s3_endpoint_url=s3.endpoint, targets_url=targets_url)  # fmt: skip
    op = Operator(fleet.url, fleet.operator_token)
    published = op.publish(1)
    stored = "fleet/tuf/" + target_key(R1, published["sha256"])
    keys = s3.keys("fleet/tuf/")
    assert {"fleet/tuf/metadata/timestamp.json", "fleet/tuf/metadata/1.root.json", stored} <= keys
    assert not (fleet.repo.repo_dir / "metadata").exists()  # the bucket is the only copy
    # The server's own /tuf/ points at the bucket, for devices enrolled before the URL was set.
    moved = requests.get(fleet.url + "/tuf/metadata/timestamp.json", allow_redirects=False,
                         timeout=10)  # fmt: skip
    assert moved.status_code == 307
    assert moved.headers["location"] == targets_url + "/tuf/metadata/timestamp.json"

    root = tmp_path / "root.json"
    root.write_bytes(fleet.repo.metadata_bytes("1.root.json"))
    agent = enroll_agent(fleet.url, fleet.config.enrollment_tokens[0], root_json=root,
                         work=tmp_path / "cam1")  # fmt: skip
    assert agent.identity.tuf_url == targets_url and agent.trust.base_url == targets_url
    agent.start()
    try:
        op.assign(1, device=agent.identity.device_id)
        assert agent.checkin_once() is True
        installed = agent.updater.installed()
        assert installed is not None and installed.sha256 == published["sha256"]
    finally:
        agent.stop()
    model = (FIXTURES / "digits_int8_r1.tflite").read_bytes()
    assert hashlib.sha256(model).hexdigest() == published["sha256"]


def test_two_servers_share_one_bucket_and_database(
    s3: S3, server_factory: Callable[..., Any], tmp_path: Path, pg_url: str
) -> None:
    store = {"artifact_store": f"s3://{BUCKET}/shared", "s3_endpoint_url": s3.endpoint}
    one = server_factory(tmp_path / "one", db_url=pg_url, **store)
    two = server_factory(tmp_path / "two", db_url=pg_url, keys_dir=one.config.keys_dir,
                         operator_token=one.operator_token, **store)  # fmt: skip
    Operator(one.url, one.operator_token).publish(1)
    Operator(two.url, two.operator_token).publish(2)  # signed from the bucket, not a stale copy
    assert set(one.repo.targets()) == set(two.repo.targets())
    assert {R1, model_target_path("digits", 2, "int8-cpu")} <= set(one.repo.targets())
    # Server two serves what server one published: metadata from the bucket, target
    # bytes fetched into its own cache; the agent's TUF client verifies all of it.
    client = TrustClient(tmp_path / "device", two.url, one.repo.metadata_bytes("1.root.json"))
    client.refresh()
    info = client.target_info(R1)
    cached = two.repo.targets_dir / stored_name(R1, info.sha256)
    cached.unlink(missing_ok=True)  # its delta build for r2 may have fetched r1 already
    got = requests.get(target_url(two.url, R1, info.sha256), timeout=30)
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == info.sha256
    assert cached.is_file()  # fetched from the bucket on the miss, kept for the next GET
    assert requests.get(target_url(two.url, R1, "0" * 64), timeout=10).status_code == 404


def test_run_flags_choose_the_store_and_the_url_devices_are_told(tmp_path: Path) -> None:
    argv = ["run", "--data", str(tmp_path), "--artifact-store", f"s3://{BUCKET}/p",
            "--s3-endpoint-url", "http://127.0.0.1:9",
            "--targets-url", "https://cdn.example/p"]  # fmt: skip
    cfg = config_from_args(build_parser().parse_args(argv)).resolve()
    assert (cfg.artifact_store, cfg.s3_endpoint_url, cfg.targets_url) == (
        f"s3://{BUCKET}/p", "http://127.0.0.1:9", "https://cdn.example/p")  # fmt: skip
    bad = build_parser().parse_args(["run", "--data", str(tmp_path), "--targets-url", "cdn/p"])
    with pytest.raises(ConfigError, match="http"):
        config_from_args(bad).resolve()
    with pytest.raises(ConfigError, match="s3://"):
        open_store("ftp://host/x", tmp_path)
