"""One micro-batch, from raw input messages to state writes, results, alerts and dead letters.

:class:`BatchProcessor` is the worker's whole per-batch logic with no Faust in it: the worker
(:mod:`streams.worker.app`) hands it a micro-batch and a way to read stored values, and gets back a
:class:`BatchOutcome`: the values to store, the messages to publish and the dead letters, as
data. It writes and sends nothing itself; :class:`streams.worker.checkpoint.Checkpoint` does.

Each stored value (:mod:`streams.worker.envelope`) records the highest input offset per input
partition whose event it holds; an event at or below it is skipped as already applied (a replay after a crash),
however many events ago it was. The event-id dedup still absorbs a producer sending an event twice.

Erasure requests (docs/privacy.md) arrive in the same batches, co-partitioned with the events. Per
shopper, a request is placed among the events by event time: the events at or before it are
applied and then erased with it, later ones start a fresh state. Its offset is recorded like an
event's, so a replay neither erases twice nor erases events that came after it.

A W3C ``traceparent`` header (with its ``tracestate``) on the event that triggered a shopper's
scoring is carried onto the outputs of that scoring (:func:`trace_headers`).

Each stored value also carries the shopper's live evaluation memory (:mod:`models.outcomes`): every
applied event first resolves what the shopper was told before (in event-time order, before the
new prediction is recorded), then the scoring records what they are told now, per variant, with
the shopper's ``score_seq``. The resolved outcomes ride in the :class:`BatchOutcome` and reach the
``shoppulse_live_*`` counters only once the batch committed (:meth:`streams.worker.publisher.Publisher.delivered`),
as the published-message counts do: a batch that dies before its flush counted nothing, and its
replay resolves the same outcomes from the same stored memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from features.encoding import StateDecodeError, decode_state, encode_state
from features.events import ErasureRequest, Event, InvalidEvent, ValidationLimits, parse_erasure_request, parse_event
from features.spec import FeatureSpec
from features.state import APPLIED, DUPLICATE, LATE, ShopperState, StateConfig, event_id_hash
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from models.outcomes import ALERTED, CHURN, HOLDOUT, SCORES, EvalConfig, LiveMemory, Outcome, model_and_version
from models.scoring import ShopperScores
from models.variants import CHALLENGER, CHAMPION, in_share
from streams.worker.alerts import AlertPolicy, AlertState
from streams.worker.envelope import EnvelopeDecodeError, Stored
from streams.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

#: Version of the output message contracts (docs/outputs.md).
OUTPUT_CONTRACT_VERSION = 1

#: Model kind -> the ``model_versions`` entry that names its champion (``model:version``).
_VERSION_KEYS = {CLASSIFIER_MODEL: CHURN, NEXTITEM_MODEL: "recommendations"}


#: Compact JSON for output messages, built once (``json.dumps`` with options builds one per call).
_to_json = json.JSONEncoder(separators=(",", ":")).encode


#: Kafka headers as aiokafka hands them out and the producers take them.
Headers = Sequence[tuple[str, bytes]]


@dataclass(slots=True)
class InputMessage:
    """A message as consumed: where it came from, its raw bytes and its headers."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()


#: W3C Trace Context, level 1 (https://www.w3.org/TR/trace-context/): version 00, trace id, parent id, flags.
_TRACEPARENT = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE_ID, _ZERO_PARENT_ID = b"0" * 32, b"0" * 16
#: Longest ``tracestate`` carried, in bytes (the W3C limit is 32 members; 512 bytes holds them in practice).
MAX_TRACESTATE_BYTES = 512


def trace_headers(headers: Headers) -> list[tuple[str, bytes]] | None:
    """The ``traceparent`` (and ``tracestate``, when printable ASCII of at most :data:`MAX_TRACESTATE_BYTES`)
    to put on the outputs an input message caused; None when it has none.

    Raises ValueError when the ``traceparent`` is malformed (not version ``00``, a trace or parent id
    of zeros, wrong length or upper-case hex): the caller counts it and carries nothing. The event
    itself is valid either way: trace context is the tracing system's, not the shop's contract.
    """
    named = {name.lower(): value for name, value in headers}
    if "traceparent" not in named:
        return None
    parent, state = named["traceparent"], named.get("tracestate")
    match = _TRACEPARENT.fullmatch(parent or b"")
    if match is None or match[1] == _ZERO_TRACE_ID or match[2] == _ZERO_PARENT_ID:
        raise ValueError(f"malformed traceparent of {len(parent or b'')} bytes")
    carried = [("traceparent", bytes(parent))]
    if state and len(state) <= MAX_TRACESTATE_BYTES and state.isascii() and bytes(state).decode().isprintable():
        carried.append(("tracestate", bytes(state)))
    return carried


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

    ``recommendation`` and ``alert`` are None when there is nothing to publish (an alert withheld
    by the holdout is None too: it was computed and recorded, not sent). ``output_key``
    keys the output messages: the user id, or its pseudonym when pseudonymisation is on
    (``key`` stays the real id: it keys the table). ``trigger_ts`` is the event time (ms) of the
    event that caused the scoring, None for a silent-shopper re-score. ``headers`` go on every
    output message: that event's trace context (:func:`trace_headers`), None when it had none.
    """

    user_id: str
    key: bytes
    result: bytes
    output_key: bytes = b""
    recommendation: bytes | None = None
    alert: bytes | None = None
    trigger_ts: int | None = None
    headers: list[tuple[str, bytes]] | None = None


@dataclass(slots=True)
class Erasure:
    """A carried-out erasure request: the confirmation to publish, keyed like the outputs."""

    output_key: bytes
    confirmation: bytes


@dataclass(slots=True)
class BatchOutcome:
    """What one batch produced: values to store, messages to publish, dead letters, and counts."""

    consumed: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    scored: list[ScoredShopper] = field(default_factory=list)
    writes: list[StateWrite] = field(default_factory=list)
    erasures: list[Erasure] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    replayed: int = 0
    late: int = 0
    live: list[Outcome] = field(default_factory=list)
    held_out_alerts: int = 0


class Scorer(Protocol):
    """Serves the models: see :class:`models.scoring.BatchScorer`."""

    @property
    def model_versions(self) -> dict[str, str]: ...

    def refresh(self, force: bool = False) -> bool: ...

    def score(self, states: Sequence[ShopperState], features: np.ndarray) -> list[ShopperScores]: ...

    def churn_reasons(self, features: np.ndarray, top: int = 3) -> list[list[tuple[str, float]]]: ...


class ChallengerSpec(Protocol):
    """What the pipeline reads of a loaded challenger (:class:`models.registry.Challenger`)."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def share(self) -> float: ...
    @property
    def salt(self) -> str: ...


@runtime_checkable
class ChallengerScorer(Protocol):
    """A scorer that also serves challengers (the loop contract's extension of :class:`Scorer`)."""

    @property
    def challengers(self) -> Mapping[str, ChallengerSpec]: ...

    def score_challenger(
        self, model: str, states: Sequence[ShopperState], features: np.ndarray
    ) -> list[ShopperScores]: ...


#: ``load(partition, key)`` -> the shopper's stored value (:mod:`streams.worker.envelope`) or None.
StateLoader = Callable[[int, bytes], bytes | None]
#: ``committed(topic, partition)`` -> the committed input offset (the next to read), None before any commit.
CommittedOffsets = Callable[[str, int], int | None]
#: The worker's shopper table (state, alert state, offsets: one value per shopper): what an erasure deletes.
STATE_TABLE = "shopper_state"


@dataclass(slots=True)
class Touched:
    """A shopper to score: who, its stored value (to be replaced), and what triggered the score."""

    user_id: str
    key: bytes
    partition: int
    stored: Stored
    trigger_event_id: str | None  # None: the silent-shopper sweep
    trigger_ts: int
    memory: LiveMemory
    #: Nothing new applied (a replay after a crash, or a producer's duplicate): re-send the last scoring.
    resend: bool = False
    #: False for the re-send that precedes a new scoring of the same shopper in one batch: that one writes.
    writes: bool = True
    #: Event time the scores are as of (set when scored): the start of the live evaluation windows.
    as_of_ms: int = 0
    trace: list[tuple[str, bytes]] | None = None


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
        erasure_topic: the topic of erasure requests, consumed in the same batches ("": none).
        eval_config: horizons and caps of the live evaluation (its ``grace_ms`` is the state's).
        alert_holdout_share / alert_holdout_salt: the share of shoppers (by salted user-id hash)
            whose churn alerts are recorded but not sent.
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
        erasure_topic: str = "",
        eval_config: EvalConfig | None = None,
        alert_holdout_share: float = 0.0,
        alert_holdout_salt: str = "shoppulse-alert-holdout",
    ) -> None:
        self.topic_kinds = dict(topic_kinds)
        self.state_config = state_config
        self.spec = spec
        self.scorer = scorer
        self.limits = limits
        self.metrics = metrics
        self.alert_policy = alert_policy
        self.pseudonym_key = pseudonym_key
        self.erasure_topic = erasure_topic
        self.feature_watch = feature_watch
        self.eval_config = eval_config or EvalConfig(grace_ms=state_config.grace_ms)
        self.alert_holdout_share = alert_holdout_share
        self.alert_holdout_salt = alert_holdout_salt
        consumed = [*self.topic_kinds, erasure_topic] if erasure_topic else list(self.topic_kinds)
        self._consumed = {topic: metrics.events_consumed.labels(topic) for topic in consumed}

    def process(
        self,
        messages: Iterable[InputMessage],
        load: StateLoader,
        now_ms: int | None = None,
        committed: CommittedOffsets | None = None,
    ) -> BatchOutcome:
        """Process one batch; ``load`` returns a shopper's stored value or None, ``committed`` the
        committed input offsets (an erasure deletes with a tombstone only once its shopper's events
        are committed: :meth:`_erased_write`)."""
        started = time.perf_counter()
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        outcome = BatchOutcome()
        requests: dict[str, list[tuple[ErasureRequest, InputMessage]]] = {}
        by_user = self._validate(messages, outcome, now_ms, requests)
        for user_id in requests.keys() - by_user.keys():
            by_user[user_id] = []

        states: list[ShopperState] = []
        touched: list[Touched] = []
        for user_id, pairs in by_user.items():
            key = user_id.encode()
            erasures = sorted(requests.get(user_id, ()), key=lambda pair: pair[0].ts_ms)
            # co-partitioned: all of a shopper's messages share a partition number
            partition = (pairs[0][1] if pairs else erasures[0][1]).partition
            stored = self._unwrap(load(partition, key), user_id)
            loaded_state = stored.state
            state = self._load(loaded_state, user_id)
            memory = self._load_memory(stored.memory, user_id)
            already = Stored(offsets=dict(stored.offsets))  # the skip rule reads the offsets as loaded
            offsets = stored.offsets
            applied_here = repeated_here = 0
            replayed: tuple[Event, InputMessage] | None = None  # the newest one applied before this batch
            erased = False
            # the canonical order of the offline replay: a tie in event time goes by event-id hash
            pairs.sort(key=lambda pair: (pair[0].ts_ms, event_id_hash(pair[0].event_id)))
            for event, message in pairs:
                while erasures and event.ts_ms > erasures[0][0].ts_ms:
                    if self._erase(erasures.pop(0), stored, state, already, outcome, now_ms):
                        state, stored, erased = ShopperState.new(user_id), Stored(offsets=offsets), True
                        memory = LiveMemory()
                        applied_here = repeated_here = 0  # what was erased is not scored
                source = (message.topic, message.partition)
                if already.applied(*source, message.offset):
                    outcome.replayed += 1
                    repeated_here += 1
                    replayed = event, message
                    continue
                if message.offset > offsets.get(source, -1):
                    offsets[source] = message.offset
                result = state.update(event, self.state_config)
                if result == APPLIED:
                    applied_here += 1
                    outcome.live += memory.observe(event, state.last_event_ms, self.eval_config)
                elif result == DUPLICATE:
                    outcome.duplicates += 1
                    repeated_here += 1
                elif result == LATE:
                    outcome.late += 1
            # Events seen before are a replay after a crash (or a producer retry): the state already
            # holds them, but the outputs of their first pass may have died with the worker, so the
            # shopper is scored and written again (consumers deduplicate on trigger_event_id).
            # A batch of late events only is stored too: its offsets advance, its state does not.
            for erasure in erasures:  # the requests after the shopper's last event of the batch
                if self._erase(erasure, stored, state, already, outcome, now_ms):
                    state, stored, erased = ShopperState.new(user_id), Stored(offsets=offsets), True
                    memory = LiveMemory()
                    applied_here = repeated_here = 0
            stored.state = encode_state(state)
            holds_events = state.last_event_ms > 0  # none: erased, or an erasure marker (_erased_write)
            if (applied_here or repeated_here) and holds_events:
                outcome.applied += applied_here
                if applied_here and replayed is not None and memory.score_seq and not erased:
                    # A replay cut into a batch with new events: the stored scoring (of the stored
                    # state) may have died with the worker before it was sent, so it is re-sent first.
                    # Triggered by the newest replayed event; the new scoring after it writes the value.
                    states.append(self._load(loaded_state, user_id))
                    touched.append(self._touched(user_id, key, partition, stored, memory, replayed, True, writes=False))
                states.append(state)  # scored after the newest event by event time
                touched.append(self._touched(user_id, key, partition, stored, memory, pairs[-1], not applied_here))
            elif erased or not holds_events:  # replayed erased events score nothing
                outcome.writes.append(self._erased_write(partition, key, stored, committed))
            else:
                outcome.writes.append(StateWrite(partition, key, stored.encode()))

        if states:
            # a re-send is scored as of its stored scoring's moment, which a sweep may have set
            now = np.array(
                [
                    shopper.memory.scored_ms if shopper.resend and shopper.memory.score_seq else state.last_event_ms
                    for state, shopper in zip(states, touched, strict=True)
                ],
                dtype=np.int64,
            )
            self._score(states, touched, now, outcome)
        self.metrics.duplicate_events.inc(outcome.duplicates)
        self.metrics.replayed_events.inc(outcome.replayed)
        self.metrics.late_events.inc(outcome.late)
        self.metrics.batch_size.observe(outcome.consumed)
        self.metrics.shoppers_in_batch.observe(len(states))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return outcome

    def _touched(
        self,
        user_id: str,
        key: bytes,
        partition: int,
        stored: Stored,
        memory: LiveMemory,
        trigger: tuple[Event, InputMessage],
        resend: bool,
        writes: bool = True,
    ) -> Touched:
        """A shopper to score after ``trigger`` (an event and its message, whose trace it carries)."""
        event, message = trigger
        return Touched(
            user_id,
            key,
            partition,
            stored,
            event.event_id,
            event.ts_ms,
            memory,
            resend,
            writes,
            trace=self._trace(message.headers),
        )

    def _validate(
        self,
        messages: Iterable[InputMessage],
        outcome: BatchOutcome,
        now_ms: int,
        requests: dict[str, list[tuple[ErasureRequest, InputMessage]]],
    ) -> dict[str, list[tuple[Event, InputMessage]]]:
        """Parse every message; invalid ones become dead letters, valid ones are grouped by shopper
        (erasure requests into ``requests``)."""
        by_user: dict[str, list[tuple[Event, InputMessage]]] = {}
        consumed = dict.fromkeys(self._consumed, 0)
        for message in messages:
            consumed[message.topic] += 1
            try:
                if message.topic == self.erasure_topic:
                    request = parse_erasure_request(message.key, message.value, now_ms, self.limits)
                    requests.setdefault(request.user_id, []).append((request, message))
                    continue
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

    def _erase(
        self,
        erasure: tuple[ErasureRequest, InputMessage],
        stored: Stored,
        state: ShopperState,
        already: Stored,
        outcome: BatchOutcome,
        now_ms: int,
    ) -> bool:
        """Carry out one erasure request on the shopper's value as it stands (its events up to the
        request applied) and queue the confirmation. Returns False for a request the stored value
        already went through (a replay after a crash): nothing is erased again, since what came after
        it must stay, and the confirmation is sent again with nothing deleted.

        The caller replaces the value with a fresh state that keeps only the applied offsets
        (the request's own included), so a replay applies none of the erased events again.
        """
        request, message = erasure
        replayed = already.applied(message.topic, message.partition, message.offset)
        deleted: list[str] = []
        if not replayed:
            if message.offset > stored.offsets.get((message.topic, message.partition), -1):
                stored.offsets[(message.topic, message.partition)] = message.offset
            # "state" when it holds events (a fresh one holds none), then every other part that holds
            # something: the alert state, and whatever else the envelope keeps per shopper
            deleted = ["state"] if state.last_event_ms > 0 else []
            deleted += [
                part.name
                for part in dataclasses.fields(Stored)
                if part.name not in ("state", "offsets") and getattr(stored, part.name)
            ]
        public_id = self.public_id(request.user_id)
        confirmation = {
            "schema_version": OUTPUT_CONTRACT_VERSION,
            "request_id": request.request_id,
            "user_id": public_id,
            "requested_at": request.ts_ms,
            "erased_at": now_ms,
            "found": bool(deleted),
            "store": STATE_TABLE,
            "deleted": deleted,
        }
        outcome.erasures.append(Erasure(public_id.encode(), _to_json(confirmation).encode()))
        self.metrics.erasures.labels("deleted" if deleted else "nothing_found").inc()
        return not replayed

    def _erased_write(
        self, partition: int, key: bytes, stored: Stored, committed: CommittedOffsets | None
    ) -> StateWrite:
        """How an erased shopper is stored: a tombstone (RocksDB delete, null changelog record),
        unless some of its erased events are not committed yet.

        Those would be consumed again after a crash, and possibly after the request (Kafka orders
        no two topics): with no value left to say they were applied, they would bring the shopper
        back. Until they are committed, the value is an *erasure marker*: a state of no events
        with the applied offsets, which skips them; :meth:`streams.worker.sweeps.Sweeps.evict_idle`
        deletes it once they are.
        """
        if offsets_committed(stored.offsets, committed, skip_topic=self.erasure_topic):
            return StateWrite(partition, key, None)
        return StateWrite(partition, key, stored.encode())

    def _trace(self, headers: Headers) -> list[tuple[str, bytes]] | None:
        """The trigger event's trace context for its outputs; a malformed one is counted and dropped."""
        if not headers:
            return None
        try:
            return trace_headers(headers)
        except ValueError:
            self.metrics.trace_context_invalid.inc()
            return None

    def rescore_silent(self, stored: Iterable[tuple[int, bytes, bytes]], now_ms: int) -> BatchOutcome:
        """Score shoppers who went quiet, as of ``now_ms`` (wall clock): churn risk grows with silence.

        ``stored`` yields ``(partition, key, stored value)``; results and alerts come back as for
        events, with no trigger event. States and offsets are not changed; the live memory is
        (pending outcomes whose horizon passed resolve, the new scores are recorded), so every
        re-scored value is written back.
        """
        outcome = BatchOutcome()
        states: list[ShopperState] = []
        touched: list[Touched] = []
        for partition, key, raw in stored:
            user_id = key.decode(errors="replace")
            value = self._unwrap(raw, user_id)
            state = self._load(value.state, user_id)
            value.state = encode_state(state)  # unchanged, unless it had to be reset
            memory = self._load_memory(value.memory, user_id)
            outcome.live += memory.expire(now_ms - self.eval_config.grace_ms, self.eval_config)
            states.append(state)
            touched.append(Touched(state.user_id, key, partition, value, None, now_ms, memory))
        if states:
            self._score(states, touched, np.full(len(states), now_ms, dtype=np.int64), outcome)
        return outcome

    def _score(
        self, states: list[ShopperState], touched: list[Touched], now: np.ndarray, outcome: BatchOutcome
    ) -> None:
        """One forward pass per model (and per loaded challenger) for the batch, then per shopper: the
        results of its variant, the alert decision, and what the live memory records."""
        self.scorer.refresh()
        features = self.spec.matrix(states, now)
        if self.feature_watch is not None:  # the rows scored after events, as the drift reference has them
            self.feature_watch(features[[shopper.trigger_event_id is not None for shopper in touched]])
        started = time.perf_counter()
        scored = self.scorer.score(states, features)
        challengers = self._score_challengers(states, features)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        versions = self.scorer.model_versions
        champions = {kind: model_and_version(versions.get(name)) for kind, name in _VERSION_KEYS.items()}
        scored_at_ms = int(time.time() * 1000)
        alerting: list[tuple[int, float, str, str, str]] = []  # (index in batch, risk, alert id, group, variant)
        first = len(outcome.scored)
        for index, (shopper_in, state, champion) in enumerate(zip(touched, states, scored, strict=False)):
            memory = shopper_in.memory
            # The moment the scores are as of (the features' "now"): every event applied so far is at
            # or before it, so the live windows (t, t + horizon] start there, online and offline.
            as_of_ms = int(now[index])
            if shopper_in.resend and memory.score_seq:
                # The state already holds these events and the memory their scoring: this one is a
                # re-send of it (same score_seq and moment, nothing recorded again, no outcome twice).
                score_seq, as_of_ms = memory.score_seq, memory.scored_ms
            else:
                shopper_in.resend = False
                score_seq = memory.next_seq(as_of_ms)
            shopper_in.as_of_ms = t_ms = as_of_ms
            served = {
                kind: self._serve(kind, index, shopper_in, champion, champions[kind], challengers, outcome)
                for kind in _VERSION_KEYS
            }
            classifier_variant, scores, classifier_version = served[CLASSIFIER_MODEL]
            nextitem_variant, recommended, nextitem_version = served[NEXTITEM_MODEL]
            public_id = self.public_id(shopper_in.user_id)
            risk = scores.scores.get(CHURN)
            stored, group = shopper_in.stored, None
            if shopper_in.resend:
                # The stored alert state is already past this scoring: its scores message repeats
                # the scoring's own alert decision; the alert itself is not sent again (RELIABILITY.md).
                group = memory.scored_alert
            elif risk is not None:
                before = self._load_alert(stored.alert, shopper_in.user_id)
                after, fire = before.step(risk, scored_at_ms, self.alert_policy)
                stored.alert = after.encode()
                if fire:
                    held_out = in_share(shopper_in.user_id, self.alert_holdout_salt, self.alert_holdout_share)
                    group = HOLDOUT if held_out else ALERTED
                    memory.record_alert(group, t_ms)
                    outcome.held_out_alerts += group == HOLDOUT
                    cause = shopper_in.trigger_event_id or f"silent-since-{state.last_event_ms}"
                    alerting.append((index, risk, f"{public_id}:{cause}", group, classifier_variant))
            envelope = {
                "schema_version": OUTPUT_CONTRACT_VERSION,
                "user_id": public_id,
                "trigger_event_id": shopper_in.trigger_event_id,
                "trigger_ts": shopper_in.trigger_ts,
                "scored_at": scored_at_ms,
                "score_seq": score_seq,
                "as_of_ts": as_of_ms,
            }
            result = {
                **envelope,
                "variant": classifier_variant,
                "scores": {name: round(value, 6) for name, value in scores.scores.items()},
                "model_versions": versions,
                "feature_spec": self.spec.hash,
            }
            if classifier_variant == CHALLENGER:
                result["model_versions"] = {**versions, **dict.fromkeys(SCORES, classifier_version)}
            if group is not None:
                result["churn_alert"] = group
            out = ScoredShopper(
                shopper_in.user_id,
                shopper_in.key,
                _to_json(result).encode(),
                output_key=public_id.encode(),
                trigger_ts=shopper_in.trigger_ts if shopper_in.trigger_event_id is not None else None,
                headers=shopper_in.trace,
            )
            if recommended.recommendations:
                out.recommendation = _to_json(
                    {
                        **envelope,
                        "variant": nextitem_variant,
                        "items": [
                            {"item_id": item, "score": round(score, 6)} for item, score in recommended.recommendations
                        ],
                        "model_version": nextitem_version,
                    }
                ).encode()
            outcome.scored.append(out)
            if shopper_in.writes:
                stored.memory = memory.encode()
                outcome.writes.append(StateWrite(shopper_in.partition, shopper_in.key, stored.encode()))
            for name, value in scores.scores.items():
                self.metrics.score_values.labels(name).observe(value)
        if alerting:
            self._alerts(alerting, states, features, outcome, first, versions, scored_at_ms)

    def _score_challengers(
        self, states: list[ShopperState], features: np.ndarray
    ) -> dict[str, tuple[ChallengerSpec, list[ShopperScores]]]:
        """Model kind -> its loaded challenger and that challenger's predictions for the batch."""
        scorer = self.scorer
        if not isinstance(scorer, ChallengerScorer):
            return {}
        return {
            kind: (challenger, scorer.score_challenger(kind, states, features))
            for kind, challenger in scorer.challengers.items()
        }

    def _serve(
        self,
        kind: str,
        index: int,
        shopper_in: Touched,
        champion: ShopperScores,
        champion_version: tuple[str, str] | None,
        challengers: Mapping[str, tuple[ChallengerSpec, list[ShopperScores]]],
        outcome: BatchOutcome,
    ) -> tuple[str, ShopperScores, str | None]:
        """For one model kind and shopper: the variant served, its predictions and ``model:version``.

        Records in the shopper's memory what is measured: the served variant (a split challenger for
        the shoppers in its share, the champion otherwise) and, in shadow mode, the challenger too.
        """
        measured: list[tuple[str, tuple[str, str] | None, ShopperScores]] = [(CHAMPION, champion_version, champion)]
        if kind in challengers:
            challenger, predictions = challengers[kind]
            trial = (CHALLENGER, (challenger.model, challenger.version), predictions[index])
            if challenger.mode != "split":
                measured.append(trial)  # shadow: measured for every shopper, never published
            elif in_share(shopper_in.user_id, challenger.salt, challenger.share):
                measured = [trial]
        memory, t_ms = shopper_in.memory, shopper_in.as_of_ms
        for variant, version, predicted in measured:
            if version is None or shopper_in.resend:
                continue  # the heuristic: no churn or purchase score, no list
            if kind == CLASSIFIER_MODEL:
                for score in SCORES:
                    if score in predicted.scores:
                        p = round(predicted.scores[score], 6)  # as published: the offline recount reads that
                        outcome.live += memory.record_score(score, *version, variant, t_ms, p, self.eval_config)
            elif predicted.recommendations:
                items = [item for item, _ in predicted.recommendations]
                outcome.live += memory.record_list(variant, *version, t_ms, items, self.eval_config)
        variant, version, served = measured[0]
        return variant, served, None if version is None else ":".join(version)

    def _alerts(
        self,
        alerting: list[tuple[int, float, str, str, str]],
        states: list[ShopperState],
        features: np.ndarray,
        outcome: BatchOutcome,
        first: int,
        versions: dict[str, str],
        fired_at_ms: int,
    ) -> None:
        """Churn alert messages, with what a campaign needs: risk, reasons, last activity, value to date.

        A held-out shopper's alert is computed like any other and then withheld: not sent.
        """
        reasons = self.scorer.churn_reasons(features[[index for index, *_ in alerting]])
        for (index, risk, alert_id, group, variant), why in zip(alerting, reasons, strict=False):
            state = states[index]
            alert = _to_json(
                {
                    "schema_version": OUTPUT_CONTRACT_VERSION,
                    "alert_id": alert_id,
                    "user_id": self.public_id(state.user_id),
                    "variant": variant,
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
            if group == HOLDOUT:
                continue
            outcome.scored[first + index].alert = alert
            self.metrics.alerts_fired.inc()
            for name, _ in why:
                self.metrics.alert_reasons.labels(name).inc()

    def _load_memory(self, stored: bytes | None, user_id: str) -> LiveMemory:
        try:
            return LiveMemory.decode(stored)
        except ValueError as exc:
            self.metrics.state_decode_errors.inc()
            log.error("live evaluation memory of shopper %r: %s; starting it afresh", user_id, exc)
            return LiveMemory()

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


def offsets_committed(
    offsets: Mapping[tuple[str, int], int], committed: CommittedOffsets | None, skip_topic: str = ""
) -> bool:
    """Whether every applied offset (``skip_topic``'s aside) is below its partition's committed offset:
    then no restart consumes those messages again. ``committed`` None: nothing counts as committed."""
    for (topic, partition), offset in offsets.items():
        if topic == skip_topic:
            continue
        done = committed(topic, partition) if committed is not None else None
        if done is None or offset >= done:
            return False
    return True
