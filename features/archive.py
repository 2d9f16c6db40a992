"""The event archive: validated input events in date-partitioned Parquet files (``shoppulse archive``
writes it, ``shoppulse train --archive`` and ``shoppulse retrain`` read it; warehouse tools read it too).

Layout::

    DIR/date=YYYY-MM-DD/part-<topic>-<partition>-<first offset>-<last offset>.parquet

One file holds the valid events of one contiguous range of offsets of one topic partition (the
range counts the invalid messages in it too, which are skipped: the worker dead-letters them), in
offset order. The date is the UTC date the events ARRIVED (the Kafka timestamp of the range's
first message), not their event time: a range then never has to be split across dates, so every
file is one whole range and the highest ``last offset`` in the file names is exactly how far the
archive got (:func:`archived_until`). That is what makes a restart exact: a crash after a file's
rename but before the consumer commit resumes after the file, never doubling it.

Files appear atomically: written under a dot-name in the same folder, fsynced, renamed, folder
fsynced (:func:`write_part`); readers skip dot-names. Every row keeps the message's original key
and value bytes, so :func:`read_archive` re-validates them with :func:`features.events.parse_event`
(the worker's validator, exactly what the JSONL reader does), next to typed columns for other
tools. pyarrow only; no Kafka.
"""

from __future__ import annotations

import datetime as dt
import heapq
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from features.events import Event

DAY_MS = 86_400_000
#: A message on its way to training: (arrival time in ms, topic kind, key, value).
Row = tuple[int, str, bytes, bytes]
#: Parquet compression: zstd keeps JSON values at a fraction of their size and every reader has it.
COMPRESSION = "zstd"
DATE_PREFIX = "date="
_PART = re.compile(r"^part-(?P<topic>.+)-(?P<partition>\d+)-(?P<first>\d+)-(?P<last>\d+)\.parquet$")

#: The columns of every part file, in order. ``key``/``value`` are the message bytes as produced.
SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("kafka_ts_ms", pa.int64()),
        ("topic_kind", pa.string()),
        ("key", pa.binary()),
        ("value", pa.binary()),
        ("kind", pa.string()),
        ("event_id", pa.string()),
        ("user_id", pa.string()),
        ("ts_ms", pa.int64()),
        ("session_id", pa.string()),
        ("item_id", pa.string()),
        ("category", pa.string()),
        ("price", pa.float64()),
        ("quantity", pa.int32()),
        ("order_id", pa.string()),
        ("order_lines", pa.int32()),
        ("total", pa.float64()),
    ]
)


@dataclass(frozen=True, slots=True)
class PartName:
    """What a part file's name says: topic partition, offset range (inclusive) and arrival date."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    date: str

    @property
    def file_name(self) -> str:
        return f"part-{self.topic}-{self.partition}-{self.first_offset}-{self.last_offset}.parquet"

    @classmethod
    def parse(cls, path: Path) -> PartName | None:
        """The name of a finished part under a ``date=`` folder, or None for anything else."""
        match = _PART.match(path.name)
        if match is None or not path.parent.name.startswith(DATE_PREFIX):
            return None
        return cls(
            match["topic"],
            int(match["partition"]),
            int(match["first"]),
            int(match["last"]),
            path.parent.name[len(DATE_PREFIX) :],
        )


def utc_date(ms: int) -> str:
    """``YYYY-MM-DD`` of an epoch-ms time, in UTC."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d")


@dataclass(slots=True)
class PartBuffer:
    """The rows of one topic partition not yet written: a contiguous offset range on one arrival date.

    ``add`` takes every consumed message in offset order; an invalid one (``event`` None) only
    extends the range. Columns are kept as lists, one entry per valid event.
    """

    topic: str
    partition: int
    date: str
    first_offset: int
    last_offset: int = -1
    columns: dict[str, list[object]] = field(default_factory=lambda: {name: [] for name in SCHEMA.names})

    def __len__(self) -> int:
        return len(self.columns["offset"])

    def add(
        self, offset: int, kafka_ts_ms: int, topic_kind: str, key: bytes, value: bytes, event: Event | None
    ) -> None:
        self.last_offset = offset
        if event is None:
            return
        row = (
            self.topic,
            self.partition,
            offset,
            kafka_ts_ms,
            topic_kind,
            key,
            value,
            event.kind,
            event.event_id,
            event.user_id,
            event.ts_ms,
            event.session_id,
            event.item_id,
            event.category,
            event.price,
            event.quantity,
            event.order_id,
            len(event.order_lines),
            event.total,
        )
        for name, cell in zip(SCHEMA.names, row, strict=True):
            self.columns[name].append(cell)

    @property
    def name(self) -> PartName:
        return PartName(self.topic, self.partition, self.first_offset, self.last_offset, self.date)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_part(root: Path, buffer: PartBuffer) -> Path | None:
    """Write ``buffer``'s rows as one part file, atomically and durably; None when it holds no valid event.

    A temp name (dot-prefixed, skipped by readers) in the target folder, fsync, rename over the
    final name (a re-write of the same range after a crash replaces it with the same rows), fsync
    the folder: after a crash the part is either wholly there or absent.
    """
    if not len(buffer):
        return None
    name = buffer.name
    folder = root / f"{DATE_PREFIX}{name.date}"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name.file_name
    tmp = folder / f".{name.file_name}.tmp-{os.getpid()}"
    try:
        pq.write_table(pa.table(buffer.columns, schema=SCHEMA), tmp, compression=COMPRESSION)
        _fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(folder)
    return final


def part_files(root: Path, since_date: str | None = None) -> list[tuple[PartName, Path]]:
    """Every finished part under ``root`` (from ``since_date`` on, when given), by date, topic, partition, offset."""
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if not folder.is_dir() or not folder.name.startswith(DATE_PREFIX):
            continue
        if since_date is not None and folder.name[len(DATE_PREFIX) :] < since_date:
            continue
        for path in folder.iterdir():
            name = PartName.parse(path)
            if name is not None:
                found.append((name, path))
    found.sort(key=lambda item: (item[0].date, item[0].topic, item[0].partition, item[0].first_offset))
    return found


def archived_until(root: Path, topic: str) -> dict[int, int]:
    """Partition -> the highest offset the parts of ``topic`` cover (resume after it)."""
    until: dict[int, int] = {}
    for name, _ in part_files(root):
        if name.topic == topic:
            until[name.partition] = max(until.get(name.partition, -1), name.last_offset)
    return until


def remove_temp_files(root: Path, topic: str, partition: int) -> int:
    """Delete the half-written temp files a crashed archiver left for one topic partition; how many."""
    prefix = f".part-{topic}-{partition}-"
    removed = 0
    for folder in root.glob(f"{DATE_PREFIX}*"):
        for path in folder.glob(f"{prefix}*"):
            if _PART.match(path.name[1:].split(".tmp-")[0]):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def apply_retention(root: Path, retention_days: int, now_ms: int) -> list[str]:
    """Delete the date folders more than ``retention_days`` before ``now_ms``'s date (0 keeps all);
    returns the dates removed. Whole folders go, so a part is never half deleted."""
    if retention_days <= 0 or not root.is_dir():
        return []
    oldest_kept = utc_date(now_ms - retention_days * DAY_MS)
    removed = []
    for folder in sorted(root.glob(f"{DATE_PREFIX}*")):
        date = folder.name[len(DATE_PREFIX) :]
        if folder.is_dir() and date < oldest_kept:
            shutil.rmtree(folder)
            removed.append(date)
    return removed


@dataclass(slots=True)
class ArchiveMessages:
    """What :func:`archive_messages` read: part files, rows, and parts skipped as overlapping."""

    parts: int = 0
    rows: int = 0
    overlapping_parts: list[str] = field(default_factory=list)


def archive_messages(
    root: Path, since_ms: int | None = None, read: ArchiveMessages | None = None
) -> Iterator[tuple[str, bytes, bytes]]:
    """``(topic_kind, key, value)`` of every archived event from event time ``since_ms`` on, in
    ARRIVAL order per partition: each topic partition in offset order, the three input topics'
    same-numbered partitions (one shopper's events, co-partitioned) merged by Kafka timestamp, as a
    worker reading them would meet them. Training applies the worker's late-event rule in that order
    (no upper time bound here: newer events must be seen by that rule).

    Only date folders that can hold such events are opened: an event arrives at most a little
    before its event time (the validator's future-skew limit), so one day before ``since_ms``'s
    date is enough. A part whose offset range overlaps one read before (which the archiver
    never writes) is skipped and named in ``read.overlapping_parts`` rather than doubled.
    """
    read = read if read is not None else ArchiveMessages()
    since_date = utc_date(since_ms - DAY_MS) if since_ms is not None else None
    parts = sorted(
        part_files(root, since_date), key=lambda item: (item[0].partition, item[0].topic, item[0].first_offset)
    )
    by_partition: dict[int, dict[str, list[Row]]] = {}
    last_read: dict[tuple[str, int], int] = {}
    for name, path in parts:
        where = (name.topic, name.partition)
        if name.first_offset <= last_read.get(where, -1):
            read.overlapping_parts.append(str(path))
            continue
        last_read[where] = name.last_offset
        wanted = ["kafka_ts_ms", "topic_kind", "key", "value", "ts_ms"]
        columns = pq.read_table(path, columns=wanted).to_pydict()
        read.parts += 1
        rows = by_partition.setdefault(name.partition, {}).setdefault(name.topic, [])
        for arrived_ms, topic_kind, key, value, ts_ms in zip(*(columns[c] for c in wanted), strict=True):
            if since_ms is None or ts_ms >= since_ms:  # older events change no late verdict of newer ones
                rows.append((arrived_ms, topic_kind, key, value))
    for _, topic_kind, key, value in arrival_order(by_partition):
        read.rows += 1
        yield topic_kind, key, value


def arrival_order(by_partition: Mapping[int, Mapping[str, Sequence[Row]]]) -> Iterator[Row]:
    """Rows ``(arrived_ms, ...)`` of partition number -> topic -> rows in offset order, in the order a
    worker meets them: partition by partition, each partition's topics merged by arrival time with
    every topic partition's own order kept (shoppers are co-partitioned, so this is each shopper's
    arrival order)."""
    for partition in sorted(by_partition):
        topics = by_partition[partition]
        yield from heapq.merge(*(topics[t] for t in sorted(topics)), key=lambda row: row[0])
