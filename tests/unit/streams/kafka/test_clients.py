"""Every Kafka client gets the connection, SASL/TLS settings and the size and buffer limits.

The builders in ``streams.kafka.clients`` are checked by value, then handed to the real clients
(librdkafka and Faust/aiokafka), which must accept them: librdkafka checks property names,
ranges and that the TLS files load. Test certificates are made with the ``openssl`` command
line. The embedded broker speaks no TLS, so the TLS handshakes themselves (server verification,
client certificates) are made against a plain TLS listener on 127.0.0.1: real handshakes, no
Kafka behind them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import faust
import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from streams.config import ConfigError, Settings
from streams.kafka.clients import (
    KafkaSetupError,
    admin_client,
    cluster_metadata,
    confluent_admin_config,
    confluent_consumer_config,
    confluent_producer_config,
    faust_client_settings,
    faust_ssl_context,
)
from streams.kafka.producer import produce
from streams.sim.generator import GeneratedMessage

ROOT = Path(__file__).resolve().parents[4]
#: Nobody listens here: clients are created, never connected.
NOWHERE = "127.0.0.1:9"
PASSWORD = "pw-never-logged-7f3a"
LIMITS = {
    "SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES": "200000",
    "SHOPPULSE_KAFKA_FETCH_MAX_BYTES": "4000000",
    "SHOPPULSE_KAFKA_MAX_PARTITION_FETCH_BYTES": "300000",
    "SHOPPULSE_KAFKA_MAX_POLL_RECORDS": "250",
    "SHOPPULSE_KAFKA_PRODUCER_BUFFER_KBYTES": "2048",
    "SHOPPULSE_KAFKA_PRODUCER_BUFFER_MESSAGES": "5000",
}


def make_certificate(folder: Path, name: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key: PEM file paths."""
    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is not installed; `make test` installs it (Debian package `openssl`)")
        pytest.skip("the openssl command line is not installed (apt-get install openssl; `make test` installs it)")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(cert), str(key)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """KAFKA_SSL_* values: one self-signed certificate serves as CA, broker and client certificate."""
    cert, key = make_certificate(tmp_path_factory.mktemp("tls"), "shoppulse-test")
    return {"KAFKA_SSL_CAFILE": cert, "KAFKA_SSL_CERTFILE": cert, "KAFKA_SSL_KEYFILE": key}


class TlsListener:
    """A TLS server on 127.0.0.1 that completes handshakes and records each client's certificate.

    Args:
        cert, key: the server's certificate and key.
        client_ca: when given, clients must present a certificate this CA signed (mutual TLS).
    """

    def __init__(self, cert: str, key: str, client_ca: str | None = None) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        if client_ca:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(client_ca)
        self.client_certs: list[dict] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._open: list[ssl.SSLSocket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            try:
                tls = self.context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):  # the client refused us, or we refused it
                conn.close()
                continue
            self.client_certs.append(tls.getpeercert() or {})
            self._open.append(tls)  # held open: the client waits for a Kafka answer that never comes

    def wait_for_handshake(self, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.client_certs and time.monotonic() < deadline:
            time.sleep(0.02)
        return bool(self.client_certs)

    def close(self) -> None:
        self._sock.close()
        for tls in self._open:
            tls.close()


@pytest.fixture
def listener(tls_files) -> Iterator[TlsListener]:
    """Presents the test certificate; requires a client certificate the test CA signed."""
    server = TlsListener(
        tls_files["KAFKA_SSL_CERTFILE"], tls_files["KAFKA_SSL_KEYFILE"], client_ca=tls_files["KAFKA_SSL_CAFILE"]
    )
    yield server
    server.close()


def secured(tls_files: dict[str, str], protocol: str = "SASL_SSL", **extra: str) -> Settings:
    sasl = {"KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_USERNAME": "svc", "KAFKA_SASL_PASSWORD": PASSWORD}
    return Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": NOWHERE,
            "KAFKA_SECURITY_PROTOCOL": protocol,
            **(sasl if protocol.startswith("SASL") else {}),
            **tls_files,
            **LIMITS,
            **extra,
        }
    )


def test_confluent_clients_get_security_and_limits(tls_files):
    settings = secured(tls_files)
    security = {
        "bootstrap.servers": NOWHERE,
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc",
        "sasl.password": PASSWORD,
        "ssl.ca.location": tls_files["KAFKA_SSL_CAFILE"],
        "ssl.certificate.location": tls_files["KAFKA_SSL_CERTFILE"],
        "ssl.key.location": tls_files["KAFKA_SSL_KEYFILE"],
    }
    assert confluent_admin_config(settings) == {**security, "log_level": 3}
    assert confluent_producer_config(settings) == {
        **security,
        "message.max.bytes": 200000,
        "queue.buffering.max.kbytes": 2048,
        "queue.buffering.max.messages": 5000,
    }
    assert confluent_consumer_config(settings, "g1") == {
        **security,
        "group.id": "g1",
        "message.max.bytes": 200000,
        "fetch.max.bytes": 4000000,
        "max.partition.fetch.bytes": 300000,
    }
    plain = Settings.from_env({})
    assert "sasl.password" not in confluent_producer_config(plain)
    assert confluent_producer_config(plain)["security.protocol"] == "PLAINTEXT"


def test_librdkafka_accepts_the_settings_and_loads_the_tls_files(tls_files):
    settings = secured(tls_files)
    quiet = {"log_level": 0}
    AdminClient({**confluent_admin_config(settings), **quiet})
    Producer({**confluent_producer_config(settings), **quiet})
    Consumer({**confluent_consumer_config(settings, "g1"), **quiet}).close()
    with pytest.raises(KafkaSetupError, match=r"KAFKA_SSL_\* and KAFKA_SASL_\* settings"):
        admin_client(secured({**tls_files, "KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}))


def test_a_full_producer_buffer_makes_send_wait():
    settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": NOWHERE, "SHOPPULSE_KAFKA_PRODUCER_BUFFER_MESSAGES": "5"})
    producer = Producer({**confluent_producer_config(settings), "log_level": 0})
    for _ in range(5):
        producer.produce("t", b"x")
    with pytest.raises(BufferError):  # produce() in streams.kafka.producer polls and retries on this
        producer.produce("t", b"x")
    producer.purge()


def test_a_message_over_the_size_limit_is_refused_before_it_is_sent():
    settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": NOWHERE, "SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES": "1000"})
    big = GeneratedMessage(topic_kind="page_view", key=b"u1", value=b"x" * 2000)
    report = produce(
        [big], settings.topic_by_kind, {**confluent_producer_config(settings), "log_level": 0}, flush_timeout_s=1.0
    )
    assert (report.sent, report.delivered, report.errors) == (1, 0, {"MSG_SIZE_TOO_LARGE": 1})


def test_faust_gets_credentials_tls_and_limits(tls_files):
    settings = secured(tls_files)
    options = faust_client_settings(settings)
    auth = credentials_to_aiokafka_auth(options["broker_credentials"])  # what Faust hands aiokafka
    assert {
        k: auth[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password")
    } == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": PASSWORD,
    }
    context = auth["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1, "verifies the brokers against KAFKA_SSL_CAFILE"
    conf = faust.App("limits-test", broker=f"kafka://{NOWHERE}", **options).conf
    assert (conf.producer_max_request_size, conf.consumer_max_fetch_size, conf.broker_max_poll_records) == (
        200000,
        300000,
        250,
    )

    tls_only = faust_client_settings(secured(tls_files, protocol="SSL"))
    assert credentials_to_aiokafka_auth(tls_only["broker_credentials"])["security_protocol"] == "SSL"
    plain = faust_client_settings(Settings.from_env({}))
    assert plain["broker_credentials"] is None and plain["broker_max_poll_records"] is None, "0 = no cap"


def test_unreadable_tls_files_name_the_variables(tls_files, tmp_path):
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(ConfigError, match="KAFKA_SSL_CAFILE=.*ca.pem.*point them at readable PEM files"):
        faust_ssl_context(secured({**tls_files, "KAFKA_SSL_CAFILE": str(not_pem)}))


def test_mutual_tls_handshakes_with_the_configured_files(tls_files, listener):
    settings = Settings.from_env(
        {"KAFKA_BOOTSTRAP_SERVERS": listener.address, "KAFKA_SECURITY_PROTOCOL": "SSL", **tls_files}
    )
    admin = admin_client(settings)
    for _ in range(10):
        try:
            admin.list_topics(timeout=0.5)  # no Kafka behind the handshake: times out
        except KafkaException:
            pass
        if listener.client_certs:
            break
    assert listener.client_certs and ((("commonName", "shoppulse-test"),),) == listener.client_certs[0]["subject"], (
        "librdkafka verified the listener against KAFKA_SSL_CAFILE and showed KAFKA_SSL_CERTFILE"
    )
    assert not admin.security_errors

    listener.client_certs.clear()
    host, port = listener.address.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:  # as aiokafka does with Faust's context
        with faust_ssl_context(settings).wrap_socket(raw, server_hostname=host):
            assert listener.wait_for_handshake()


def test_brokers_another_ca_signed_are_refused_fast(tls_files, listener, tmp_path):
    other_ca, _ = make_certificate(tmp_path, "someone-else")
    settings = Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": listener.address,
            "KAFKA_SECURITY_PROTOCOL": "SSL",
            **tls_files,
            "KAFKA_SSL_CAFILE": other_ca,
        }
    )
    started = time.monotonic()
    with pytest.raises(
        KafkaSetupError,
        match="certificate verify failed.*check that the brokers listen with that protocol, and KAFKA_SSL_CAFILE",
    ):
        cluster_metadata(settings)
    assert time.monotonic() - started < 3.0
    host, port = listener.address.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            faust_ssl_context(settings).wrap_socket(raw, server_hostname=host)
    assert not listener.client_certs


def test_the_worker_builds_faust_from_faust_client_settings(tls_files, tmp_path):
    from streams.worker.app import ScoringWorker

    settings = secured(
        tls_files,
        SHOPPULSE_BROKER_PROFILE="kafka",
        SHOPPULSE_DATA_DIR=str(tmp_path / "data"),
        SHOPPULSE_MODELS_DIR=str(tmp_path / "models"),
    )
    conf = ScoringWorker(settings).app.conf
    credentials = conf.broker_credentials
    assert isinstance(credentials, faust.SASLCredentials) and credentials.username == "svc"
    assert (conf.producer_max_request_size, conf.consumer_max_fetch_size, conf.broker_max_poll_records) == (
        200000,
        300000,
        250,
    )


@pytest.mark.parametrize("standby_replicas", ["0", "1"])
def test_the_worker_gives_faust_the_configured_standby_replicas(tmp_path, standby_replicas):
    """Standbys double the table work with two workers (BENCHMARKS.md), so the setting must reach Faust."""
    from streams.worker.app import ScoringWorker

    settings = Settings.from_env(
        {
            "SHOPPULSE_STANDBY_REPLICAS": standby_replicas,
            "SHOPPULSE_BROKER_PROFILE": "kafka",
            "SHOPPULSE_DATA_DIR": str(tmp_path / "data"),
            "SHOPPULSE_MODELS_DIR": str(tmp_path / "models"),
        }
    )
    assert ScoringWorker(settings).app.conf.table_standby_replicas == int(standby_replicas)


def test_only_streams_kafka_turns_settings_into_client_settings():
    """A client built from ``Settings.librdkafka_config()`` directly would miss the limits."""
    allowed = {ROOT / "streams" / "config.py", ROOT / "streams" / "kafka" / "clients.py"}
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("streams", "bench")
        for path in (ROOT / folder).rglob("*.py")
        if path not in allowed
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\.librdkafka_config\(", line)
    ]
    assert not offenders, (
        f"{offenders} build client settings from librdkafka_config(); use "
        "streams.kafka.clients.confluent_producer_config / confluent_consumer_config / confluent_admin_config"
    )
