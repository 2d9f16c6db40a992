"""Every Kafka client gets the connection, SASL/TLS settings and the size and buffer limits.

The builders in ``streams.kafka`` are checked by value, then handed to the real clients
(librdkafka and Faust/aiokafka), which must accept them: librdkafka checks property names,
ranges and that the TLS files load. No broker is needed; a test certificate is made with the
``openssl`` command line.
"""
from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
from pathlib import Path

import faust
import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from streams.config import ConfigError, Settings
from streams.generator import GeneratedMessage
from streams.kafka import (
    KafkaSetupError,
    admin_client,
    confluent_admin_config,
    confluent_consumer_config,
    confluent_producer_config,
    faust_client_settings,
    faust_ssl_context,
)
from streams.producer import produce

ROOT = Path(__file__).resolve().parents[2]
#: Nobody listens here: clients are created, never connected.
NOWHERE = "127.0.0.1:9"
PASSWORD = "pw-never-logged-7f3a"
LIMITS = {"SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES": "200000", "SHOPPULSE_KAFKA_FETCH_MAX_BYTES": "4000000",
          "SHOPPULSE_KAFKA_MAX_PARTITION_FETCH_BYTES": "300000", "SHOPPULSE_KAFKA_MAX_POLL_RECORDS": "250",
          "SHOPPULSE_KAFKA_PRODUCER_BUFFER_KBYTES": "2048", "SHOPPULSE_KAFKA_PRODUCER_BUFFER_MESSAGES": "5000"}


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A self-signed certificate (also the CA) and its key, as PEM files."""
    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is not installed; `make test` installs it (Debian package `openssl`)")
        pytest.skip("the openssl command line is not installed (apt-get install openssl; `make test` installs it)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return {"KAFKA_SSL_CAFILE": str(cert), "KAFKA_SSL_CERTFILE": str(cert), "KAFKA_SSL_KEYFILE": str(key)}


def secured(tls_files: dict[str, str], protocol: str = "SASL_SSL", **extra: str) -> Settings:
    sasl = {"KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_USERNAME": "svc", "KAFKA_SASL_PASSWORD": PASSWORD}
    return Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": NOWHERE, "KAFKA_SECURITY_PROTOCOL": protocol,
                              **(sasl if protocol.startswith("SASL") else {}), **tls_files, **LIMITS, **extra})


def test_confluent_clients_get_security_and_limits(tls_files):
    settings = secured(tls_files)
    security = {"bootstrap.servers": NOWHERE, "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                "sasl.username": "svc", "sasl.password": PASSWORD, "ssl.ca.location": tls_files["KAFKA_SSL_CAFILE"],
                "ssl.certificate.location": tls_files["KAFKA_SSL_CERTFILE"],
                "ssl.key.location": tls_files["KAFKA_SSL_KEYFILE"]}
    assert confluent_admin_config(settings) == {**security, "log_level": 3}
    assert confluent_producer_config(settings) == {**security, "message.max.bytes": 200000,
                                                   "queue.buffering.max.kbytes": 2048,
                                                   "queue.buffering.max.messages": 5000}
    assert confluent_consumer_config(settings, "g1") == {**security, "group.id": "g1", "message.max.bytes": 200000,
                                                         "fetch.max.bytes": 4000000, "max.partition.fetch.bytes": 300000}
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
    with pytest.raises(BufferError):  # produce() in streams.producer polls and retries on this
        producer.produce("t", b"x")
    producer.purge()


def test_a_message_over_the_size_limit_is_refused_before_it_is_sent():
    settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": NOWHERE, "SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES": "1000"})
    big = GeneratedMessage(topic_kind="page_view", key=b"u1", value=b"x" * 2000)
    report = produce([big], settings.topic_by_kind, {**confluent_producer_config(settings), "log_level": 0},
                     flush_timeout_s=1.0)
    assert (report.sent, report.delivered, report.errors) == (1, 0, {"MSG_SIZE_TOO_LARGE": 1})


def test_faust_gets_credentials_tls_and_limits(tls_files):
    settings = secured(tls_files)
    options = faust_client_settings(settings)
    auth = credentials_to_aiokafka_auth(options["broker_credentials"])  # what Faust hands aiokafka
    assert {k: auth[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                 "sasl_plain_password")} == {"security_protocol": "SASL_SSL",
                                                             "sasl_mechanism": "SCRAM-SHA-512",
                                                             "sasl_plain_username": "svc",
                                                             "sasl_plain_password": PASSWORD}
    context = auth["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1, "verifies the brokers against KAFKA_SSL_CAFILE"
    conf = faust.App("limits-test", broker=f"kafka://{NOWHERE}", **options).conf
    assert (conf.producer_max_request_size, conf.consumer_max_fetch_size, conf.broker_max_poll_records) == \
        (200000, 300000, 250)

    tls_only = faust_client_settings(secured(tls_files, protocol="SSL"))
    assert credentials_to_aiokafka_auth(tls_only["broker_credentials"])["security_protocol"] == "SSL"
    plain = faust_client_settings(Settings.from_env({}))
    assert plain["broker_credentials"] is None and plain["broker_max_poll_records"] is None, "0 = no cap"


def test_unreadable_tls_files_name_the_variables(tls_files, tmp_path):
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(ConfigError, match="KAFKA_SSL_CAFILE=.*ca.pem.*point them at readable PEM files"):
        faust_ssl_context(secured({**tls_files, "KAFKA_SSL_CAFILE": str(not_pem)}))


@pytest.mark.xfail(strict=True, reason="streams/app.py passes broker_credentials=faust_credentials(settings) only; "
                   "it must pass **faust_client_settings(settings) to faust.App (then drop this marker)")
def test_the_worker_builds_faust_from_faust_client_settings(tls_files, tmp_path):
    from streams.app import ScoringWorker

    settings = secured(tls_files, SHOPPULSE_BROKER_PROFILE="kafka", SHOPPULSE_DATA_DIR=str(tmp_path / "data"),
                       SHOPPULSE_MODELS_DIR=str(tmp_path / "models"))
    conf = ScoringWorker(settings).app.conf
    assert conf.broker_credentials.username == "svc"
    assert (conf.producer_max_request_size, conf.consumer_max_fetch_size, conf.broker_max_poll_records) == \
        (200000, 300000, 250)


def test_only_streams_kafka_turns_settings_into_client_settings():
    """A client built from ``Settings.librdkafka_config()`` directly would miss the limits."""
    allowed = {ROOT / "streams" / "config.py", ROOT / "streams" / "kafka.py"}
    offenders = [f"{path.relative_to(ROOT)}:{n}" for folder in ("streams", "bench") for path in (ROOT / folder).rglob("*.py")
                 if path not in allowed
                 for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\.librdkafka_config\(", line)]
    assert not offenders, (f"{offenders} build client settings from librdkafka_config(); use "
                           "streams.kafka.confluent_producer_config / confluent_consumer_config / confluent_admin_config")
