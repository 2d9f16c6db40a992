"""The per-batch logic without a broker: validation, dead letters, event-time order, one score per shopper."""

from __future__ import annotations

import json

import pytest

from features.encoding import decode_state, encode_state
from features.events import DEFAULT_LIMITS, Event, encode_event
from features.spec import DEFAULT_FEATURE_SPEC
from features.state import ShopperState, StateConfig
from models.scoring import BatchScorer
from streams.worker.envelope import Stored
from streams.worker.metrics import WorkerMetrics
from streams.worker.pipeline import DEAD_LETTER_FRAMING_BYTES, BatchProcessor, DeadLetter, InputMessage

NOW_MS = 1_760_000_000_000
TOPICS = {"views": "page_view", "cart": "cart", "orders": "order"}


def view(user: str, n: int, ts: int) -> Event:
    return Event(
        "view", f"{user}-e{n}", user, ts, session_id="s1", item_id=f"i{n}", category="toys", price=9.5, quantity=1
    )


def message(event: Event, offset: int, topic: str = "views", key: bytes | None = None) -> InputMessage:
    return InputMessage(topic, 0, offset, event.user_id.encode() if key is None else key, encode_event(event))


def make_processor(tmp_path, **options) -> BatchProcessor:
    """With an empty model registry: the heuristic scores. ``options``: BatchProcessor's keyword arguments."""
    return BatchProcessor(
        TOPICS,
        StateConfig(),
        DEFAULT_FEATURE_SPEC,
        BatchScorer(DEFAULT_FEATURE_SPEC, tmp_path),
        DEFAULT_LIMITS,
        WorkerMetrics(),
        **options,
    )


@pytest.fixture
def processor(tmp_path) -> BatchProcessor:
    return make_processor(tmp_path)


def run(processor, messages, store, committed=None):
    """One batch against ``store`` (key -> stored value), its writes applied (None deletes).
    ``committed``: (topic, partition) -> committed input offset; absent: none committed."""
    committed = committed or {}
    outcome = processor.process(
        messages, lambda partition, key: store.get(key), now_ms=NOW_MS, committed=lambda t, p: committed.get((t, p))
    )
    for write in outcome.writes:
        if write.value is None:
            store.pop(write.key, None)
        else:
            store[write.key] = write.value
    return outcome


def state_of(store, key: bytes = b"u1") -> bytes:
    state = Stored.decode(store[key]).state
    assert state is not None
    return state


def state_and_offsets(value: bytes) -> tuple[bytes | None, dict[tuple[str, int], int]]:
    """What must not depend on how events were batched (the live memory does: it counts scorings)."""
    stored = Stored.decode(value)
    return stored.state, stored.offsets


def test_one_score_per_shopper_with_the_latest_state(processor):
    store: dict[bytes, bytes] = {}
    events = [view("u1", 1, NOW_MS - 3000), view("u2", 1, NOW_MS - 2500), view("u1", 2, NOW_MS - 2000)]
    outcome = run(processor, [message(e, i) for i, e in enumerate(events)], store)
    assert [s.user_id for s in outcome.scored] == ["u1", "u2"]
    assert outcome.applied == 3 and not outcome.dead_letters
    u1 = outcome.scored[0]
    assert Stored.decode(store[b"u1"]).offsets == {("views", 0): 2}  # the highest offset applied to u1
    doc = json.loads(u1.result)
    assert doc["trigger_event_id"] == "u1-e2" and doc["trigger_ts"] == NOW_MS - 2000
    assert 0.0 <= doc["scores"]["purchase_intent_heuristic"] <= 1.0
    expected = ShopperState.new("u1")
    for e in (events[0], events[2]):
        expected.update(e, StateConfig())
    assert decode_state(state_of(store)) == expected


def test_events_are_applied_in_event_time_order_within_a_batch(processor):
    in_order: dict[bytes, bytes] = {}
    shuffled: dict[bytes, bytes] = {}
    events = [view("u1", n, NOW_MS - 10_000 + n * 1000) for n in range(5)]
    run(processor, [message(e, i) for i, e in enumerate(events)], in_order)
    run(processor, [message(e, i) for i, e in enumerate(reversed(events))], shuffled)
    assert state_of(shuffled) == state_of(in_order)


def test_invalid_messages_become_dead_letters_with_their_source(processor):
    good = view("u1", 1, NOW_MS - 1000)
    messages = [
        message(good, 0),
        InputMessage("cart", 3, 41, b"u9", b"{not json"),
        message(good, 2, key=b"someone-else"),
        InputMessage("orders", 1, 7, b"u1", b"[]"),
    ]
    outcome = run(processor, messages, {})
    assert [(d.message.offset, d.reason) for d in outcome.dead_letters] == [
        (41, "bad_json"),
        (2, "wrong_key"),
        (7, "not_object"),
    ]
    headers = dict(outcome.dead_letters[0].headers(failed_at_ms=NOW_MS))
    assert headers["shoppulse.dlq.source_topic"] == b"cart" and headers["shoppulse.dlq.source_partition"] == b"3"
    assert headers["shoppulse.dlq.source_offset"] == b"41" and headers["shoppulse.dlq.reason"] == b"bad_json"
    assert b"JSON" in headers["shoppulse.dlq.detail"]
    assert len(outcome.scored) == 1


@pytest.mark.parametrize("size", [0, 100, 5_000, 50_000])
def test_a_dead_letter_keeps_its_bytes_or_is_cut_to_fit_the_message_limit(size):
    limit = 10_000
    original = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    dead = DeadLetter(InputMessage("shop.page_views", 3, 41, b"u1", original), "bad_json", "not JSON; fix the producer")
    value, headers = dead.record(failed_at_ms=NOW_MS, max_message_bytes=limit)
    names = dict(headers)
    if size <= 5_000:
        assert value is original and "shoppulse.dlq.value_truncated_from" not in names
    else:
        assert value is not None
        assert original.startswith(value) and names["shoppulse.dlq.value_truncated_from"] == str(size).encode()
        message_bytes = len(value) + len(b"u1") + sum(len(n) + len(c) for n, c in headers)
        assert limit - DEAD_LETTER_FRAMING_BYTES - 1 <= message_bytes <= limit - DEAD_LETTER_FRAMING_BYTES
    assert names["shoppulse.dlq.source_offset"] == b"41"
    assert DeadLetter(InputMessage("shop.cart", 0, 1, None, None), "no_value", "").record(NOW_MS, limit)[0] is None


def test_a_replayed_batch_changes_no_state_but_is_scored_again(processor):
    """After kill -9 the state may be stored while the scores were still in the producer: the
    replay finds only duplicates, and must publish them again (found by bench/soak.py)."""
    store: dict[bytes, bytes] = {}
    batch = [message(view("u1", n, NOW_MS - 5000 + n), n) for n in range(3)]
    first = run(processor, batch, store)
    before = store[b"u1"]
    outcome = run(processor, batch, store)  # at-least-once redelivery after a crash
    assert outcome.replayed == 3 and outcome.applied == 0 and outcome.duplicates == 0
    assert store[b"u1"] == before
    replayed = [json.loads(s.result)["trigger_event_id"] for s in outcome.scored]
    assert replayed == [json.loads(s.result)["trigger_event_id"] for s in first.scored] == ["u1-e2"]


def test_a_replay_longer_than_the_dedup_window_applies_nothing_twice(processor):
    """The skip rule: an event at or below the stored offset of its topic is already in the state,
    however many events ago (the event-id dedup remembers only the last ``dedup_ids``)."""
    n_events = 3 * StateConfig().dedup_ids
    events = [view("u1", n, NOW_MS - 600_000 + n * 1000) for n in range(n_events)]
    once: dict[bytes, bytes] = {}
    run(processor, [message(e, n) for n, e in enumerate(events)], once)
    store: dict[bytes, bytes] = {}
    for start in range(0, n_events, 10):
        run(processor, [message(e, start + i) for i, e in enumerate(events[start : start + 10])], store)
    replay = run(processor, [message(e, n) for n, e in enumerate(events)], store)  # nothing was committed
    assert replay.replayed == n_events and replay.applied == 0
    assert state_and_offsets(store[b"u1"]) == state_and_offsets(once[b"u1"])
    assert decode_state(state_of(store)).events_lifetime == n_events


def test_a_replay_from_inside_a_batch_applies_only_the_new_events(processor):
    events = [view("u1", n, NOW_MS - 60_000 + n * 1000) for n in range(20)]
    once: dict[bytes, bytes] = {}
    run(processor, [message(e, n) for n, e in enumerate(events)], once)
    store: dict[bytes, bytes] = {}
    run(processor, [message(e, n) for n, e in enumerate(events[:12])], store)
    outcome = run(processor, [message(e, 5 + n) for n, e in enumerate(events[5:])], store)
    assert (outcome.replayed, outcome.applied) == (7, 8)
    assert state_and_offsets(store[b"u1"]) == state_and_offsets(once[b"u1"])


def test_offsets_are_per_topic_and_the_highest_whatever_the_event_time_order(processor):
    store: dict[bytes, bytes] = {}
    late_in_log = view("u1", 1, NOW_MS - 9000)
    run(processor, [message(view("u1", 2, NOW_MS - 1000), 4), message(late_in_log, 5)], store)
    assert Stored.decode(store[b"u1"]).offsets == {("views", 0): 5}  # offset 4 is applied last (newer event time)
    cart = Event("cart_add", "u1-c1", "u1", NOW_MS - 500, session_id="s1", item_id="i1", price=9.5, quantity=1)
    outcome = run(processor, [message(cart, 0, topic="cart")], store)  # offset 0 of another topic is new
    assert outcome.applied == 1 and Stored.decode(store[b"u1"]).offsets == {("views", 0): 5, ("cart", 0): 0}
    elsewhere = InputMessage("views", 1, 0, b"u1", encode_event(view("u1", 9, NOW_MS - 400)))
    assert run(processor, [elsewhere], store).applied == 1  # offset 0 of another partition is new too


def test_a_producer_repeat_at_a_new_offset_is_still_a_duplicate(processor):
    store: dict[bytes, bytes] = {}
    event = view("u1", 1, NOW_MS - 1000)
    run(processor, [message(event, 0)], store)
    outcome = run(processor, [message(event, 1)], store)
    assert (outcome.duplicates, outcome.replayed, outcome.applied) == (1, 0, 0)
    assert Stored.decode(store[b"u1"]).offsets == {("views", 0): 1}


def test_a_bare_state_of_an_older_release_is_read_and_enveloped(processor):
    state = ShopperState.new("u1")
    state.update(view("u1", 1, NOW_MS - 2000), StateConfig())
    store = {b"u1": encode_state(state)}
    outcome = run(processor, [message(view("u1", 2, NOW_MS - 1000), 0)], store)
    assert outcome.applied == 1 and decode_state(state_of(store)).events_lifetime == 2


def test_a_corrupt_stored_state_is_reset_and_counted(processor):
    store = {b"u1": b"\x07 garbage"}
    outcome = run(processor, [message(view("u1", 1, NOW_MS - 1000), 0)], store)
    assert outcome.applied == 1
    assert processor.metrics.registry.get_sample_value("shoppulse_state_decode_errors_total") == 1
    assert decode_state(state_of(store)).user_id == "u1"


def test_state_bytes_round_trip(processor):
    store: dict[bytes, bytes] = {}
    run(processor, [message(view("u1", 1, NOW_MS - 1000), 0)], store)
    assert encode_state(decode_state(state_of(store))) == state_of(store)


def test_outputs_carry_a_keyed_pseudonym_when_configured(tmp_path):
    plain = BatchProcessor(
        TOPICS,
        StateConfig(),
        DEFAULT_FEATURE_SPEC,
        BatchScorer(DEFAULT_FEATURE_SPEC, tmp_path),
        DEFAULT_LIMITS,
        WorkerMetrics(),
    )
    hidden = BatchProcessor(
        TOPICS,
        StateConfig(),
        DEFAULT_FEATURE_SPEC,
        BatchScorer(DEFAULT_FEATURE_SPEC, tmp_path),
        DEFAULT_LIMITS,
        WorkerMetrics(),
        pseudonym_key=b"secret",
    )
    batch = [message(view("shopper-42", 1, NOW_MS - 1000), 0)]
    assert json.loads(run(plain, batch, {}).scored[0].result)["user_id"] == "shopper-42"
    store: dict[bytes, bytes] = {}
    scored = run(hidden, batch, store).scored[0]
    public = json.loads(scored.result)["user_id"]
    assert public != "shopper-42" and len(public) == 32 and scored.output_key == public.encode()
    assert b"shopper-42" in store  # tables keep the real id
    other_key = BatchProcessor(
        TOPICS,
        StateConfig(),
        DEFAULT_FEATURE_SPEC,
        BatchScorer(DEFAULT_FEATURE_SPEC, tmp_path),
        DEFAULT_LIMITS,
        WorkerMetrics(),
        pseudonym_key=b"another",
    )
    assert other_key.public_id("shopper-42") != public == hidden.public_id("shopper-42")
