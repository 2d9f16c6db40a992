"""The pipeline's erasure step and trace context, without a broker: real states, real scorer."""

from __future__ import annotations

import json

import pytest

from features.encoding import decode_state
from features.events import DEFAULT_LIMITS, ErasureRequest, InvalidEvent, erasure_request_to_dict, parse_erasure_request
from features.state import ShopperState, StateConfig
from streams.config import Settings
from streams.tools.forget import erasure_messages
from streams.worker.alerts import AlertState
from streams.worker.envelope import Stored
from streams.worker.pipeline import BatchProcessor, InputMessage, offsets_committed, trace_headers
from tests.unit.streams.worker.test_pipeline import NOW_MS, make_processor, message, run, state_of, view

ERASURES = "erasure_requests"
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def processor(tmp_path) -> BatchProcessor:
    return make_processor(tmp_path, erasure_topic=ERASURES)


def forget(user: str, offset: int, ts: int = NOW_MS, request_id: str = "r1", key: bytes | None = None) -> InputMessage:
    doc = erasure_request_to_dict(ErasureRequest(request_id, user, ts))
    return InputMessage(ERASURES, 0, offset, user.encode() if key is None else key, json.dumps(doc).encode())


def sample(processor, name: str, **labels: str) -> float:
    return processor.metrics.registry.get_sample_value(name, labels) or 0.0


def confirmation(outcome, index: int = 0) -> dict:
    return json.loads(outcome.erasures[index].confirmation)


def replayed_from_scratch(events) -> ShopperState:
    state = ShopperState.new(events[0].user_id)
    for event in events:
        state.update(event, StateConfig())
    return state


def test_an_erasure_of_committed_events_is_a_tombstone_with_a_confirmation(processor):
    store: dict[bytes, bytes] = {}
    run(processor, [message(view("u1", n, NOW_MS - 5000 + n), n) for n in range(3)], store)
    run(processor, [message(view("u2", 1, NOW_MS - 4000), 3)], store)
    held = Stored.decode(store[b"u1"])
    held.alert = AlertState(False, NOW_MS - 60_000, 0.9).encode()  # as a churn model's scoring leaves it
    store[b"u1"] = held.encode()
    outcome = run(processor, [forget("u1", 0)], store, committed={("views", 0): 4})
    assert [(w.key, w.value) for w in outcome.writes] == [(b"u1", None)], "a tombstone, nothing else written"
    assert b"u1" not in store and b"u2" in store
    assert outcome.scored == [] and outcome.dead_letters == []
    doc = confirmation(outcome)
    assert doc == {
        "schema_version": 1,
        "request_id": "r1",
        "user_id": "u1",
        "requested_at": NOW_MS,
        "erased_at": NOW_MS,
        "found": True,
        "store": "shopper_state",
        "deleted": ["state", "alert", "memory"],
    }
    assert outcome.erasures[0].output_key == b"u1"
    assert sample(processor, "shoppulse_erasures_total", outcome="deleted") == 1
    assert sample(processor, "shoppulse_events_consumed_total", topic=ERASURES) == 1


def test_an_unknown_shopper_is_confirmed_with_nothing_found(processor):
    store: dict[bytes, bytes] = {}
    outcome = run(processor, [forget("nobody", 0)], store)
    assert confirmation(outcome)["found"] is False and confirmation(outcome)["deleted"] == []
    assert store == {}, "no value is created for a shopper the worker never held"
    assert sample(processor, "shoppulse_erasures_total", outcome="nothing_found") == 1


def test_events_after_the_request_start_afresh_and_earlier_ones_are_erased(processor):
    store: dict[bytes, bytes] = {}
    before = [view("u1", n, NOW_MS - 5000 + n) for n in range(3)]
    after = [view("u1", 10 + n, NOW_MS - 1000 + n) for n in range(2)]
    batch = [message(e, i) for i, e in enumerate(after + before)]  # arrival order is not event-time order
    outcome = run(processor, [*batch, forget("u1", 0, ts=NOW_MS - 2000)], store)
    assert confirmation(outcome)["deleted"] == ["state"], "the earlier events were held when the request came"
    assert [s.user_id for s in outcome.scored] == ["u1"], "scored once, on its fresh state"
    assert json.loads(outcome.scored[0].result)["trigger_event_id"] == "u1-e11"
    assert decode_state(state_of(store)) == replayed_from_scratch(after)
    assert Stored.decode(store[b"u1"]).offsets == {("views", 0): 4, (ERASURES, 0): 0}


def test_uncommitted_erased_events_leave_a_marker_that_a_reordered_replay_cannot_undo(processor):
    store: dict[bytes, bytes] = {}
    events = [view("u1", n, NOW_MS - 5000 + n) for n in range(3)]
    run(processor, [message(e, n) for n, e in enumerate(events)], store)
    outcome = run(processor, [forget("u1", 0)], store, committed={})  # the events are not committed yet
    marker = Stored.decode(store[b"u1"])
    assert marker.alert is None and decode_state(state_of(store)).last_event_ms == 0, "nothing of the shopper is kept"
    assert marker.offsets == {("views", 0): 2, (ERASURES, 0): 0}
    assert outcome.scored == []
    # A crash before the commit: the events come again, after the request this time (Kafka orders no two topics).
    replay = run(processor, [message(e, n) for n, e in enumerate(events)], store)
    assert replay.replayed == 3 and replay.applied == 0 and replay.scored == [], "no output for an erased shopper"
    assert decode_state(state_of(store)).last_event_ms == 0, "the erased events stay erased"
    # The request itself again: nothing to erase, confirmed again.
    again = run(processor, [forget("u1", 0)], store, committed={("views", 0): 3})
    assert confirmation(again)["found"] is False
    # A new event starts afresh.
    new = view("u1", 99, NOW_MS - 100)
    fresh = run(processor, [message(new, 3)], store)
    assert [s.user_id for s in fresh.scored] == ["u1"]
    assert decode_state(state_of(store)) == replayed_from_scratch([new])


def test_a_replayed_request_does_not_erase_what_came_after_it(processor):
    store: dict[bytes, bytes] = {}
    old = view("u1", 1, NOW_MS - 5000)
    new = view("u1", 2, NOW_MS - 1000)
    run(processor, [message(old, 0), forget("u1", 0, ts=NOW_MS - 2000), message(new, 1)], store)
    kept = decode_state(state_of(store))
    assert kept == replayed_from_scratch([new])
    # The same batch consumed again after a crash, cut differently: the request first, alone.
    outcome = run(processor, [forget("u1", 0, ts=NOW_MS - 2000)], store)
    assert confirmation(outcome)["deleted"] == []
    assert decode_state(state_of(store)) == kept
    run(processor, [message(old, 0), message(new, 1)], store)
    assert decode_state(state_of(store)) == kept


def test_an_erased_shopper_is_not_rescored_by_the_silent_sweep(processor):
    store: dict[bytes, bytes] = {}
    run(processor, [message(view("u1", 1, NOW_MS - 5000), 0)], store)
    run(processor, [forget("u1", 0)], store)  # uncommitted: a marker stays for now
    outcome = processor.rescore_silent([(0, b"u1", store[b"u1"])], NOW_MS + 10 * 86_400_000)
    assert all(s.alert is None for s in outcome.scored)
    # The sweep selects by idleness: a marker (no events) is idle forever, past retention, never "silent".
    from streams.worker.sweeps import idle_since_ms

    assert idle_since_ms(store[b"u1"], NOW_MS) > StateConfig().retention_ms


def test_the_confirmation_carries_the_pseudonym_when_configured(tmp_path):
    processor = make_processor(tmp_path, erasure_topic=ERASURES, pseudonym_key=b"secret")
    store: dict[bytes, bytes] = {}
    run(processor, [message(view("u1", 1, NOW_MS - 5000), 0)], store)
    outcome = run(processor, [forget("u1", 0)], store, committed={("views", 0): 1})
    public = processor.public_id("u1")
    assert public != "u1" and confirmation(outcome)["user_id"] == public
    assert outcome.erasures[0].output_key == public.encode()
    assert b"u1" not in outcome.erasures[0].confirmation


@pytest.mark.parametrize(
    ("request_message", "reason"),
    [
        (forget("u1", 0, key=b"u2"), "wrong_key"),
        (forget("u1\n", 0), "unsafe_id"),
        (forget("u1", 0, request_id=""), "bad_value"),
        (InputMessage(ERASURES, 0, 0, b"u1", b"forget u1"), "bad_json"),
        (InputMessage(ERASURES, 0, 0, b"u1", None), "bad_json"),
        (InputMessage(ERASURES, 0, 0, b"u1", b'{"request_id":"r","user_id":"u1"}'), "missing_field"),
    ],
)
def test_invalid_requests_are_dead_lettered_and_erase_nothing(processor, request_message, reason):
    store: dict[bytes, bytes] = {}
    run(processor, [message(view("u1", 1, NOW_MS - 5000), 0)], store)
    before = dict(store)
    outcome = run(processor, [request_message], store, committed={("views", 0): 1})
    assert [d.reason for d in outcome.dead_letters] == [reason]
    assert outcome.dead_letters[0].message is request_message
    assert outcome.erasures == [] and store == before


def test_forget_builds_requests_the_worker_accepts_and_refuses_what_it_would_dead_letter():
    settings = Settings.from_env({})
    messages = erasure_messages(["u1", "ü-2"], NOW_MS, settings)
    assert [m.key for m in messages] == [b"u1", "ü-2".encode()]
    requests = [parse_erasure_request(m.key, m.value, NOW_MS, DEFAULT_LIMITS) for m in messages]
    assert [r.user_id for r in requests] == ["u1", "ü-2"] and len({r.request_id for r in requests}) == 2
    with pytest.raises(InvalidEvent) as refused:
        erasure_messages(["ok", "bad\tid"], NOW_MS, settings)
    assert refused.value.reason == "unsafe_id"


def test_offsets_count_as_committed_only_below_the_committed_offset():
    offsets = {("views", 0): 5, ("cart", 0): 2, (ERASURES, 0): 9}
    assert offsets_committed(offsets, lambda t, p: {"views": 6, "cart": 3}.get(t), skip_topic=ERASURES)
    assert not offsets_committed(offsets, lambda t, p: {"views": 5, "cart": 3}.get(t), skip_topic=ERASURES)
    assert not offsets_committed(offsets, lambda t, p: {"views": 6}.get(t), skip_topic=ERASURES)
    assert not offsets_committed(offsets, None, skip_topic=ERASURES)
    assert offsets_committed({(ERASURES, 0): 9}, None, skip_topic=ERASURES)


# --------------------------------------------------------------------------- trace context


def traced(event, offset: int, headers) -> InputMessage:
    m = message(event, offset)
    m.headers = headers
    return m


def test_the_trigger_events_trace_context_is_kept_for_its_outputs(tmp_path):
    """The newest event by event time triggers the scoring; the publisher puts its headers on the
    score, recommendations and churn alert (tests/integration/test_erasure.py reads them back)."""
    processor = make_processor(tmp_path, erasure_topic=ERASURES)
    older = traced(view("u1", 1, NOW_MS - 5000), 0, [("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-00")])
    newest = traced(view("u1", 2, NOW_MS - 1000), 1, [("traceparent", TRACEPARENT), ("tracestate", b"vendor=abc")])
    outcome = run(processor, [newest, older], {})  # arrival order differs from event time
    (shopper,) = outcome.scored
    assert shopper.headers == [("traceparent", TRACEPARENT), ("tracestate", b"vendor=abc")]


def test_a_malformed_traceparent_is_counted_and_the_event_scored_without_it(processor):
    bad = traced(view("u1", 1, NOW_MS - 1000), 0, [("traceparent", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01")])
    outcome = run(processor, [bad], {})
    assert outcome.applied == 1 and outcome.dead_letters == []
    assert outcome.scored[0].headers is None
    assert sample(processor, "shoppulse_trace_context_invalid_total") == 1


def test_no_trace_context_no_headers(processor):
    outcome = run(processor, [traced(view("u1", 1, NOW_MS - 1000), 0, [("other", b"x")])], {})
    assert outcome.scored[0].headers is None
    assert sample(processor, "shoppulse_trace_context_invalid_total") == 0


@pytest.mark.parametrize(
    "value",
    [
        b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # another version
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
        b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",  # short flags
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        b" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"",
        None,
    ],
)
def test_malformed_traceparents_are_refused(value):
    with pytest.raises(ValueError):
        trace_headers([("traceparent", value)])


def test_tracestate_is_carried_only_with_a_valid_traceparent_and_when_printable():
    assert trace_headers([("tracestate", b"a=b")]) is None
    assert trace_headers([("traceparent", TRACEPARENT), ("tracestate", b"a=b\nc")]) == [("traceparent", TRACEPARENT)]
    assert trace_headers([("TraceParent", TRACEPARENT), ("tracestate", b"x" * 513)]) == [("traceparent", TRACEPARENT)]
