"""One micro-batch, from raw input messages to state writes, results, alerts and dead letters.

:class:`BatchProcessor` is the worker's whole per-batch logic with no Faust in it: the Faust
agent (:mod:`streams.app`) hands it the messages of a ``take_events`` batch and a way to read
stored states, then writes what it returns. The same object runs in ``bench/`` under a bare
confluent-kafka loop, so the framework's cost can be measured against the same work.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

from features.encoding import StateDecodeError, decode_state, encode_state
from features.events import Event, InvalidEvent, ValidationLimits, parse_event
from features.spec import FeatureSpec
from features.state import APPLIED, DUPLICATE, LATE, ShopperState, StateConfig
from models.scoring import CHURN, ShopperScores
from streams.alerts import AlertPolicy, AlertState
from streams.metrics import WorkerMetrics

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
        room = (max_message_bytes - DEAD_LETTER_FRAMING_BYTES - len(self.message.key or b"")
                - sum(len(name) + len(content) for name, content in (*headers, marker)))
        if len(value) <= room:
            return value, headers
        return value[:max(room, 0)], [*headers, marker]

    def headers(self, failed_at_ms: int) -> list[tuple[str, bytes]]:
        """Kafka headers that say where the original bytes came from and what was wrong."""
        m = self.message
        return [("shoppulse.dlq.reason", self.reason.encode()), ("shoppulse.dlq.detail", self.detail.encode()),
                ("shoppulse.dlq.source_topic", m.topic.encode()), ("shoppulse.dlq.source_partition", str(m.partition).encode()),
                ("shoppulse.dlq.source_offset", str(m.offset).encode()), ("shoppulse.dlq.failed_at_ms", str(failed_at_ms).encode())]


@dataclass(slots=True)
class ScoredShopper:
    """A shopper whose state changed in this batch: what to store and what to publish.

    ``last_message`` is the shopper's last message in the batch; the state writes are tied to
    it (its partition, and the changelog offset Faust records for recovery). For a shopper
    re-scored by the silent-shopper sweep it is the partition number. ``alert_state`` is
    None when the alert state did not change; ``recommendation`` and ``alert`` are None when
    there is nothing to publish. ``output_key`` keys the output messages: the user id, or its
    pseudonym when pseudonymisation is on (``key`` stays the real id: it keys the tables).
    ``trigger_ts`` is the event time (ms) of the event that caused the scoring, None for a
    silent-shopper re-score.
    """

    user_id: str
    key: bytes
    state_bytes: bytes
    last_message: InputMessage | int
    result: bytes
    output_key: bytes = b""
    recommendation: bytes | None = None
    alert_state: bytes | None = None
    alert: bytes | None = None
    trigger_ts: int | None = None


@dataclass(slots=True)
class BatchOutcome:
    """What one batch produced."""

    consumed: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    scored: list[ScoredShopper] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    late: int = 0


class Scorer(Protocol):
    """Serves the models: see :class:`models.scoring.BatchScorer`."""

    model_versions: dict[str, str]

    def refresh(self, force: bool = False) -> bool: ...

    def score(self, states: Sequence[ShopperState], features: np.ndarray) -> list[ShopperScores]: ...

    def churn_reasons(self, features: np.ndarray, top: int = 3) -> list[list[tuple[str, float]]]: ...


#: ``load(where, key)`` -> stored bytes or None; ``where`` is the message whose partition to read,
#: or the partition number itself (the silent-shopper sweep has no message).
StateLoader = Callable[[InputMessage | int, bytes], bytes | None]


@dataclass(slots=True)
class Touched:
    """A shopper to score: who, where its writes go, and what triggered the score."""

    user_id: str
    key: bytes
    where: InputMessage | int
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
    """

    def __init__(self, topic_kinds: Mapping[str, str], state_config: StateConfig, spec: FeatureSpec,
                 scorer: Scorer, limits: ValidationLimits, metrics: WorkerMetrics,
                 alert_policy: AlertPolicy = AlertPolicy(), pseudonym_key: bytes = b"") -> None:
        self.topic_kinds = dict(topic_kinds)
        self.state_config = state_config
        self.spec = spec
        self.scorer = scorer
        self.limits = limits
        self.metrics = metrics
        self.alert_policy = alert_policy
        self.pseudonym_key = pseudonym_key
        self._consumed = {topic: metrics.events_consumed.labels(topic) for topic in self.topic_kinds}

    def process(self, messages: Iterable[InputMessage], load_state: StateLoader, load_alert: StateLoader,
                now_ms: int | None = None) -> BatchOutcome:
        """Process one batch; the loaders return a shopper's stored state / alert state bytes or None."""
        started = time.perf_counter()
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        outcome = BatchOutcome()
        by_user = self._validate(messages, outcome, now_ms)

        states: list[ShopperState] = []
        touched: list[Touched] = []
        for user_id, pairs in by_user.items():
            key = user_id.encode()
            last_message = pairs[-1][1]  # last to arrive: the state write is tied to its offset
            state = self._load(load_state(last_message, key), user_id)
            applied_here = repeated_here = 0
            pairs.sort(key=lambda pair: pair[0].ts_ms)  # stable: ties keep arrival order
            for event, _ in pairs:
                result = state.update(event, self.state_config)
                if result == APPLIED:
                    applied_here += 1
                elif result == DUPLICATE:
                    repeated_here += 1
                elif result == LATE:
                    outcome.late += 1
            outcome.duplicates += repeated_here
            # Events seen before are a replay after a crash (or a producer retry): the state already
            # holds them, but the outputs of their first pass may have died with the worker, so the
            # shopper is scored and written again (consumers deduplicate on trigger_event_id).
            if applied_here or repeated_here:
                outcome.applied += applied_here
                states.append(state)
                trigger = pairs[-1][0]  # newest by event time
                touched.append(Touched(user_id, key, last_message, trigger.event_id, trigger.ts_ms))

        if states:
            now = np.array([s.last_event_ms for s in states], dtype=np.int64)
            self._score(states, touched, now, load_alert, outcome)
        self.metrics.duplicate_events.inc(outcome.duplicates)
        self.metrics.late_events.inc(outcome.late)
        self.metrics.batch_size.observe(outcome.consumed)
        self.metrics.shoppers_in_batch.observe(len(states))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return outcome

    def _validate(self, messages: Iterable[InputMessage], outcome: BatchOutcome,
                  now_ms: int) -> dict[str, list[tuple[Event, InputMessage]]]:
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

    def rescore_silent(self, stored: Iterable[tuple[int, bytes, bytes]], load_alert: StateLoader,
                       now_ms: int) -> BatchOutcome:
        """Score shoppers who went quiet, as of ``now_ms`` (wall clock): churn risk grows with silence.

        ``stored`` yields ``(partition, key, state bytes)``; results and alerts come back as for
        events, with no trigger event. States are not changed, so nothing is written back.
        """
        outcome = BatchOutcome()
        states: list[ShopperState] = []
        touched: list[Touched] = []
        for partition, key, raw in stored:
            state = self._load(raw, key.decode(errors="replace"))
            states.append(state)
            touched.append(Touched(state.user_id, key, partition, None, now_ms))
        if states:
            self._score(states, touched, np.full(len(states), now_ms, dtype=np.int64), load_alert, outcome)
        return outcome

    def _score(self, states: list[ShopperState], touched: list[Touched], now: np.ndarray,
               load_alert: StateLoader, outcome: BatchOutcome) -> None:
        """One forward pass per model for the batch, then results and alert decisions per shopper."""
        self.scorer.refresh()
        features = self.spec.matrix(states, now)
        started = time.perf_counter()
        scored = self.scorer.score(states, features)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        versions = self.scorer.model_versions
        scored_at_ms = int(time.time() * 1000)
        alerting: list[tuple[int, float, str]] = []  # (index in batch, risk, alert id)
        first = len(outcome.scored)
        for index, (shopper_in, state, shopper) in enumerate(zip(touched, states, scored)):
            public_id = self.public_id(shopper_in.user_id)
            envelope = {"schema_version": OUTPUT_CONTRACT_VERSION, "user_id": public_id,
                        "trigger_event_id": shopper_in.trigger_event_id, "trigger_ts": shopper_in.trigger_ts,
                        "scored_at": scored_at_ms}
            result = _to_json({**envelope, "scores": {name: round(value, 6) for name, value in shopper.scores.items()},
                               "model_versions": versions, "feature_spec": self.spec.hash})
            out = ScoredShopper(shopper_in.user_id, shopper_in.key, encode_state(state), shopper_in.where,
                                result.encode(), output_key=public_id.encode(),
                                trigger_ts=shopper_in.trigger_ts if shopper_in.trigger_event_id is not None else None)
            if shopper.recommendations:
                out.recommendation = _to_json({
                    **envelope, "items": [{"item_id": item, "score": round(score, 6)} for item, score in shopper.recommendations],
                    "model_version": versions.get("recommendations")}).encode()
            risk = shopper.scores.get(CHURN)
            if risk is not None:
                before = self._load_alert(load_alert(shopper_in.where, shopper_in.key), shopper_in.user_id)
                after, fire = before.step(risk, scored_at_ms, self.alert_policy)
                if after != before:
                    out.alert_state = after.encode()
                if fire:
                    cause = shopper_in.trigger_event_id or f"silent-since-{state.last_event_ms}"
                    alerting.append((index, risk, f"{public_id}:{cause}"))
            outcome.scored.append(out)
            for name, value in shopper.scores.items():
                self.metrics.score_values.labels(name).observe(value)
        if alerting:
            self._alerts(alerting, states, features, outcome.scored[first:], versions, scored_at_ms)

    def _alerts(self, alerting: list[tuple[int, float, str]], states: list[ShopperState], features: np.ndarray,
                scored: list[ScoredShopper], versions: dict[str, str], fired_at_ms: int) -> None:
        """Churn alert messages, with what a campaign needs: risk, reasons, last activity, value to date."""
        reasons = self.scorer.churn_reasons(features[[index for index, _, _ in alerting]])
        for (index, risk, alert_id), why in zip(alerting, reasons):
            state = states[index]
            scored[index].alert = _to_json({
                "schema_version": OUTPUT_CONTRACT_VERSION, "alert_id": alert_id,
                "user_id": self.public_id(state.user_id), "churn_risk": round(risk, 6), "threshold": self.alert_policy.high,
                "reasons": [{"feature": name, "risk_contribution": value} for name, value in why],
                "last_activity_ts": state.last_event_ms, "orders_lifetime": state.orders_lifetime,
                "value_to_date": state.revenue_lifetime_cents / 100.0, "model_version": versions.get(CHURN),
                "fired_at": fired_at_ms}).encode()
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

    def _load(self, stored: bytes | None, user_id: str) -> ShopperState:
        if stored is None:
            return ShopperState.new(user_id)
        try:
            return decode_state(stored)
        except StateDecodeError as exc:
            self.metrics.state_decode_errors.inc()
            log.error("stored state of shopper %r could not be decoded (%s); starting it afresh — "
                      "if this repeats, check that all workers run the same release", user_id, exc)
            return ShopperState.new(user_id)
