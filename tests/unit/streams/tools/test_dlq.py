"""The dead-letter replay's selection and planning (streams/tools/dlq.py), on dead letters made by the
worker's own :meth:`DeadLetter.record`, so the reader stays tied to the headers the worker writes."""

from __future__ import annotations

import argparse
import json

import pytest

from streams.tools.dlq import (
    TIME_EVENT,
    Selection,
    StoredDeadLetter,
    parse_time_ms,
    plan_replay,
)
from streams.worker.pipeline import DEAD_LETTER_FRAMING_BYTES, DeadLetter, InputMessage

FAILED_AT_MS = 1_764_700_000_000


def stored(
    reason: str = "oversized",
    topic: str = "shop.page_views",
    value: bytes | None = b'{"ts": 5}',
    offset: int = 0,
    failed_at_ms: int = FAILED_AT_MS,
    max_message_bytes: int = 1 << 20,
) -> StoredDeadLetter:
    """A dead letter as the worker writes it (value and headers), read back at dead-letter offset ``offset``."""
    source = InputMessage(topic, 2, 100 + offset, b"u-1", value)
    record_value, headers = DeadLetter(source, reason, "why").record(failed_at_ms, max_message_bytes)
    parsed = StoredDeadLetter.parse("dlq", 1, offset, source.key, record_value, headers)
    assert parsed is not None
    return parsed


def test_headers_of_the_worker_are_read_back():
    dead = stored(reason="ts_in_future", offset=7)
    assert (dead.reason, dead.source_topic, dead.source_partition, dead.source_offset, dead.failed_at_ms) == (
        "ts_in_future",
        "shop.page_views",
        2,
        107,
        FAILED_AT_MS,
    )
    assert dead.ref == "dlq:1:7" and dead.source == "shop.page_views[2]@107"
    assert dead.truncated_from is None and dead.key == b"u-1" and dead.value == b'{"ts": 5}'


def test_a_cut_value_is_marked_with_its_original_length():
    value = json.dumps({"ts": 1, "pad": "x" * 5000}).encode()
    dead = stored(value=value, max_message_bytes=DEAD_LETTER_FRAMING_BYTES + 1000)
    assert dead.truncated_from == len(value) and len(dead.value or b"") < len(value)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("shoppulse.dlq.reason", b"bad_json")],
        [
            ("shoppulse.dlq.reason", b"x"),
            ("shoppulse.dlq.source_topic", b"t"),
            ("shoppulse.dlq.source_partition", b"zero"),
            ("shoppulse.dlq.source_offset", b"1"),
            ("shoppulse.dlq.failed_at_ms", b"2"),
        ],
    ],
    ids=["none", "reason-only", "partition-not-a-number"],
)
def test_a_message_without_the_worker_headers_is_not_a_dead_letter(headers):
    assert StoredDeadLetter.parse("dlq", 0, 0, b"k", b"v", headers) is None


def test_the_filters_all_have_to_match():
    a = stored("oversized", "shop.page_views", offset=0, failed_at_ms=1000)
    b = stored("bad_json", "shop.page_views", offset=1, failed_at_ms=2000)
    c = stored("oversized", "shop.orders", offset=2, failed_at_ms=3000)
    everything = [a, b, c]

    def chosen(selection: Selection) -> list[int]:
        return [d.offset for d in everything if selection.matches(d)]

    assert chosen(Selection()) == [0, 1, 2]
    assert chosen(Selection(reasons=("oversized",))) == [0, 2]
    assert chosen(Selection(source_topics=("shop.orders", "shop.cart"))) == [2]
    assert chosen(Selection(since_ms=2000)) == [1, 2], "since is inclusive"
    assert chosen(Selection(until_ms=2000)) == [0], "until is exclusive"
    assert chosen(Selection(reasons=("oversized",), since_ms=1500, until_ms=5000)) == [2]


def test_the_event_time_filter_reads_ts_and_never_matches_without_one():
    with_ts = stored(value=b'{"ts": 1500, "user_id": "u-1"}', offset=0)
    float_ts = stored(value=b'{"ts": 1500.0}', offset=1)
    not_json = stored(value=b"\xff\xfe", offset=2)
    no_value = stored(value=None, offset=3)
    window = Selection(since_ms=1000, until_ms=2000, time=TIME_EVENT)
    assert [d.offset for d in (with_ts, float_ts, not_json, no_value) if window.matches(d)] == [0]
    assert not Selection(since_ms=1501, time=TIME_EVENT).matches(with_ts)
    assert Selection(time=TIME_EVENT).matches(not_json), "without a range the time is not looked at"


def test_the_plan_skips_replayed_and_cut_dead_letters_and_says_why():
    fresh = stored(offset=0)
    replayed = stored(offset=1)
    cut = stored(
        value=json.dumps({"ts": 1, "pad": "x" * 5000}).encode(),
        offset=2,
        max_message_bytes=DEAD_LETTER_FRAMING_BYTES + 1000,
    )
    other = stored(reason="bad_json", offset=3)
    plan = plan_replay(
        [fresh, replayed, cut, other, None], Selection(reasons=("oversized",)), replayed_refs={replayed.ref, "dlq:9:9"}
    )
    assert plan.to_send == [fresh] and plan.already_replayed == [replayed] and plan.truncated == [cut]
    assert (plan.not_selected, plan.not_ours) == (1, 1)


def test_times_are_epoch_ms_or_iso_8601_in_utc_unless_zoned():
    assert parse_time_ms("1764700000000") == 1_764_700_000_000
    assert parse_time_ms("2026-12-03T11:00:00Z") == parse_time_ms("2026-12-03T11:00:00") == 1_796_295_600_000
    assert parse_time_ms("2026-12-03T12:00:00+01:00") == 1_796_295_600_000
    with pytest.raises(argparse.ArgumentTypeError, match="ISO 8601"):
        parse_time_ms("yesterday")
