"""Property-based tests: the validator and the state and alert-state encodings never let an
unexpected exception escape, whatever bytes arrive, and a state always survives its own encoding."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.encoding import StateDecodeError, decode_state, encode_state, last_event_ms_of
from features.events import (
    KIND_CART_ADD,
    KIND_CART_REMOVE,
    KIND_ORDER,
    KIND_VIEW,
    TOPIC_KINDS,
    Event,
    InvalidEvent,
    OrderLine,
    parse_event,
)
from features.state import ShopperState, StateConfig
from streams.worker.alerts import AlertState

NOW_MS = 1_760_000_000_000
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(10**300, 10**400)  # beyond float range
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=25,
)
field_names = st.sampled_from(
    [
        "event_id",
        "user_id",
        "session_id",
        "item_id",
        "category",
        "price",
        "ts",
        "action",
        "quantity",
        "order_id",
        "items",
        "total",
        "schema_version",
    ]
)


@FAST
@given(
    topic_kind=st.sampled_from(TOPIC_KINDS),
    key=st.none() | st.binary(max_size=40),
    value=st.none() | st.binary(max_size=400),
)
def test_random_bytes_are_rejected_with_a_reason_or_accepted(topic_kind, key, value):
    try:
        parse_event(topic_kind, key, value, NOW_MS)
    except InvalidEvent as exc:
        assert exc.reason and exc.detail


VALID = {
    "page_view": {
        "event_id": "e1",
        "user_id": "u1",
        "session_id": "s1",
        "item_id": "i1",
        "category": "toys",
        "price": 9.5,
        "ts": NOW_MS - 1000,
    },
    "cart": {
        "event_id": "e2",
        "user_id": "u1",
        "session_id": "s1",
        "item_id": "i1",
        "action": "add",
        "quantity": 1,
        "price": 9.5,
        "ts": NOW_MS - 1000,
    },
    "order": {
        "event_id": "e3",
        "user_id": "u1",
        "order_id": "o1",
        "items": [{"item_id": "i1", "quantity": 1, "price": 9.5}],
        "total": 9.5,
        "ts": NOW_MS - 1000,
    },
}


@FAST
@given(
    topic_kind=st.sampled_from(TOPIC_KINDS),
    changes=st.dictionaries(field_names, json_values, min_size=1, max_size=3),
    drop=st.sets(field_names, max_size=2),
)
def test_near_miss_documents_never_escape_as_another_exception(topic_kind, changes, drop):
    """A valid event with a few fields replaced by arbitrary JSON (huge ints, NaN, nesting) or removed."""
    doc = {**VALID[topic_kind], **changes}
    for name in drop:
        doc.pop(name, None)
    user = doc.get("user_id")
    key = user.encode("utf-8", "surrogatepass") if isinstance(user, str) else b"u1"
    try:
        event = parse_event(topic_kind, key, json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass"), NOW_MS)
    except InvalidEvent:
        return
    assert event.user_id.encode() == key and event.ts_ms <= NOW_MS + 300_000


@FAST
@given(data=st.binary(max_size=600))
def test_random_bytes_never_decode_into_anything_but_a_state_decode_error(data):
    try:
        decode_state(data)
    except StateDecodeError:
        pass


kinds = st.sampled_from([KIND_VIEW, KIND_CART_ADD, KIND_CART_REMOVE, KIND_ORDER])


@st.composite
def event_streams(draw) -> list[Event]:
    events, ts = [], NOW_MS - 40 * 86_400_000
    for n in range(draw(st.integers(1, 120))):
        ts += draw(st.integers(-3_600_000, 2 * 86_400_000))  # some out of order, some late
        kind = draw(kinds)
        item = f"i{draw(st.integers(0, 30))}"
        event_id = f"e{draw(st.integers(0, n))}"  # repeats: duplicates
        if kind == KIND_ORDER:
            lines = (OrderLine(item, draw(st.integers(1, 5)), draw(st.floats(0, 500))),)
            events.append(
                Event(
                    kind,
                    event_id,
                    "u1",
                    ts,
                    order_id=f"o{n}",
                    order_lines=lines,
                    total=sum(line.price * line.quantity for line in lines),
                )
            )
        else:
            events.append(
                Event(
                    kind,
                    event_id,
                    "u1",
                    ts,
                    session_id="s",
                    item_id=item,
                    category=f"c{draw(st.integers(0, 8))}",
                    price=draw(st.floats(0, 500)),
                    quantity=draw(st.integers(1, 5)),
                )
            )
    return events


@FAST
@given(events=event_streams())
def test_decode_of_encode_is_the_state(events):
    state = ShopperState.new("u1")
    for event in events:
        state.update(event, StateConfig())
        assert decode_state(encode_state(state)) == state


numbers = (
    st.integers()
    | st.integers(10**300, 10**400)
    | st.integers(-(10**400), -(10**300))
    | st.floats(allow_nan=True, allow_infinity=True)
)


@FAST
@given(
    topic_kind=st.sampled_from(TOPIC_KINDS),
    name=st.sampled_from(["price", "total", "quantity", "ts", "schema_version"]),
    value=numbers,
)
def test_extreme_numbers_are_rejected_with_a_reason_or_accepted(topic_kind, name, value):
    doc = {**VALID[topic_kind], name: value}
    try:
        parse_event(topic_kind, b"u1", json.dumps(doc, allow_nan=True).encode(), NOW_MS)
    except InvalidEvent as exc:
        assert exc.reason


@FAST
@given(events=event_streams(), cut=st.integers(0, 10_000), flip=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_damaged_encodings_raise_only_state_decode_errors(events, cut, flip, bit):
    """Near misses get further into the decoder than random bytes: a real state, truncated or with
    one bit flipped, must either decode or raise StateDecodeError, in both readers the worker uses."""
    state = ShopperState.new("u1")
    for event in events:
        state.update(event, StateConfig())
    raw = encode_state(state)
    flipped = bytearray(raw)
    flipped[flip % len(raw)] ^= 1 << bit
    for damaged in (raw[: cut % len(raw)], bytes(flipped)):
        for reader in (decode_state, last_event_ms_of):
            try:
                reader(damaged)
            except StateDecodeError:
                pass


@FAST
@given(armed=st.booleans(), last_alert_ms=st.integers(-(2**63), 2**63 - 1), last_risk=st.floats(0, 1, width=32))
def test_alert_state_survives_its_encoding(armed, last_alert_ms, last_risk):
    """Risks are probabilities from float32 model outputs, which the alert state stores exactly."""
    state = AlertState(armed, last_alert_ms, last_risk)
    assert AlertState.decode(state.encode()) == state


@FAST
@given(data=st.binary(max_size=64))
def test_random_bytes_never_decode_into_anything_but_a_value_error_for_alert_state(data):
    try:
        AlertState.decode(data)
    except ValueError:
        pass
