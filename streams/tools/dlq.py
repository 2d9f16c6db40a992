"""``shoppulse dlq replay``: send dead letters back to their source topic once their producer is fixed.

A dead letter (docs/events.md, "Dead-letter topic") holds the original key and bytes and says in
its headers where they came from and why they were rejected. Replaying one produces exactly that
key and value again to ``shoppulse.dlq.source_topic``, with the input producers' partitioner
(murmur2, :data:`streams.kafka.clients.PARTITIONER`), so the event lands where its shopper's other events
are, and adds the header :data:`REPLAYED_FROM` = ``<dead-letter topic>:<partition>:<offset>``.

Replaying twice is harmless because the tool looks before it sends: it reads the source topics'
``REPLAYED_FROM`` headers (from the earliest selected failure time on) and skips every dead letter
whose replay is already there. The worker's event-id dedup would not be enough on its own: a
repeated valid event leaves the state alone only while it is among the shopper's recent ids, and
the shopper is scored (and published) again either way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from streams.config import Settings
from streams.kafka.batch_producer import BatchProducer, DeliveryError
from streams.kafka.clients import read_to_end, topic_partitions, topic_reader

log = logging.getLogger(__name__)

#: Header on a replayed message: the dead letter it was made from, ``<topic>:<partition>:<offset>``.
REPLAYED_FROM = "shoppulse.dlq.replayed_from"
#: The source topics are searched for earlier replays from this long (ms) before the earliest
#: selected failure time: the replay's Kafka timestamp comes from the replaying machine's clock,
#: the failure time from the worker's, and the two may disagree.
CLOCK_SKEW_MARGIN_MS = 3_600_000
#: Dead letters sent between two waits for delivery (and progress bar updates).
_CHUNK = 500
#: ``--time`` choices: the worker's failure time (header) or the event's own ``ts`` field.
TIME_FAILED, TIME_EVENT = "failed", "event"


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """A dead-letter message as read back: where it is, its original key and bytes, and its headers' facts."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str
    source_topic: str
    source_partition: int
    source_offset: int
    failed_at_ms: int
    truncated_from: int | None  # original value length when the worker cut the value to fit, else None

    @property
    def ref(self) -> str:
        """The value of :data:`REPLAYED_FROM` for this dead letter."""
        return f"{self.topic}:{self.partition}:{self.offset}"

    @property
    def source(self) -> str:
        """Where the whole original message is: ``topic[partition]@offset``."""
        return f"{self.source_topic}[{self.source_partition}]@{self.source_offset}"

    def event_ts_ms(self) -> int | None:
        """The ``ts`` field of the original value when it is a JSON object with an integer ``ts``, else None."""
        try:
            doc = json.loads(self.value or b"")
        except (ValueError, UnicodeDecodeError):
            return None
        ts = doc.get("ts") if isinstance(doc, dict) else None
        return ts if isinstance(ts, int) and not isinstance(ts, bool) else None

    @classmethod
    def parse(
        cls,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Iterable[tuple[str, bytes | None]],
    ) -> StoredDeadLetter | None:
        """Read a message of the dead-letter topic; None when it lacks the worker's headers (not ours)."""
        found = {name: (content or b"").decode(errors="replace") for name, content in headers}
        try:
            truncated = found.get("shoppulse.dlq.value_truncated_from")
            return cls(
                topic,
                partition,
                offset,
                key,
                value,
                found["shoppulse.dlq.reason"],
                found["shoppulse.dlq.source_topic"],
                int(found["shoppulse.dlq.source_partition"]),
                int(found["shoppulse.dlq.source_offset"]),
                int(found["shoppulse.dlq.failed_at_ms"]),
                int(truncated) if truncated is not None else None,
            )
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters to replay: every given filter must match (an empty tuple matches all).

    ``since_ms`` is inclusive, ``until_ms`` exclusive, both epoch ms on the time ``time`` names:
    the failure time (``failed``) or the event's ``ts`` (``event``; a dead letter without a
    readable integer ``ts`` then never matches a time range).
    """

    reasons: tuple[str, ...] = ()
    source_topics: tuple[str, ...] = ()
    since_ms: int | None = None
    until_ms: int | None = None
    time: str = TIME_FAILED

    def matches(self, dead: StoredDeadLetter) -> bool:
        if self.reasons and dead.reason not in self.reasons:
            return False
        if self.source_topics and dead.source_topic not in self.source_topics:
            return False
        if self.since_ms is None and self.until_ms is None:
            return True
        at_ms = dead.failed_at_ms if self.time == TIME_FAILED else dead.event_ts_ms()
        return (
            at_ms is not None
            and (self.since_ms is None or at_ms >= self.since_ms)
            and (self.until_ms is None or at_ms < self.until_ms)
        )


@dataclass(slots=True)
class ReplayPlan:
    """What a replay would do: the dead letters to send, and those skipped with their reason."""

    to_send: list[StoredDeadLetter]
    already_replayed: list[StoredDeadLetter]
    truncated: list[StoredDeadLetter]
    not_ours: int  # messages of the dead-letter topic without the worker's headers
    not_selected: int


def plan_replay(
    dead_letters: Iterable[StoredDeadLetter | None], selection: Selection, replayed_refs: set[str]
) -> ReplayPlan:
    """Sort the dead-letter topic's messages into sent, skipped (replayed before, cut short) and unselected."""
    plan = ReplayPlan([], [], [], 0, 0)
    for dead in dead_letters:
        if dead is None:
            plan.not_ours += 1
        elif not selection.matches(dead):
            plan.not_selected += 1
        elif dead.ref in replayed_refs:
            plan.already_replayed.append(dead)
        elif dead.truncated_from is not None:
            plan.truncated.append(dead)
        else:
            plan.to_send.append(dead)
    return plan


def parse_time_ms(text: str) -> int:
    """Epoch milliseconds, or an ISO 8601 time (no zone means UTC), as epoch ms."""
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither epoch milliseconds nor an ISO 8601 time (e.g. 2026-12-03T11:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp() * 1000)


# --------------------------------------------------------------------------- Kafka


def read_dead_letters(settings: Settings, topic: str) -> list[StoredDeadLetter | None]:
    """Every message of the dead-letter topic, parsed (None for one without the worker's headers)."""
    consumer = topic_reader(settings, "dlq")
    try:
        starts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in topic_partitions(settings, topic)]
        # A data message always has a partition and an offset (None only on error events).
        return [
            StoredDeadLetter.parse(
                topic,
                cast(int, m.partition()),
                cast(int, m.offset()),
                m.key(),
                m.value(),
                cast("list[tuple[str, bytes | None]]", m.headers() or []),
            )
            for m in read_to_end(consumer, starts)
        ]
    finally:
        consumer.close()


def replayed_refs(settings: Settings, source_topics: Iterable[str], since_ms: int) -> set[str]:
    """The dead letters already replayed to ``source_topics``: their :data:`REPLAYED_FROM` headers,
    read from the first message at or after ``since_ms`` (Kafka timestamp) to the end."""
    consumer = topic_reader(settings, "dlq")
    refs: set[str] = set()
    try:
        topics = sorted(set(source_topics))
        wanted = [TopicPartition(t, p, since_ms) for t in topics for p in topic_partitions(settings, t)]
        # offsets_for_times answers -1 where no message is that recent: nothing to read there.
        starts = [tp for tp in consumer.offsets_for_times(wanted, timeout=15) if tp.offset >= 0] if wanted else []
        for message in read_to_end(consumer, starts):
            for name, content in cast("list[tuple[str, bytes | None]]", message.headers() or []):
                if name == REPLAYED_FROM and content is not None:
                    refs.add(content.decode(errors="replace"))
    finally:
        consumer.close()
    return refs


def send(settings: Settings, dead_letters: list[StoredDeadLetter], progress: bool) -> None:
    """Produce each dead letter's key and value to its source topic with :data:`REPLAYED_FROM`.

    Waits for delivery every :data:`_CHUNK` messages, so an interrupted run leaves only
    delivered replays behind (which the next run skips) plus at most one chunk in doubt.
    """
    producer = BatchProducer(settings)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(dead_letters), unit="msg", desc="replay")
    try:
        for start in range(0, len(dead_letters), _CHUNK):
            chunk = dead_letters[start : start + _CHUNK]
            for dead in chunk:
                producer.send(dead.source_topic, dead.key, dead.value, [(REPLAYED_FROM, dead.ref.encode())])
            producer.deliver()
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        producer.close()


# --------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``shoppulse dlq replay`` and its options."""
    actions = parser.add_subparsers(dest="dlq_action", required=True)
    p = actions.add_parser(
        "replay",
        help="send selected dead letters back to their source topic",
        description="Send selected dead letters (original key and bytes) back to their source "
        f"topic, with a {REPLAYED_FROM} header; dead letters replayed before are skipped.",
    )
    p.add_argument("--reason", action="append", default=[], help="only this rejection reason (repeatable)")
    p.add_argument(
        "--source-topic", action="append", default=[], help="only dead letters of this input topic (repeatable)"
    )
    p.add_argument(
        "--since",
        type=parse_time_ms,
        default=None,
        help="only from this time on (inclusive): epoch ms or ISO 8601, UTC unless a zone is given",
    )
    p.add_argument("--until", type=parse_time_ms, default=None, help="only before this time (exclusive)")
    p.add_argument(
        "--time",
        choices=(TIME_FAILED, TIME_EVENT),
        default=TIME_FAILED,
        help="what --since/--until compare: the worker's failure time (shoppulse.dlq.failed_at_ms) or "
        "the event's own ts field",
    )
    p.add_argument("--topic", default=None, help="the dead-letter topic (default: SHOPPULSE_TOPIC_DEAD_LETTER)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be replayed, by reason and topic")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _counts(dead_letters: list[StoredDeadLetter]) -> str:
    counts = Counter((d.reason, d.source_topic) for d in dead_letters)
    return "\n".join(f"  {n:>8}  {reason:<20} {topic}" for (reason, topic), n in sorted(counts.items()))


def run(args: argparse.Namespace, settings: Settings) -> int:
    """``shoppulse dlq replay``: plan, report, and (unless ``--dry-run``) send; 0 when nothing failed."""
    topic = args.topic or settings.topic_dead_letter
    selection = Selection(tuple(args.reason), tuple(args.source_topic), args.since, args.until, args.time)
    dead_letters = read_dead_letters(settings, topic)
    candidates = [d for d in dead_letters if d is not None and selection.matches(d)]
    # Never below 0: ListOffsets reads -1 and -2 as "latest" and "earliest", not as times.
    search_from_ms = max(0, min((d.failed_at_ms for d in candidates), default=0) - CLOCK_SKEW_MARGIN_MS)
    refs = replayed_refs(settings, {d.source_topic for d in candidates}, search_from_ms)
    plan = plan_replay(dead_letters, selection, refs)
    verb = "would replay" if args.dry_run else "replaying"
    print(
        f"{topic}: {len(dead_letters)} messages; {verb} {len(plan.to_send)}, "
        f"{len(plan.already_replayed)} replayed before (skipped), {len(plan.truncated)} cut short (skipped), "
        f"{plan.not_selected} not selected, {plan.not_ours} without dead-letter headers"
    )
    if plan.to_send:
        print(f"{verb}, by reason and source topic:\n{_counts(plan.to_send)}")
    if plan.already_replayed:
        print(
            f"replayed before (their {REPLAYED_FROM} header is on the source topic):\n{_counts(plan.already_replayed)}"
        )
    for dead in plan.truncated:
        print(
            f"skipped {dead.ref} ({dead.reason}): its value was cut from {dead.truncated_from} bytes to fit the "
            f"dead-letter topic; the whole message is at {dead.source}: produce it from there"
        )
    if args.dry_run or not plan.to_send:
        return 0
    try:
        send(settings, plan.to_send, progress=not args.quiet)
    except DeliveryError as exc:
        print(f"shoppulse dlq replay: {exc}. Run it again: what was delivered is skipped then", flush=True)
        return 1
    print(f"replayed {len(plan.to_send)} dead letters")
    return 0
