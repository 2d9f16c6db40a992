"""One micro-batch, from raw input messages to state writes, scores and dead letters.

:class:`BatchProcessor` is the worker's whole per-batch logic with no Faust in it: the Faust
agent (:mod:`streams.app`) hands it the messages of a ``take_events`` batch and a way to read
stored states, then writes what it returns. The same object runs in ``bench/`` under a bare
confluent-kafka loop, so the framework's cost can be measured against the same work.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

from features.encoding import StateDecodeError, decode_state, encode_state
from features.events import Event, InvalidEvent, ValidationLimits, parse_event
from features.spec import FeatureSpec
from features.state import APPLIED, DUPLICATE, LATE, ShopperState, StateConfig
from streams.metrics import WorkerMetrics

log = logging.getLogger(__name__)

#: Version of the ``shoppulse.scores`` message contract (docs/outputs.md).
SCORES_CONTRACT_VERSION = 1


@dataclass(slots=True)
class InputMessage:
    """A message as consumed: where it came from and its raw bytes.

    ``handle`` is whatever the caller needs to tie a write back to this message (the Faust
    event in the worker); the processor never looks inside it.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    handle: Any = None


@dataclass(slots=True)
class DeadLetter:
    """An input message that broke its contract, and why."""

    message: InputMessage
    reason: str
    detail: str

    def headers(self, failed_at_ms: int) -> list[tuple[str, bytes]]:
        """Kafka headers that say where the original bytes came from and what was wrong."""
        m = self.message
        return [("shoppulse.dlq.reason", self.reason.encode()), ("shoppulse.dlq.detail", self.detail.encode()),
                ("shoppulse.dlq.source_topic", m.topic.encode()), ("shoppulse.dlq.source_partition", str(m.partition).encode()),
                ("shoppulse.dlq.source_offset", str(m.offset).encode()), ("shoppulse.dlq.failed_at_ms", str(failed_at_ms).encode())]


@dataclass(slots=True)
class ScoredShopper:
    """A shopper whose state changed in this batch: the bytes to store and the result to publish.

    ``last_message`` is the shopper's last message in the batch; the state write is tied to it
    (its partition, and the changelog offset Faust records for recovery).
    """

    user_id: str
    key: bytes
    state_bytes: bytes
    last_message: InputMessage
    result: bytes


@dataclass(slots=True)
class BatchOutcome:
    """What one batch produced."""

    dead_letters: list[DeadLetter] = field(default_factory=list)
    scored: list[ScoredShopper] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    late: int = 0


class Scorer(Protocol):
    """Turns a batch of states and their feature rows into named scores, one dict per shopper."""

    name: str
    version: str

    def score(self, states: Sequence[ShopperState], features: np.ndarray) -> list[dict[str, float]]: ...


StateLoader = Callable[[InputMessage, bytes], bytes | None]


class BatchProcessor:
    """Validate, update shopper states in event-time order, and score each touched shopper once.

    Args:
        topic_kinds: input topic name -> contract kind (``page_view``, ``cart``, ``order``).
        state_config: windows, grace period (ms), history length, dedup size.
        spec: the feature vector definition shared with training.
        scorer: the model (or heuristic) that scores a batch.
        limits: validation bounds (payload bytes, future skew in ms).
        metrics: where counts and timings go.
    """

    def __init__(self, topic_kinds: Mapping[str, str], state_config: StateConfig, spec: FeatureSpec,
                 scorer: Scorer, limits: ValidationLimits, metrics: WorkerMetrics) -> None:
        self.topic_kinds = dict(topic_kinds)
        self.state_config = state_config
        self.spec = spec
        self.scorer = scorer
        self.limits = limits
        self.metrics = metrics
        self._consumed = {topic: metrics.events_consumed.labels(topic) for topic in self.topic_kinds}

    def process(self, messages: Iterable[InputMessage], load_state: StateLoader, now_ms: int | None = None) -> BatchOutcome:
        """Process one batch. ``load_state(message, key)`` returns a stored state's bytes or None."""
        started = time.perf_counter()
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        outcome = BatchOutcome()
        by_user: dict[str, list[tuple[Event, InputMessage]]] = {}
        count = 0
        for message in messages:
            count += 1
            self._consumed[message.topic].inc()
            try:
                event = parse_event(self.topic_kinds[message.topic], message.key, message.value, now_ms, self.limits)
            except InvalidEvent as exc:
                outcome.dead_letters.append(DeadLetter(message, exc.reason, exc.detail))
                self.metrics.invalid_events.labels(exc.reason).inc()
                continue
            by_user.setdefault(event.user_id, []).append((event, message))

        states: list[ShopperState] = []
        touched: list[tuple[str, bytes, InputMessage, Event]] = []
        for user_id, pairs in by_user.items():
            key = user_id.encode()
            last_message = pairs[-1][1]
            state = self._load(load_state(last_message, key), user_id)
            applied_here = 0
            pairs.sort(key=lambda pair: pair[0].ts_ms)  # stable: ties keep arrival order
            for event, _ in pairs:
                result = state.update(event, self.state_config)
                if result == APPLIED:
                    applied_here += 1
                elif result == DUPLICATE:
                    outcome.duplicates += 1
                elif result == LATE:
                    outcome.late += 1
            if applied_here:
                outcome.applied += applied_here
                states.append(state)
                touched.append((user_id, key, last_message, max((e for e, _ in pairs), key=lambda e: e.ts_ms)))

        if states:
            features = self.spec.matrix(states, np.array([s.last_event_ms for s in states], dtype=np.int64))
            scores = self.scorer.score(states, features)
            scored_at_ms = int(time.time() * 1000)
            for (user_id, key, last_message, trigger), state, named in zip(touched, states, scores):
                result = self._result(user_id, trigger, named, scored_at_ms)
                outcome.scored.append(ScoredShopper(user_id, key, encode_state(state), last_message, result))
                self.metrics.end_to_end_seconds.observe(max(0.0, (scored_at_ms - trigger.ts_ms) / 1000.0))

        self.metrics.duplicate_events.inc(outcome.duplicates)
        self.metrics.late_events.inc(outcome.late)
        self.metrics.batch_size.observe(count)
        self.metrics.shoppers_in_batch.observe(len(states))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return outcome

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

    def _result(self, user_id: str, trigger: Event, scores: dict[str, float], scored_at_ms: int) -> bytes:
        return json.dumps({
            "schema_version": SCORES_CONTRACT_VERSION, "user_id": user_id,
            "scores": {name: round(value, 6) for name, value in scores.items()},
            "model_versions": {self.scorer.name: self.scorer.version},
            "feature_spec": self.spec.hash, "trigger_event_id": trigger.event_id,
            "trigger_ts": trigger.ts_ms, "scored_at": scored_at_ms,
        }, separators=(",", ":")).encode()
