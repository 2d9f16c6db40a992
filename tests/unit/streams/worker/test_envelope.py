"""The stored value: state, alert state and applied input offsets as one value."""

from __future__ import annotations

import pytest

from features.encoding import encode_state
from features.state import ShopperState
from models.outcomes import LiveMemory
from streams.worker.alerts import AlertState
from streams.worker.envelope import ENVELOPE_MAGIC, EnvelopeDecodeError, Stored, offsets_section


def sample() -> Stored:
    return Stored(
        state=encode_state(ShopperState.new("u1")),
        alert=AlertState(False, 123, 0.9).encode(),
        offsets={("shop.page_views", 3): 41, ("shop.cart", 3): 0, ("shop.orders", 3): 7_000_000_000},
    )


def test_round_trip_and_equal_contents_give_equal_bytes():
    stored = sample()
    data = stored.encode()
    assert data[0] == ENVELOPE_MAGIC and Stored.decode(data) == stored
    reordered = Stored(stored.state, stored.alert, dict(reversed(list(stored.offsets.items()))))
    assert reordered.encode() == data


def test_no_alert_state_and_no_offsets():
    stored = Stored(state=encode_state(ShopperState.new("u1")))
    assert Stored.decode(stored.encode()) == stored


def test_a_bare_state_of_an_older_release_reads_without_offsets():
    bare = encode_state(ShopperState.new("u1"))
    assert Stored.decode(bare) == Stored(state=bare)
    assert Stored.decode(None) == Stored()


def test_the_skip_rule():
    stored = sample()
    assert stored.applied("shop.page_views", 3, 41) and stored.applied("shop.page_views", 3, 0)
    assert not stored.applied("shop.page_views", 3, 42)
    assert not stored.applied("renamed.page_views", 3, 0)  # another topic: nothing of it applied
    assert not stored.applied("shop.page_views", 1, 0)  # another partition (a producer's wrong partitioner)


def test_truncated_envelopes_raise_their_own_error():
    data = sample().encode()
    state = sample().state
    assert state is not None
    header_end = len(data) - len(state)
    for cut in range(1, header_end):
        with pytest.raises(EnvelopeDecodeError):
            Stored.decode(data[:cut])


def test_a_state_cannot_be_missing_from_an_envelope():
    with pytest.raises(ValueError):
        Stored(offsets={("t", 0): 1}).encode()


def test_the_offsets_section_tells_state_versions_apart_without_decoding():
    value = Stored(b"\x01state", None, {("shop.cart", 2): 41, ("shop.orders", 2): 7})
    same = Stored(b"\x01other state", b"", {("shop.orders", 2): 7, ("shop.cart", 2): 41})
    later = Stored(b"\x01state", None, {("shop.cart", 2): 42, ("shop.orders", 2): 7})
    assert offsets_section(value.encode()) == offsets_section(same.encode()) != b""
    assert offsets_section(later.encode()) != offsets_section(value.encode())
    assert offsets_section(b"\x01a bare state") == b"" == offsets_section(b"")
    assert offsets_section(value.encode()[:9]) == value.encode()[3:9]  # truncated: no IndexError


def test_the_live_memory_round_trips_and_a_version_1_value_reads_without_one():
    stored = sample()
    stored.memory = LiveMemory(score_seq=7, scored_ms=123, tail_item=9).encode()
    assert Stored.decode(stored.encode()) == stored
    # a version 1 value (before the live memory): the same bytes without the u16 memory length
    stored.memory = None
    v2 = stored.encode()
    state = stored.state
    assert state is not None and v2[1] == 2
    head = len(v2) - len(state) - 2
    assert v2[head : head + 2] == b"\x00\x00"
    v1 = v2[:1] + b"\x01" + v2[2:head] + v2[head + 2 :]
    assert Stored.decode(v1) == stored
    assert Stored.decode(v1).encode() == v2  # written back as version 2


def test_an_unknown_envelope_version_raises():
    data = bytearray(sample().encode())
    data[1] = 3
    with pytest.raises(EnvelopeDecodeError):
        Stored.decode(bytes(data))
