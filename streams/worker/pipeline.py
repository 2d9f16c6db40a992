"""One micro-batch, from raw input messages to state writes, results, alerts and dead letters.

:class:`BatchProcessor` is the worker's whole per-batch logic with no Faust in it: the worker
(:mod:`streams.worker.app`) hands it a micro-batch and a way to read stored values, and gets back a
:class:`BatchOutcome`: the values to store, the messages to publish and the dead letters, as
data. It writes and sends nothing itself; :class:`streams.worker.checkpoint.Checkpoint` does.

Each stored value (:mod:`streams.worker.envelope`) records the highest input offset per input
partition whose event it holds; an event at or below it is skipped as already applied (a replay after a crash),
however many events ago it was. The event-id dedup still absorbs a producer sending an event twice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from features.encoding import StateDecodeError, decode_state, encode_state
from features.events import Event, InvalidEvent, ValidationLimits, parse_event
from features.spec import FeatureSpec
from features.state import APPLIED, DUPLICATE, LATE, ShopperState, StateConfig
from models.scoring import CHURN, ShopperScores
from streams.worker.alerts import AlertPolicy, AlertState
from streams.worker.envelope import EnvelopeDecodeError, Stored
from streams.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

#: Version of the output message contracts (docs/outputs.md).
OUTPUT_CONTRACT_VERSION = 1

#: Compact JSON for output messages, built once (``json.dumps`` with options builds one per call).
_to_json = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(slots=True)
class InputMessage:
    """A message as consumed: where it came from and its raw bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


#: Bytes of a dead-letter message left for Kafka's record framing when its value is cut to fit.
DEAD_LETTER_FRAMING_BYTES = 512


@dataclass(slots=True)
class DeadLetter:
    """An input message that broke its contract, and why."""

    message: InputMessage
    reason: str
    detail: str

    def record(self, failed_at_ms: int, max_message_bytes: int) -> tuple[bytes | None, list[tuple[str, bytes]]]:
        """Value and headers of the dead-letter message: the original bytes, unless key, value and
        headers would exceed ``max_message_bytes`` (the producer refuses such a message). Then the
        value is cut to fit and ``shoppulse.dlq.value_truncated_from`` gives its original length;
        the whole value stays at the source topic, partition and offset the headers name."""
        headers = self.headers(failed_at_ms)
        value = self.message.value
        if value is None:
            return None, headers
        marker = ("shoppulse.dlq.value_truncated_from", str(len(value)).encode())
        room = (
            max_message_bytes
            - DEAD_LETTER_FRAMING_BYTES
            - len(self.message.key or b"")
            - sum(len(name) + len(content) for name, content in (*headers, marker))
        )
        if len(value) <= room:
            return value, headers
        return value[: max(room, 0)], [*headers, marker]

    def headers(self, failed_at_ms: int) -> list[tuple[str, bytes]]:
        """Kafka headers that say where the original bytes came from and what was wrong."""
        m = self.message
        return [
            ("shoppulse.dlq.reason", self.reason.encode()),
            ("shoppulse.dlq.detail", self.detail.encode()),
            ("shoppulse.dlq.source_topic", m.topic.encode()),
            ("shoppulse.dlq.source_partition", str(m.partition).encode()),
            ("shoppulse.dlq.source_offset", str(m.offset).encode()),
            ("shoppulse.dlq.failed_at_ms", str(failed_at_ms).encode()),
        ]


@dataclass(slots=True)
class StateWrite:
    """A value to store for a shopper (:mod:`streams.worker.envelope`; None deletes) in the partition of its events."""

    partition: int
    key: bytes
    value: bytes | None


@dataclass(slots=True)
class ScoredShopper:
    """A scored shopper: what to publish.

    ``recommendation`` and ``alert`` are None when there is nothing to publish. ``output_key``
    keys the output messages: the user id, or its pseudonym when pseudonymisation is on
    (``key`` stays the real id: it keys the table). ``trigger_ts`` is the event time (ms) of the
    event that caused the scoring, None for a silent-shopper re-score.
    """

    user_id: str
    key: bytes
    result: bytes
    output_key: bytes = b""
    recommendation: bytes | None = None
    alert: bytes | None = None
    trigger_ts: int | None = None


@dataclass(slots=True)
class BatchOutcome:
    """What one batch produced: values to store, messages to publish, dead letters, and counts."""

    consumed: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    scored: list[ScoredShopper] = field(default_factory=list)
    writes: list[StateWrite] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    replayed: int = 0
    late: int = 0


class Scorer(Protocol):
    """Serves the models: see :class:`models.scoring.BatchScorer`."""

    @property
    def model_versions(self) -> dict[str, str]: ...

    def refresh(self, force: bool = False) -> bool: ...

    def score(self, states: Sequence[ShopperState], features: np.ndarray) -> list[ShopperScores]: ...

    def churn_reasons(self, features: np.ndarray, top: int = 3) -> list[list[tuple[str, float]]]: ...


#: ``load(partition, key)`` -> the shopper's stored value (:mod:`streams.worker.envelope`) or None.
StateLoader = Callable[[int, bytes], bytes | None]


@dataclass(slots=True)
class Touched:
    """A shopper to score: who, its stored value (to be replaced), and what triggered the score."""

    user_id: str
    key: bytes
    partition: int
    stored: Stored
    trigger_event_id: str | None  # None: the silent-shopper sweep
    trigger_ts: int


class BatchProcessor:
    """Validate, update shopper states in event-time order, and score each touched shopper once.

    Args:
        topic_kinds: input topic name -> contract kind (``page_view``, ``cart``, ``order``).
        state_config: windows, grace period (ms), history length, dedup size.
        spec: the feature vector definition shared with training.
        scorer: the models (or the heuristic) that score a batch.
        limits: validation bounds (payload bytes, future skew in ms).
        metrics: where counts and timings go.
        alert_policy: churn alert thresholds and cooldown (ms).
        pseudonym_key: when set, outputs carry ``HMAC-SHA256(pseudonym_key, user_id)`` (32 hex
            characters) instead of the user id: stable per shopper, not reversible without the key.
        feature_watch: called with the feature rows of every batch's shoppers scored after an event
            (the drift gauge; the silent-shopper sweep's rows are left out).
    """

    def __init__(
        self,
        topic_kinds: Mapping[str, str],
        state_config: StateConfig,
        spec: FeatureSpec,
        scorer: Scorer,
        limits: ValidationLimits,
        metrics: WorkerMetrics,
        alert_policy: AlertPolicy = AlertPolicy(),
        pseudonym_key: bytes = b"",
        feature_watch: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        self.topic_kinds = dict(topic_kinds)
        self.state_config = state_config
        self.spec = spec
        self.scorer = scorer
        self.limits = limits
        self.metrics = metrics
        self.alert_policy = alert_policy
        self.pseudonym_key = pseudonym_key
        self.feature_watch = feature_watch
        self._consumed = {topic: metrics.events_consumed.labels(topic) for topic in self.topic_kinds}

    def process(self, messages: Iterable[InputMessage], load: StateLoader, now_ms: int | None = None) -> BatchOutcome:
        """Process one batch; ``load`` returns a shopper's stored value or None."""
        started = time.perf_counter()
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        outcome = BatchOutcome()
        by_user = self._validate(messages, outcome, now_ms)

        states: list[ShopperState] = []
        touched: list[Touched] = []
        for user_id, pairs in by_user.items():
            key = user_id.encode()
            partition = pairs[0][1].partition  # co-partitioned: all of a shopper's messages share it
            stored = self._unwrap(load(partition, key), user_id)
            state = self._load(stored.state, user_id)
            already = Stored(offsets=dict(stored.offsets))  # the skip rule reads the offsets as loaded
            offsets = stored.offsets
            applied_here = repeated_here = 0
            pairs.sort(key=lambda pair: pair[0].ts_ms)  # stable: ties keep arrival order
            for event, message in pairs:
                source = (message.topic, message.partition)
                if already.applied(*source, message.offset):
                    outcome.replayed += 1
                    repeated_here += 1
                    continue
                if message.offset > offsets.get(source, -1):
                    offsets[source] = message.offset
                result = state.update(event, self.state_config)
                if result == APPLIED:
                    applied_here += 1
                elif result == DUPLICATE:
                    outcome.duplicates += 1
                    repeated_here += 1
                elif result == LATE:
                    outcome.late += 1
            # Events seen before are a replay after a crash (or a producer retry): the state already
            # holds them, but the outputs of their first pass may have died with the worker, so the
            # shopper is scored and written again (consumers deduplicate on trigger_event_id).
            # A batch of late events only is stored too: its offsets advance, its state does not.
            stored.state = encode_state(state)
            if applied_here or repeated_here:
                outcome.applied += applied_here
                states.append(state)
                trigger = pairs[-1][0]  # newest by event time
                touched.append(Touched(user_id, key, partition, stored, trigger.event_id, trigger.ts_ms))
            else:
                outcome.writes.append(StateWrite(partition, key, stored.encode()))

        if states:
            now = np.array([s.last_event_ms for s in states], dtype=np.int64)
            self._score(states, touched, now, outcome)
        self.metrics.duplicate_events.inc(outcome.duplicates)
        self.metrics.replayed_events.inc(outcome.replayed)
        self.metrics.late_events.inc(outcome.late)
        self.metrics.batch_size.observe(outcome.consumed)
        self.metrics.shoppers_in_batch.observe(len(states))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return outcome

    def _validate(
        self, messages: Iterable[InputMessage], outcome: BatchOutcome, now_ms: int
    ) -> dict[str, list[tuple[Event, InputMessage]]]:
        """Parse every message; invalid ones become dead letters, valid ones are grouped by shopper."""
        by_user: dict[str, list[tuple[Event, InputMessage]]] = {}
        consumed = dict.fromkeys(self._consumed, 0)
        for message in messages:
            consumed[message.topic] += 1
            try:
                event = parse_event(self.topic_kinds[message.topic], message.key, message.value, now_ms, self.limits)
            except InvalidEvent as exc:
                outcome.dead_letters.append(DeadLetter(message, exc.reason, exc.detail))
                self.metrics.invalid_events.labels(exc.reason).inc()
                continue
            by_user.setdefault(event.user_id, []).append((event, message))
        for topic, count in consumed.items():
            if count:
                self._consumed[topic].inc(count)
                outcome.consumed += count
        return by_user

    def rescore_silent(self, stored: Iterable[tuple[int, bytes, bytes]], now_ms: int) -> BatchOutcome:
        """Score shoppers who went quiet, as of ``now_ms`` (wall clock): churn risk grows with silence.

        ``stored`` yields ``(partition, key, stored value)``; results and alerts come back as for
        events, with no trigger event. States and offsets are not changed; a value is written
        back only where the alert state changed.
        """
        outcome = BatchOutcome()
        states: list[ShopperState] = []
        touched: list[Touched] = []
        for partition, key, raw in stored:
            user_id = key.decode(errors="replace")
            value = self._unwrap(raw, user_id)
            state = self._load(value.state, user_id)
            value.state = encode_state(state)  # unchanged, unless it had to be reset
            states.append(state)
            touched.append(Touched(state.user_id, key, partition, value, None, now_ms))
        if states:
            self._score(states, touched, np.full(len(states), now_ms, dtype=np.int64), outcome)
        return outcome

    def _score(
        self, states: list[ShopperState], touched: list[Touched], now: np.ndarray, outcome: BatchOutcome
    ) -> None:
        """One forward pass per model for the batch, then results and alert decisions per shopper."""
        self.scorer.refresh()
        features = self.spec.matrix(states, now)
        if self.feature_watch is not None:  # the rows scored after events, as the drift reference has them
            self.feature_watch(features[[shopper.trigger_event_id is not None for shopper in touched]])
        started = time.perf_counter()
        scored = self.scorer.score(states, features)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        versions = self.scorer.model_versions
        scored_at_ms = int(time.time() * 1000)
        alerting: list[tuple[int, float, str]] = []  # (index in batch, risk, alert id)
        first = len(outcome.scored)
        for index, (shopper_in, state, shopper) in enumerate(zip(touched, states, scored, strict=False)):
            public_id = self.public_id(shopper_in.user_id)
            envelope = {
                "schema_version": OUTPUT_CONTRACT_VERSION,
                "user_id": public_id,
                "trigger_event_id": shopper_in.trigger_event_id,
                "trigger_ts": shopper_in.trigger_ts,
                "scored_at": scored_at_ms,
            }
            result = _to_json(
                {
                    **envelope,
                    "scores": {name: round(value, 6) for name, value in shopper.scores.items()},
                    "model_versions": versions,
                    "feature_spec": self.spec.hash,
                }
            )
            out = ScoredShopper(
                shopper_in.user_id,
                shopper_in.key,
                result.encode(),
                output_key=public_id.encode(),
                trigger_ts=shopper_in.trigger_ts if shopper_in.trigger_event_id is not None else None,
            )
            if shopper.recommendations:
                out.recommendation = _to_json(
                    {
                        **envelope,
                        "items": [
                            {"item_id": item, "score": round(score, 6)} for item, score in shopper.recommendations
                        ],
                        "model_version": versions.get("recommendations"),
                    }
                ).encode()
            risk = shopper.scores.get(CHURN)
            stored, alert_changed = shopper_in.stored, False
            if risk is not None:
                before = self._load_alert(stored.alert, shopper_in.user_id)
                after, fire = before.step(risk, scored_at_ms, self.alert_policy)
                if after != before:
                    stored.alert, alert_changed = after.encode(), True
                if fire:
                    cause = shopper_in.trigger_event_id or f"silent-since-{state.last_event_ms}"
                    alerting.append((index, risk, f"{public_id}:{cause}"))
            outcome.scored.append(out)
            if shopper_in.trigger_event_id is not None or alert_changed:  # a silent re-score changes only alerts
                outcome.writes.append(StateWrite(shopper_in.partition, shopper_in.key, stored.encode()))
            for name, value in shopper.scores.items():
                self.metrics.score_values.labels(name).observe(value)
        if alerting:
            self._alerts(alerting, states, features, outcome.scored[first:], versions, scored_at_ms)

    def _alerts(
        self,
        alerting: list[tuple[int, float, str]],
        states: list[ShopperState],
        features: np.ndarray,
        scored: list[ScoredShopper],
        versions: dict[str, str],
        fired_at_ms: int,
    ) -> None:
        """Churn alert messages, with what a campaign needs: risk, reasons, last activity, value to date."""
        reasons = self.scorer.churn_reasons(features[[index for index, _, _ in alerting]])
        for (index, risk, alert_id), why in zip(alerting, reasons, strict=False):
            state = states[index]
            scored[index].alert = _to_json(
                {
                    "schema_version": OUTPUT_CONTRACT_VERSION,
                    "alert_id": alert_id,
                    "user_id": self.public_id(state.user_id),
                    "churn_risk": round(risk, 6),
                    "threshold": self.alert_policy.high,
                    "reasons": [{"feature": name, "risk_contribution": value} for name, value in why],
                    "last_activity_ts": state.last_event_ms,
                    "orders_lifetime": state.orders_lifetime,
                    "value_to_date": state.revenue_lifetime_cents / 100.0,
                    "model_version": versions.get(CHURN),
                    "fired_at": fired_at_ms,
                }
            ).encode()
            self.metrics.alerts_fired.inc()
            for name, _ in why:
                self.metrics.alert_reasons.labels(name).inc()

    def _load_alert(self, stored: bytes | None, user_id: str) -> AlertState:
        try:
            return AlertState.decode(stored)
        except ValueError as exc:
            self.metrics.state_decode_errors.inc()
            log.error("alert state of shopper %r: %s", user_id, exc)
            return AlertState()

    def public_id(self, user_id: str) -> str:
        """The id outputs carry for a shopper: the user id, or its keyed pseudonym."""
        if not self.pseudonym_key:
            return user_id
        return hmac.new(self.pseudonym_key, user_id.encode(), hashlib.sha256).hexdigest()[:32]

    def _unwrap(self, raw: bytes | None, user_id: str) -> Stored:
        try:
            return Stored.decode(raw)
        except EnvelopeDecodeError as exc:
            self.metrics.state_decode_errors.inc()
            log.error(
                "stored value of shopper %r could not be read (%s); starting it afresh — "
                "if this repeats, check that all workers run the same release",
                user_id,
                exc,
            )
            return Stored()

    def _load(self, stored: bytes | None, user_id: str) -> ShopperState:
        if stored is None:
            return ShopperState.new(user_id)
        try:
            return decode_state(stored)
        except StateDecodeError as exc:
            self.metrics.state_decode_errors.inc()
            log.error(
                "stored state of shopper %r could not be decoded (%s); starting it afresh — "
                "if this repeats, check that all workers run the same release",
                user_id,
                exc,
            )
            return ShopperState.new(user_id)
