"""``shoppulse dlq replay`` end to end: a real worker dead-letters events, the "producer fix" is a
raised SHOPPULSE_MAX_EVENT_BYTES, the replay sends them back, and the fixed worker scores each
exactly once; a second replay sends nothing. The state equals the offline replay of the events."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from itertools import islice

import pytest

from features.encoding import decode_state, encode_state
from features.offline import final_states
from features.state import StateConfig
from streams.kafka.clients import ensure_topics
from streams.kafka.producer import produce
from streams.sim.generator import GeneratedMessage, GeneratorConfig, ShopSimulator, at_most_per_shopper
from streams.tools import dlq
from streams.tools.cli import parse_args

from .kafka_helpers import (
    WorkerProcess,
    decoded_headers,
    headers_of,
    isolated_settings,
    read_to_end,
    read_topic,
    value_of,
)
from .test_worker import changelog_states, newest_ts, scored_until, valid_events

pytestmark = pytest.mark.integration

#: The broken worker's size limit; the padded events are larger, every simulated one smaller.
TIGHT_EVENT_BYTES = 1024
#: The worker's largest output message: the huge event's dead letter is cut to fit it.
MAX_MESSAGE_BYTES = 20_000


def padded_page_view(user_id: str, ts_ms: int, pad_bytes: int) -> GeneratedMessage:
    """A valid page view with an extra field that makes it ``pad_bytes`` longer (unknown fields are allowed)."""
    doc = {
        "schema_version": 1,
        "event_id": f"e-{user_id}",
        "user_id": user_id,
        "ts": ts_ms,
        "session_id": "s-1",
        "item_id": "sku-1",
        "category": "shoes",
        "price": 10.0,
        "padding": "x" * pad_bytes,
    }
    return GeneratedMessage("page_view", user_id.encode(), json.dumps(doc).encode())


def replay(settings, *options: str) -> int:
    args = parse_args(["dlq", "replay", "--quiet", *options])
    return dlq.run(args, settings)


def test_replay_after_the_fix_scores_each_dead_letter_once_and_a_second_replay_sends_nothing(broker, tmp_path, capsys):
    settings = isolated_settings(
        broker.bootstrap_servers,
        tmp_path / "worker",
        max_event_bytes=TIGHT_EVENT_BYTES,
        kafka_max_message_bytes=MAX_MESSAGE_BYTES,
    )
    ensure_topics(settings)
    simulator = ShopSimulator(GeneratorConfig(seed=3, n_shoppers=40, malformed_fraction=0.05, clock="live"))
    base = [
        m
        for m in islice(at_most_per_shopper(simulator.messages(), StateConfig().dedup_ids), 600)
        if len(m.value) < TIGHT_EVENT_BYTES and m.malformed_reason != "oversized"
    ]
    malformed = [m for m in base if m.malformed_reason is not None]
    assert malformed, "other reasons must be in the dead-letter topic, for --reason to leave them"
    now_ms = int(time.time() * 1000)
    padded = [padded_page_view(f"u-padded-{i}", now_ms - 60_000 + i, 1500) for i in range(12)]
    huge = padded_page_view("u-huge", now_ms - 30_000, 30_000)  # its dead letter cannot hold it whole

    broken = WorkerProcess(settings, tmp_path / "broken.log")
    try:
        broken.wait_ready()
        assert produce(base + padded + [huge], settings.topic_by_kind, settings.librdkafka_config()).failed == 0
        scored_until(settings, newest_ts(valid_events(base)))
        read_topic(settings, settings.topic_dead_letter, until=lambda ms: len(ms) >= len(malformed) + len(padded) + 1)
    finally:
        assert broken.stop() == 0, broken.log_tail()

    assert replay(settings, "--reason", "oversized", "--dry-run") == 0
    listing = capsys.readouterr().out
    assert f"would replay {len(padded)}," in listing and "1 cut short (skipped)" in listing
    assert f"{len(malformed)} not selected" in listing
    assert f"{len(padded):>8}  oversized" in listing and settings.topic_page_views in listing
    assert not [m for m in read_to_end(settings, settings.topic_page_views) if m.headers()], "a dry run sends nothing"

    fixed = WorkerProcess(dataclasses.replace(settings, max_event_bytes=65536), tmp_path / "fixed.log")
    try:
        fixed.wait_ready()
        assert replay(settings, "--reason", "oversized") == 0
        first = capsys.readouterr().out
        assert f"replayed {len(padded)} dead letters" in first
        (source,) = [m for m in read_to_end(settings, settings.topic_page_views) if m.key() == huge.key]
        assert f"cut from {len(huge.value)} bytes" in first
        assert f"{source.topic()}[{source.partition()}]@{source.offset()}" in first, "where to fetch it whole"
        scored_until(settings, newest_ts(valid_events(padded)))
        assert replay(settings, "--reason", "oversized") == 0
        second = capsys.readouterr().out
        assert f"replaying 0, {len(padded)} replayed before (skipped)" in second
    finally:
        assert fixed.stop() == 0, fixed.log_tail()

    # The source topic holds one replay per dead letter, each naming a distinct dead letter.
    dead = {f"{m.topic()}:{m.partition()}:{m.offset()}": m for m in read_to_end(settings, settings.topic_dead_letter)}
    replays = [m for m in read_to_end(settings, settings.topic_page_views) if m.headers()]
    refs = [decoded_headers(m)[dlq.REPLAYED_FROM] for m in replays]
    assert len(refs) == len(set(refs)) == len(padded)
    for replayed, ref in zip(replays, refs, strict=True):
        assert (replayed.key(), replayed.value()) == (dead[ref].key(), dead[ref].value())
        assert headers_of(dead[ref])["shoppulse.dlq.reason"] == b"oversized"

    # Each replayed event scored exactly once (by its own event id); the cut one never.
    scores = [json.loads(value_of(m)) for m in read_to_end(settings, settings.topic_scores)]
    per_user = Counter(doc["user_id"] for doc in scores)
    for message in padded:
        user = message.key.decode()
        assert per_user[user] == 1, f"{user} scored {per_user[user]} times"
    assert {doc["trigger_event_id"] for doc in scores if doc["user_id"].startswith("u-padded-")} == {
        f"e-{m.key.decode()}" for m in padded
    }
    assert per_user["u-huge"] == 0

    # The state: exactly the offline replay of every event the workers accepted.
    offline = final_states(valid_events(base) + valid_events(padded))
    online = {user: decode_state(raw) for user, raw in changelog_states(settings).items()}
    assert set(online) == set(offline)
    for user, state in offline.items():
        assert encode_state(online[user]) == encode_state(state), user
