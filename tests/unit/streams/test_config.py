"""Settings from environment variables: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streams.config import ConfigError, Settings, settings_markdown

README = Path(__file__).resolve().parents[3] / "README.md"


def test_documented_defaults_are_the_dataclass_defaults():
    assert Settings.from_env({}) == Settings()


def test_the_readme_table_is_the_settings_table():
    assert settings_markdown() in README.read_text(), "regenerate it: python -m streams.config"


def test_env_values_are_parsed():
    settings = Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9092",
            "SHOPPULSE_PARTITIONS": "12",
            "SHOPPULSE_CREATE_TOPICS": "false",
            "SHOPPULSE_DATA_DIR": "/data/sp",
        }
    )
    assert settings.bootstrap_servers == "k1:9092,k2:9092"
    assert settings.partitions == 12
    assert settings.create_topics is False
    assert settings.data_dir == Path("/data/sp")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SHOPPULSE_PARTITIONS": "four"}, "SHOPPULSE_PARTITIONS='four' is not a whole number"),
        ({"SHOPPULSE_CREATE_TOPICS": "maybe"}, "SHOPPULSE_CREATE_TOPICS='maybe' is not a boolean"),
        ({"SHOPPULSE_BROKER_PROFILE": "redpanda"}, "SHOPPULSE_BROKER_PROFILE='redpanda'"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_MECHANISM or KAFKA_SASL_USERNAME is empty"),
        ({"SHOPPULSE_TOPIC_SCORES": "shop.cart"}, "topic names must differ"),
        ({"SHOPPULSE_PARTITIONS": "0"}, "SHOPPULSE_PARTITIONS must be at least 1"),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI", "KAFKA_SASL_USERNAME": "svc"},
            "KAFKA_SASL_MECHANISM='GSSAPI'; use PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        ),
        (
            {"KAFKA_SASL_USERNAME": "svc", "KAFKA_SASL_PASSWORD": "pw"},
            "KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use them; set SASL_SSL or SASL_PLAINTEXT",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_KEYFILE": "/k.pem"},
            "KAFKA_SSL_KEYFILE is set without KAFKA_SSL_CERTFILE",
        ),
        ({"SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES": "999"}, "SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES=999; use 1000 to 1000000000"),
        (
            {"SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES": "2000000", "SHOPPULSE_KAFKA_FETCH_MAX_BYTES": "1000000"},
            "SHOPPULSE_KAFKA_FETCH_MAX_BYTES=1000000 is below SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES=2000000",
        ),
        ({"SHOPPULSE_KAFKA_MAX_PARTITION_FETCH_BYTES": "0"}, "SHOPPULSE_KAFKA_MAX_PARTITION_FETCH_BYTES=0; use 1 to"),
        ({"SHOPPULSE_GC_FULL_COLLECTION_EVERY": "0"}, "SHOPPULSE_GC_FULL_COLLECTION_EVERY=0; use 1 or more"),
        (
            {"SHOPPULSE_KAFKA_PRODUCER_BUFFER_MESSAGES": "0"},
            "SHOPPULSE_KAFKA_PRODUCER_BUFFER_MESSAGES must be at least 1",
        ),
        (
            {"SHOPPULSE_KAFKA_PRODUCER_BUFFER_KBYTES": "512"},
            "SHOPPULSE_KAFKA_PRODUCER_BUFFER_KBYTES=512 cannot hold one message of "
            "SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES=1048576",
        ),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env(env)


def test_security_settings_reach_librdkafka_and_password_is_not_shown():
    settings = Settings.from_env(
        {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "svc",
            "KAFKA_SASL_PASSWORD": "s3cret",
            "KAFKA_SSL_CAFILE": "/etc/ca.pem",
        }
    )
    config = settings.librdkafka_config()
    assert config["sasl.mechanism"] == "SCRAM-SHA-512" and config["sasl.password"] == "s3cret"
    assert config["ssl.ca.location"] == "/etc/ca.pem"
    assert "s3cret" not in repr(settings) and settings.redacted()["sasl_password"] == "***"
