"""Replay of real and recorded events: REES46, OTTO, our JSONL, time rebasing and pacing."""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from features.events import KIND_CART_ADD, KIND_ORDER, KIND_VIEW, Event, parse_event
from streams.sim.generator import GeneratedMessage, GeneratorConfig, ShopSimulator
from streams.sim.replay import (
    OTTO_ID_PREFIX,
    UNKNOWN_CATEGORY,
    events_to_messages,
    paced,
    read_jsonl,
    read_otto_jsonl,
    read_rees46_csv,
    rebase_times,
    write_jsonl,
)

DATA_DIR = (Path(__file__).resolve().parents[4] / ".." / "shared" / "data").resolve()
REES46_CSV = DATA_DIR / "rees46-sample" / "2019-Oct-sample.csv"
OTTO_JSONL = DATA_DIR / "otto-sample" / "train.jsonl"


def _require(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(
            f"shared sample {path} is missing: the real-data samples live in ../shared/data "
            "next to the repository (see its README.md)"
        )
    return path


def _assert_round_trips(events: list[Event]) -> None:
    now_ms = time.time_ns() // 1_000_000
    messages = list(events_to_messages(events))
    assert len(messages) == len(events)
    for event, message in zip(events, messages, strict=True):
        assert message.key == event.user_id.encode() and message.malformed_reason is None
        assert parse_event(message.topic_kind, message.key, message.value, now_ms) == event


def test_rees46_sample_parses_fully_into_valid_events() -> None:
    path = _require(REES46_CSV)
    with open(path, newline="", encoding="utf-8") as source:
        rows = list(csv.DictReader(source))
    events = list(read_rees46_csv(path))
    assert len(events) == len(rows)
    file_kinds = Counter(
        {"view": KIND_VIEW, "cart": KIND_CART_ADD, "purchase": KIND_ORDER}[row["event_type"]] for row in rows
    )
    assert Counter(event.kind for event in events) == file_kinds
    _assert_round_trips(events)
    assert events == list(read_rees46_csv(path)), "event ids are deterministic"
    assert len({event.event_id for event in events}) == len(events)
    for row, event in zip(rows, events, strict=True):
        assert event.user_id == row["user_id"] and event.session_id == row["user_session"]
        if event.kind == KIND_ORDER:
            assert event.order_lines[0].item_id == row["product_id"] and event.total == float(row["price"])
        else:
            assert event.category == (row["category_code"] or row["category_id"] or UNKNOWN_CATEGORY)
    assert events[0].ts_ms == 1_569_888_000_000  # 2019-10-01 00:00:00 UTC


def test_rees46_reports_the_line_of_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(
        "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
        "2019-10-01 00:00:00 UTC,view,1,2,,,1.0,3,s\n"
        "2019-10-01 00:00:01 CET,view,1,2,,,1.0,3,s\n"
    )
    with pytest.raises(ValueError, match=r"bad.csv:3: .*not in UTC"):
        list(read_rees46_csv(path))


def test_otto_sample_parses_fully_into_valid_events() -> None:
    path = _require(OTTO_JSONL)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    source_kinds = Counter(item["type"] for record in records for item in record["events"])
    order_groups = {
        (record["session"], item["ts"]) for record in records for item in record["events"] if item["type"] == "orders"
    }
    events = list(read_otto_jsonl(path))
    kinds = Counter(event.kind for event in events)
    assert kinds[KIND_VIEW] == source_kinds["clicks"] and kinds[KIND_CART_ADD] == source_kinds["carts"]
    orders = [event for event in events if event.kind == KIND_ORDER]
    assert len(orders) == len(order_groups)
    assert sum(line.quantity for order in orders for line in order.order_lines) == source_kinds["orders"]
    assert {event.user_id for event in events} == {f"{OTTO_ID_PREFIX}{record['session']}" for record in records}
    for user_id in {event.user_id for event in events}:
        stamps = [event.ts_ms for event in events if event.user_id == user_id]
        assert stamps == sorted(stamps)
    _assert_round_trips(events)


def test_jsonl_round_trip_keeps_every_byte(tmp_path: Path) -> None:
    messages = list(ShopSimulator(GeneratorConfig(seed=3, n_shoppers=100, malformed_fraction=0.3)).messages(2000))
    messages.append(GeneratedMessage("cart", b"\xffkey", b"\x00\xfe not utf-8", "bad_json"))
    path = tmp_path / "messages.jsonl"
    assert write_jsonl(messages, path) == len(messages)
    assert list(read_jsonl(path)) == messages
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert any("value_b64" in line for line in lines[:-1]), "the generator's non-UTF-8 bad JSON is base64"
    assert {"key_b64", "value_b64"} <= set(lines[-1])
    valid = next(line for line in lines if "malformed_reason" not in line)
    assert json.loads(valid["value"])["user_id"] == valid["key"], "valid values stay readable JSON text"


def test_rebase_keeps_the_gaps() -> None:
    events = sorted(read_otto_jsonl(_require(OTTO_JSONL)), key=lambda event: event.ts_ms)
    span_ms = events[-1].ts_ms - events[0].ts_ms
    now_ms = time.time_ns() // 1_000_000
    rebased = list(rebase_times(events, now_ms - span_ms))
    assert rebased[0].ts_ms == now_ms - span_ms and rebased[-1].ts_ms == now_ms
    assert [b.ts_ms - a.ts_ms for a, b in pairwise(rebased)] == [b.ts_ms - a.ts_ms for a, b in pairwise(events)]
    assert [dataclasses.replace(event, ts_ms=0) for event in rebased] == [
        dataclasses.replace(event, ts_ms=0) for event in events
    ]
    unsorted = list(read_otto_jsonl(OTTO_JSONL))
    shifted = list(rebase_times(unsorted, 0, origin_ms=events[0].ts_ms))
    assert min(event.ts_ms for event in shifted) == 0


def test_paced_replays_at_recorded_speed_times_speed() -> None:
    stamps = [1_000, 1_100, 1_200, 1_300, 1_400]  # ms: 400 ms recorded, 100 ms at speed 4
    started = time.monotonic()
    arrivals = [(stamp, time.monotonic() - started) for stamp in paced(stamps, lambda stamp: stamp, speed=4.0)]
    assert [stamp for stamp, _ in arrivals] == stamps
    for stamp, elapsed_s in arrivals:
        assert elapsed_s >= (stamp - 1_000) / 4_000 - 0.002
    assert arrivals[-1][1] < 0.3
    started = time.monotonic()
    assert list(paced(stamps, lambda stamp: stamp, speed=None)) == stamps
    assert time.monotonic() - started < 0.05
    with pytest.raises(ValueError, match="speed"):
        list(paced(stamps, lambda stamp: stamp, speed=0))
