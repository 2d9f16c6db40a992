"""Event accounting: did every input message end where the contracts say it must?

:func:`account` is pure: it takes what was produced to the input topics and what the output
topics hold, and tells, per input message, whether it is accounted for:

* a **valid event** (``parse_event`` accepts it, with the worker's limits) is *scored* when the
  scores topic holds a message for its shopper whose trigger (``trigger_ts``, the newest event
  of that shopper in a micro-batch, docs/outputs.md) is at or after the event's own ``ts``. A
  shopper is scored once per batch with its latest state, so a later score of the same shopper
  covers the earlier events. Events that repeat an ``event_id`` of the same shopper count as
  one event (the worker applies one of them, docs/events.md), due at their earliest ``ts``.
  Sweep scores (no trigger event) cover nothing.
* an **invalid message** is accounted for by a dead letter from the same source topic with the
  same key and value bytes whose ``shoppulse.dlq.reason`` header is the reason ``parse_event``
  gives and whose detail header is not empty; ``n`` identical invalid messages need ``n``
  dead letters.

Under at-least-once a crash or rebalance may publish a result twice: **duplicate scores**
(same shopper and trigger event) and extra dead letters are counted and listed, not failures.
**Duplicate churn alerts** are failures: two alerts for one shopper whose ``fired_at`` are
less than the cooldown apart (a replayed ``alert_id`` included). So are scores whose trigger
event was never produced.

:class:`OutputReader` reads the output topics with confluent-kafka, and :func:`await_accounted`
re-checks as outputs arrive, so tests and ``bench/soak.py`` share one definition.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from features.events import InvalidEvent, ValidationLimits, parse_event
from streams.config import Settings
from streams.kafka.clients import confluent_consumer_config, consume_data

REASON_HEADER = "shoppulse.dlq.reason"
DETAIL_HEADER = "shoppulse.dlq.detail"
SOURCE_TOPIC_HEADER = "shoppulse.dlq.source_topic"


@dataclass(frozen=True, slots=True)
class Produced:
    """One message produced to an input topic: topic name, its contract kind, key and value."""

    topic: str
    kind: str
    key: bytes | None
    value: bytes | None


class _Message(Protocol):
    # Read-only members, so frozen dataclasses such as GeneratedMessage match.
    @property
    def topic_kind(self) -> str: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


def produced_from(messages: Iterable[_Message], topic_by_kind: Mapping[str, str]) -> list[Produced]:
    """:class:`Produced` records of generated messages (anything with ``topic_kind``, ``key``, ``value``)."""
    return [Produced(topic_by_kind[m.topic_kind], m.topic_kind, m.key, m.value) for m in messages]


@dataclass(frozen=True, slots=True)
class Score:
    """What the checker needs of a score message."""

    user_id: str
    trigger_event_id: str | None
    trigger_ts: int


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """A dead letter: original key and value, and the headers that say where from and why."""

    source_topic: str
    key: bytes | None
    value: bytes | None
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Alert:
    """What the checker needs of a churn alert."""

    user_id: str
    alert_id: str
    fired_at: int


def _required(value: bytes | None, topic: str) -> bytes:
    """``value``, or a RuntimeError naming ``topic``: the worker never writes an empty score or alert."""
    if value is None:
        raise RuntimeError(f"reading {topic}: a message without a value")
    return value


def score_of(value: bytes) -> Score:
    doc = json.loads(value)
    return Score(doc["user_id"], doc["trigger_event_id"], int(doc["trigger_ts"]))


def alert_of(value: bytes) -> Alert:
    doc = json.loads(value)
    return Alert(doc["user_id"], doc["alert_id"], int(doc["fired_at"]))


def dead_letter_of(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]] | None
) -> DeadLetterRecord:
    named = {name: (raw or b"").decode(errors="replace") for name, raw in headers or []}
    return DeadLetterRecord(
        named.get(SOURCE_TOPIC_HEADER, ""), key, value, named.get(REASON_HEADER, ""), named.get(DETAIL_HEADER, "")
    )


@dataclass
class AccountingReport:
    """The outcome of :func:`account`. ``ok`` when nothing is unaccounted and no alert repeats.

    Attributes:
        events_in: input messages produced.
        valid_events: distinct valid events (shopper, event_id); ``repeated_event_ids`` extra copies.
        scored: valid events covered by a score (see the module docstring); ``score_messages`` read.
        invalid_events: messages the worker must reject; ``dead_lettered`` of them found with their reason.
        unaccounted: one line per input message not accounted for (must be empty).
        duplicate_scores: (shopper, trigger event) -> times published, for those published more than once.
        extra_dead_letters: dead letters beyond one per invalid message (at-least-once replays).
        alerts: churn alerts read; ``duplicate_alerts`` names those within a cooldown of the previous one.
        unexpected_scores: score messages whose trigger event was never produced as a valid event.
    """

    events_in: int = 0
    valid_events: int = 0
    repeated_event_ids: int = 0
    scored: int = 0
    invalid_events: int = 0
    dead_lettered: int = 0
    score_messages: int = 0
    unaccounted: list[str] = field(default_factory=list)
    duplicate_scores: dict[tuple[str, str], int] = field(default_factory=dict)
    extra_dead_letters: int = 0
    alerts: int = 0
    duplicate_alerts: list[str] = field(default_factory=list)
    unexpected_scores: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing unaccounted, no churn alert repeated within its cooldown, no score of an unknown event."""
        return not (self.unaccounted or self.duplicate_alerts or self.unexpected_scores)

    @property
    def repeated_score_messages(self) -> int:
        """Score messages beyond the first per (shopper, trigger event)."""
        return sum(n - 1 for n in self.duplicate_scores.values())

    def summary(self, examples: int = 5) -> str:
        """A few lines for a test failure or a bench log."""
        lines = [
            f"events in {self.events_in}: {self.valid_events} valid ({self.repeated_event_ids} repeated event "
            f"ids), {self.scored} scored; {self.invalid_events} invalid, {self.dead_lettered} dead-lettered "
            "with their reason",
            f"score messages {self.score_messages}, repeated {self.repeated_score_messages} "
            f"({len(self.duplicate_scores)} shopper/trigger pairs); extra dead letters {self.extra_dead_letters}; "
            f"churn alerts {self.alerts}, duplicate {len(self.duplicate_alerts)}",
            f"unaccounted {len(self.unaccounted)}, unexpected scores {len(self.unexpected_scores)}",
        ]
        for title, items in (
            ("unaccounted", self.unaccounted),
            ("duplicate alerts", self.duplicate_alerts),
            ("unexpected scores", self.unexpected_scores),
        ):
            if items:
                lines.append(f"{title}, e.g.: " + "; ".join(items[:examples]))
        return "\n".join(lines)


@dataclass
class Expected:
    """What the produced messages call for: distinct valid events and invalid messages by reason."""

    events_in: int = 0
    due: dict[tuple[str, str], int] = field(default_factory=dict)  # (user, event id) -> earliest ts
    repeated_event_ids: int = 0
    invalid: Counter[tuple[str, bytes | None, bytes | None, str]] = field(default_factory=Counter)

    def add(
        self, produced: Iterable[Produced], now_ms: int | None = None, limits: ValidationLimits = ValidationLimits()
    ) -> Expected:
        """Classify more produced messages with the worker's own validation (``now_ms``: default now).

        Only ``ts_in_future`` depends on the clock, so classify after producing, not before.
        """
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        for message in produced:
            self.events_in += 1
            try:
                event = parse_event(message.kind, message.key, message.value, now_ms, limits)
            except InvalidEvent as exc:
                self.invalid[(message.topic, message.key, message.value, exc.reason)] += 1
                continue
            ident = (event.user_id, event.event_id)
            if ident in self.due:
                self.repeated_event_ids += 1
                self.due[ident] = min(self.due[ident], event.ts_ms)
            else:
                self.due[ident] = event.ts_ms
        return self


def account(
    expected: Expected,
    scores: Iterable[Score],
    dead_letters: Iterable[DeadLetterRecord],
    alerts: Iterable[Alert],
    cooldown_ms: int,
) -> AccountingReport:
    """Account for every produced message (see the module docstring for the rules)."""
    report = AccountingReport(
        events_in=expected.events_in, valid_events=len(expected.due), repeated_event_ids=expected.repeated_event_ids
    )
    due, invalid = expected.due, expected.invalid
    newest: dict[str, int] = {}
    published: Counter[tuple[str, str]] = Counter()
    for score in scores:
        report.score_messages += 1
        if score.trigger_event_id is None:
            continue
        published[(score.user_id, score.trigger_event_id)] += 1
        newest[score.user_id] = max(newest.get(score.user_id, score.trigger_ts), score.trigger_ts)
    report.duplicate_scores = {pair: n for pair, n in published.items() if n > 1}
    report.unexpected_scores = [
        f"{user} triggered by {event_id}" for user, event_id in published if (user, event_id) not in due
    ]
    for (user, event_id), ts in due.items():
        if newest.get(user, -1) >= ts:
            report.scored += 1
        else:
            report.unaccounted.append(
                f"valid event {event_id} of {user} (ts {ts}) has no score at or after it "
                f"(newest trigger_ts {newest.get(user)})"
            )

    found: Counter[tuple[str, bytes | None, bytes | None, str]] = Counter(
        (d.source_topic, d.key, d.value, d.reason) for d in dead_letters if d.detail
    )
    for ident, sent in invalid.items():
        report.invalid_events += sent
        got = found.get(ident, 0)
        report.dead_lettered += min(got, sent)
        report.extra_dead_letters += max(0, got - sent)
        if got < sent:
            topic, key, value, reason = ident
            shown = (value or b"")[:80]
            report.unaccounted.append(
                f"{sent - got} of {sent} invalid message(s) on {topic} key={key!r} "
                f"({reason}) not dead-lettered with that reason: {shown!r}"
            )

    by_user: dict[str, list[Alert]] = {}
    for alert in alerts:
        report.alerts += 1
        by_user.setdefault(alert.user_id, []).append(alert)
    for user, fired in by_user.items():
        fired.sort(key=lambda a: a.fired_at)
        last = fired[0]
        for alert in fired[1:]:
            if alert.fired_at - last.fired_at < cooldown_ms:
                report.duplicate_alerts.append(
                    f"{user}: {alert.alert_id} fired {alert.fired_at - last.fired_at} ms "
                    f"after {last.alert_id} (cooldown {cooldown_ms} ms)"
                )
            else:
                last = alert
    return report


class OutputReader:
    """Reads the scores, dead-letter and churn-alert topics from the beginning, incrementally.

    Partitions are assigned (no consumer group join), so reading starts at once and disturbs no one.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.scores: list[Score] = []
        self.dead_letters: list[DeadLetterRecord] = []
        self.alerts: list[Alert] = []
        self._consumer = Consumer(
            {**confluent_consumer_config(settings, "shoppulse-accounting"), "enable.auto.commit": False, "log_level": 3}
        )
        topics = (settings.topic_scores, settings.topic_dead_letter, settings.topic_churn_alerts)
        self._consumer.assign(
            [
                TopicPartition(topic, partition, OFFSET_BEGINNING)
                for topic in topics
                for partition in range(settings.partitions)
            ]
        )

    def poll(self, seconds: float) -> int:
        """Read what arrives for about ``seconds``; returns how many messages were read."""
        deadline = time.monotonic() + seconds
        read = 0
        while time.monotonic() < deadline:
            for message in consume_data(self._consumer, 1000, min(0.5, max(0.01, deadline - time.monotonic()))):
                read += 1
                topic, value = message.topic(), message.value()
                if topic == self.settings.topic_scores:
                    self.scores.append(score_of(_required(value, topic)))
                elif topic == self.settings.topic_churn_alerts:
                    self.alerts.append(alert_of(_required(value, topic)))
                else:
                    # A consumed message's headers are a list of (name, bytes or None), never a dict.
                    headers = cast("list[tuple[str, bytes | None]] | None", message.headers())
                    self.dead_letters.append(dead_letter_of(message.key(), value, headers))
        return read

    def expect(self, produced: Iterable[Produced]) -> Expected:
        """Classify produced messages with the worker's validation limits (after producing them)."""
        limits = ValidationLimits(self.settings.max_event_bytes, self.settings.max_future_skew_ms)
        return Expected().add(produced, limits=limits)

    def account(self, expected: Expected) -> AccountingReport:
        """:func:`account` of ``expected`` against what has been read so far."""
        return account(expected, self.scores, self.dead_letters, self.alerts, self.settings.churn_alert_cooldown_ms)

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> OutputReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def await_accounted(
    reader: OutputReader, expected: Expected, timeout_s: float, settle_s: float = 0.0
) -> AccountingReport:
    """Read outputs until every produced message is accounted for, or ``timeout_s`` passes.

    Then keeps reading for ``settle_s`` more seconds, so that late duplicates (repeated scores
    or alerts) are seen too; returns the last report.
    """
    deadline = time.monotonic() + timeout_s
    report = reader.account(expected)
    while report.unaccounted and time.monotonic() < deadline:
        reader.poll(1.0)
        report = reader.account(expected)
    if settle_s > 0:
        reader.poll(settle_s)
        report = reader.account(expected)
    return report
