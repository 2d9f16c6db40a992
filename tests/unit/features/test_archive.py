"""The Parquet archive's file format: atomic parts, resume positions from file names, retention,
reading back exactly what was written (and nothing twice)."""

from __future__ import annotations

import dataclasses
import time
from itertools import islice
from pathlib import Path

import pyarrow.parquet as pq

from features.archive import (
    DAY_MS,
    SCHEMA,
    ArchiveMessages,
    PartBuffer,
    PartName,
    apply_retention,
    archive_messages,
    archived_until,
    part_files,
    remove_temp_files,
    utc_date,
    write_part,
)
from features.events import InvalidEvent, parse_event
from streams.sim.generator import GeneratorConfig, ShopSimulator

NOW_MS = int(time.time() * 1000)


def messages(count: int, malformed_fraction: float = 0.0, seed: int = 5):
    config = GeneratorConfig(seed=seed, n_shoppers=30, malformed_fraction=malformed_fraction, duration_days=3.0)
    simulator = ShopSimulator(dataclasses.replace(config, start_ms=NOW_MS - config.span_ms))
    return list(islice(simulator.messages(), count))


def fill(buffer: PartBuffer, batch, first_offset: int) -> int:
    """Add ``batch`` at consecutive offsets; returns how many were valid."""
    valid = 0
    for i, m in enumerate(batch):
        try:
            event = parse_event(m.topic_kind, m.key, m.value, NOW_MS)
        except InvalidEvent:
            event = None
        buffer.add(first_offset + i, NOW_MS, m.topic_kind, m.key, m.value, event)
        valid += event is not None
    return valid


def test_a_part_holds_the_valid_events_of_its_offset_range_and_reads_back_byte_for_byte(tmp_path: Path) -> None:
    batch = messages(300, malformed_fraction=0.1)
    buffer = PartBuffer("shop.cart", 2, utc_date(NOW_MS), 100)
    valid = fill(buffer, batch, 100)
    assert 0 < valid < len(batch), "the batch must mix valid and invalid messages"
    path = write_part(tmp_path, buffer)
    assert path is not None and path.name == "part-shop.cart-2-100-399.parquet"
    assert path.parent.name == f"date={utc_date(NOW_MS)}"
    table = pq.read_table(path)
    assert table.schema.equals(SCHEMA)
    assert table.num_rows == valid
    assert table.column("offset").to_pylist() == sorted(table.column("offset").to_pylist())
    expected = [(m.topic_kind, m.key, m.value) for m in batch if m.malformed_reason is None]
    read = ArchiveMessages()
    assert list(archive_messages(tmp_path, read=read)) == expected
    assert (read.parts, read.rows, read.overlapping_parts) == (1, valid, [])
    assert PartName.parse(path) == PartName("shop.cart", 2, 100, 399, utc_date(NOW_MS))


def test_a_buffer_of_invalid_messages_only_writes_no_file(tmp_path: Path) -> None:
    buffer = PartBuffer("shop.orders", 0, utc_date(NOW_MS), 7)
    buffer.add(7, NOW_MS, "order", b"u1", b"not json", None)
    assert write_part(tmp_path, buffer) is None
    assert part_files(tmp_path) == []
    assert buffer.last_offset == 7, "the range still advances, so the commit skips the invalid message"


def test_a_half_written_temp_file_is_invisible_and_removed_for_its_partition_only(tmp_path: Path) -> None:
    """A crash before the rename leaves only a dot-named temp file: readers and the resume position ignore it."""
    buffer = PartBuffer("shop.page_views", 1, utc_date(NOW_MS), 0)
    fill(buffer, messages(50), 0)
    written = write_part(tmp_path, buffer)
    assert written is not None
    folder = written.parent
    torn = folder / ".part-shop.page_views-1-50-99.parquet.tmp-4242"
    torn.write_bytes(written.read_bytes()[:200])  # a torn write
    other = folder / ".part-shop.page_views-3-0-9.parquet.tmp-4243"
    other.write_bytes(b"another partition's write in progress")
    assert [p for _, p in part_files(tmp_path)] == [written]
    assert archived_until(tmp_path, "shop.page_views") == {1: 49}
    assert len(list(archive_messages(tmp_path))) == len(buffer)
    assert remove_temp_files(tmp_path, "shop.page_views", 1) == 1
    assert not torn.exists() and other.exists()


def test_after_a_crash_between_rename_and_commit_the_files_say_where_to_resume(tmp_path: Path) -> None:
    """The committed offset lags the files; resuming after the highest archived offset (what the
    archiver does) and re-writing the next range archives every message once."""
    batch = messages(400)
    first = PartBuffer("shop.cart", 0, utc_date(NOW_MS), 0)
    fill(first, batch[:150], 0)
    write_part(tmp_path, first)  # renamed; the commit of 150 never happened (crash)
    resume = archived_until(tmp_path, "shop.cart")[0] + 1
    assert resume == 150
    second = PartBuffer("shop.cart", 0, utc_date(NOW_MS), resume)
    fill(second, batch[resume:], resume)
    write_part(tmp_path, second)
    read = [value for _, _, value in archive_messages(tmp_path)]
    assert read == [m.value for m in batch]
    # Re-writing the same range after a crash before its commit replaces the file: no second copy.
    again = PartBuffer("shop.cart", 0, utc_date(NOW_MS), resume)
    fill(again, batch[resume:], resume)
    write_part(tmp_path, again)
    assert [value for _, _, value in archive_messages(tmp_path)] == read


def test_an_overlapping_part_is_reported_and_not_read_twice(tmp_path: Path) -> None:
    batch = messages(100)
    whole = PartBuffer("shop.cart", 0, utc_date(NOW_MS), 0)
    fill(whole, batch, 0)
    write_part(tmp_path, whole)
    inner = PartBuffer("shop.cart", 0, utc_date(NOW_MS), 10)
    fill(inner, batch[10:20], 10)
    write_part(tmp_path, inner)
    read = ArchiveMessages()
    assert len(list(archive_messages(tmp_path, read=read))) == len(whole)
    assert len(read.overlapping_parts) == 1 and "part-shop.cart-0-10-19" in read.overlapping_parts[0]


def test_a_since_bound_selects_by_event_time(tmp_path: Path) -> None:
    batch = messages(500)
    buffer = PartBuffer("shop.page_views", 0, utc_date(NOW_MS), 0)
    fill(buffer, batch, 0)
    write_part(tmp_path, buffer)
    times = [parse_event(m.topic_kind, m.key, m.value, NOW_MS).ts_ms for m in batch]
    since = sorted(times)[100]
    got = [parse_event(k, key, v, NOW_MS).ts_ms for k, key, v in archive_messages(tmp_path, since)]
    assert got == [t for t in times if t >= since]


def test_retention_deletes_whole_dates_older_than_the_setting(tmp_path: Path) -> None:
    for days_ago in (0, 1, 5, 6, 30):
        buffer = PartBuffer("shop.orders", 0, utc_date(NOW_MS - days_ago * DAY_MS), days_ago * 1000)
        fill(buffer, messages(5, seed=days_ago), days_ago * 1000)
        write_part(tmp_path, buffer)
    assert apply_retention(tmp_path, 0, NOW_MS) == []
    removed = apply_retention(tmp_path, 5, NOW_MS)
    assert removed == sorted(utc_date(NOW_MS - d * DAY_MS) for d in (6, 30))
    assert sorted({name.date for name, _ in part_files(tmp_path)}) == sorted(
        utc_date(NOW_MS - d * DAY_MS) for d in (0, 1, 5)
    )


def test_events_come_back_in_arrival_order_per_partition_across_the_topics(tmp_path: Path) -> None:
    """One shopper's page views and cart changes share a partition number: read back merged by
    arrival (Kafka timestamp), each topic partition in offset order, as the worker meets them."""
    batch = [m for m in messages(200) if m.malformed_reason is None][:60]
    arrivals = {m.value: NOW_MS - 60_000 + i * 1000 for i, m in enumerate(batch)}
    for topic in ("shop.page_views", "shop.cart"):
        mine = [m for i, m in enumerate(batch) if (i % 3 == 0) == (topic == "shop.cart")]
        buffer = PartBuffer(topic, 0, utc_date(NOW_MS), 0)
        for offset, m in enumerate(mine):
            event = parse_event(m.topic_kind, m.key, m.value, NOW_MS)
            buffer.add(offset, arrivals[m.value], m.topic_kind, m.key, m.value, event)
        write_part(tmp_path, buffer)
    assert [value for _, _, value in archive_messages(tmp_path)] == [m.value for m in batch]
