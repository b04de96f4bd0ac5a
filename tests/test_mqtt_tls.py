"""MQTT over TLS on both sides, with a throwaway CA made here.

The embedded broker serves devices TLS-only (its ingest uses a loopback
listener); a private Mosquitto serves TLS to devices and to the server's
ingest (``mqtts://`` + ``mqtt_ca_file``). The agent's Publisher with the CA
gets its telemetry through; a client that does not trust the CA, or speaks
plain MQTT to the TLS port, gets nowhere.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import requests
from conftest import server_config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mosquitto_proc import Mosquitto, TlsFiles, wait_login
from paho.mqtt.enums import CallbackAPIVersion
from waiting import eventually

from agent.transport.mqtt import MqttSettings, Publisher
from agent.transport.outbox import Outbox
from server.app import ServerHandle
from server.db import queries
from server.errors import ConfigError

WAIT_S = 20.0


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_pki(directory: Path) -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1 and localhost (EC P-256, one day)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("EdgeFleet test CA"))
        .issuer_name(_name("EdgeFleet test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(_pem_key(key))
    files.key.chmod(0o600)
    return files


@pytest.fixture
def pki(tmp_path: Path) -> TlsFiles:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_mosquitto(tmp_path: Path, pki: TlsFiles) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto", tls=pki)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(params=["embedded", "mosquitto"])
def tls_fleet(
    request: pytest.FixtureRequest, tmp_path: Path, pki: TlsFiles
) -> tuple[ServerHandle, Mosquitto | None]:
    if request.param == "embedded":
        factory = request.getfixturevalue("server_factory")
        server = factory(
            tmp_path / "server", mqtt_tls_cert_file=pki.cert, mqtt_tls_key_file=pki.key
        )
        return server, None
    broker: Mosquitto = request.getfixturevalue("tls_mosquitto")
    factory = request.getfixturevalue("server_factory")
    server = factory(tmp_path / "server", mqtt_url=broker.ingest_url, mqtt_ca_file=pki.ca)
    return server, broker


def enroll(server: ServerHandle) -> dict[str, Any]:
    body = {
        "token": server.config.enrollment_tokens[0],
        "hardware_id": "hw-tls",
        "profile": "rpi4",
        "variant_preference": ["int8-cpu"],
        "agent_version": "0.1.0",
    }
    resp = requests.post(f"{server.url}/api/v1/enroll", json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    reply: dict[str, Any] = resp.json()
    return reply




def plain_mqtt_reply(port: int) -> bytes:
    """Send a plain-text MQTT CONNECT to the TLS port and return what comes back."""
    client_id = b"plain"
    variable = b"\x00\x04MQTT\x04\x02\x00\x1e" + struct.pack("!H", len(client_id)) + client_id
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(bytes([0x10, len(variable)]) + variable)
        try:
            return sock.recv(64)
        except (ConnectionResetError, TimeoutError):
            return b""


def test_tls_publisher_with_the_ca_gets_through_and_others_are_refused(
    tls_fleet: tuple[ServerHandle, Mosquitto | None], pki: TlsFiles, tmp_path: Path
) -> None:
    server, mosquitto = tls_fleet
    dev = enroll(server)
    mq = dev["mqtt"]
    assert mq["tls"] is True  # devices are told to use TLS
    if mosquitto is not None:
        mosquitto.configure_from_server(server.url, server.operator_token)
        wait_login(mq["host"], mq["port"], mq["username"], mq["password"], ca_certs=str(pki.ca))

    settings = MqttSettings(
        mq["host"], mq["port"], mq["username"], mq["password"], tls=True, ca_file=str(pki.ca)
    )
    outbox = Outbox(tmp_path / "outbox.sqlite")
    publisher = Publisher(dev["device_id"], settings, outbox)
    publisher.start()
    try:
        publisher.publish("telemetry", {"inferences": 7, "over": "tls"})

        def stored() -> bool:
            with server.db.session() as s:
                rows = {t.channel: t.payload for t in queries.latest_telemetry(s, dev["device_id"])}
            return rows.get("telemetry", {}).get("over") == "tls"

        assert eventually(stored)
    finally:
        publisher.stop()
        outbox.close()

    # A client that does not trust our CA fails the handshake...
    untrusting = paho.Client(CallbackAPIVersion.VERSION2, client_id="no-ca")
    untrusting.username_pw_set(mq["username"], mq["password"])
    untrusting.tls_set()  # the system trust store only
    with pytest.raises(ssl.SSLCertVerificationError):
        untrusting.connect(mq["host"], mq["port"])
    # ...and plain MQTT on the TLS port never gets a CONNACK.
    assert not plain_mqtt_reply(mq["port"]).startswith(b"\x20")


def test_tls_configuration_errors_are_clear(tmp_path: Path, pki: TlsFiles) -> None:
    for overrides, message in (
        ({"mqtt_tls_cert_file": pki.cert}, "given together"),
        (
            {"mqtt_tls_cert_file": pki.cert, "mqtt_tls_key_file": tmp_path / "nope"},
            "not a readable",
        ),
        ({"mqtt_ca_file": tmp_path / "missing-ca.pem"}, "not a readable"),
        (
            {
                "mqtt_tls_cert_file": pki.cert,
                "mqtt_tls_key_file": pki.key,
                "mqtt_url": "mqtt://127.0.0.1:1",
            },
            "embedded broker",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            server_config(tmp_path / "server", **overrides).resolve()
