"""Live evaluation memory: what each shopper was told, and what they did next (issue #14 §1, §3).

Pure Python, no Kafka, no torch. Per shopper, a :class:`LiveMemory` (kept by the worker inside the
shopper's stored value, :mod:`streams.worker.envelope`) remembers

* per variant, the **last served top-K** (64-bit hashes of the item ids, model, version, time);
* the **pending scores** (churn risk, purchase propensity) with their time, probability, model,
  version and variant, at most :attr:`EvalConfig.max_pending` (the oldest is dropped first);
* the **pending alert returns**: alerted or held-out shoppers, until they return or lapse;
* a **ledger**: cumulative resolved counts, so the table summed over shoppers can be compared
  exactly with an offline recount (:func:`recount`).

The shopper's applied events resolve them (:meth:`LiveMemory.observe`), with the definitions of
:mod:`models.labels`, a prediction at time ``t`` (the ``as_of_ts`` of its output message: the
shopper's latest event time when scored, or the sweep's wall clock):

* **recommendation**: the shopper's next item interaction, the next *new entry* of
  :func:`models.labels.item_sequences` (a view or cart add of the item the sequence ends with is
  merged, an ordered item already in the cart since the last order upgrades its entry) with
  ``ts > t``; the outcome is its rank in the list (0: not in it). A list replaced by a newer one
  before such an interaction is no opportunity (the shopper was shown the newer one);
* **purchase**: positive on an order with ``ts`` in ``(t, t + purchase_horizon]``;
* **churn**: negative (the shopper returned) on any event with ``ts`` in ``(t, t + churn_horizon]``;
* **alert return**: returned on any event in ``(t, t + churn_horizon]``, else lapsed.

Those positive outcomes are final on sight whatever order events arrive in: one event inside the
window decides. The other outcome (no purchase, churned, lapsed) is decided once no event inside the
window can still be applied: when ``t + horizon < cutoff`` where cutoff is the shopper's watermark
minus the grace period (an older event would be LATE, :mod:`features.state`), or, for a silent
shopper, the wall clock minus the grace period (:meth:`LiveMemory.expire`, from the silent-shopper
sweep). Both give the outcome the next event would give, and the outcome the offline labels give:
nothing inside the window was applied, and nothing inside it can be any more, provided events reach
the worker within the grace period, the same bound under which the shopper's state equals the
offline replay (:mod:`features.offline`). A recommendation resolves at the first new entry in the
order the worker applies events: equal to the offline order when a shopper's events arrive in
event-time order (each batch is sorted so). An event applied at or before the time of an event of an
earlier batch arrived out of order: it is counted (:class:`OutOfOrder`, in the ledger and a metric),
since from it on that shopper's recommendation outcomes may differ from the offline recount (which
sorts); its scores and alert outcomes never do.
"""

from __future__ import annotations

import math
import struct
from bisect import insort
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

from features.events import KIND_CART_ADD, KIND_ORDER, KIND_VIEW, Event
from features.state import DAY_MS, HOUR_MS, event_id_hash
from models.variants import CHAMPION, VARIANTS

#: Score names measured (as in :mod:`models.scoring`, which this pure module must not import: torch).
CHURN = "churn_risk"
PURCHASE = "purchase_propensity"
SCORES: tuple[str, ...] = (CHURN, PURCHASE)

POSITIVE, NEGATIVE = "positive", "negative"
ALERTED, HOLDOUT = "alerted", "holdout"
GROUPS: tuple[str, ...] = (ALERTED, HOLDOUT)
RETURNED, LAPSED = "returned", "lapsed"
#: Ranks the ledger keeps (hit@5, hit@10 and NDCG@10 are all sums over ranks 1..10).
MAX_RANK = 10

_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """Horizons and bounds of the live evaluation (all times in ms).

    Attributes:
        purchase_horizon_ms / churn_horizon_ms: as :class:`models.labels.LabelConfig` (24 h, 14 d).
        grace_ms: the state's out-of-order tolerance (:class:`features.state.StateConfig`).
        max_pending: pending scores kept per shopper; beyond it the oldest is dropped (and counted).
        max_since_order: item hashes kept since the shopper's last order (beyond it the oldest are
            forgotten: an order of such an item then counts as a new interaction).
    """

    purchase_horizon_ms: int = DAY_MS
    churn_horizon_ms: int = 14 * DAY_MS
    grace_ms: int = HOUR_MS
    max_pending: int = 32
    max_since_order: int = 64

    def horizon_ms(self, score: str) -> int:
        return self.churn_horizon_ms if score == CHURN else self.purchase_horizon_ms


@lru_cache(maxsize=1 << 16)
def item_hash(item_id: str) -> int:
    """The 64-bit hash a served list keeps per item (the stable blake2b of :func:`features.state.event_id_hash`);
    cached, since a catalogue's items recur in every list."""
    return event_id_hash(item_id)


def decile(probability: float) -> int:
    """``floor(10 p)``, with 1.0 in decile 9 (the contract's ``decile`` label)."""
    return min(9, max(0, int(math.floor(probability * 10))))


def gain(rank: int) -> float:
    """NDCG@10 gain of a hit at ``rank`` (from 1): ``1 / log2(rank + 1)``; 0 for a miss or a rank past 10."""
    return 1.0 / math.log2(rank + 1) if 1 <= rank <= MAX_RANK else 0.0


# ------------------------------------------------------------------------------ outcomes
@dataclass(frozen=True, slots=True)
class RecommendationOutcome:
    """A served list resolved by the next interaction: ``rank`` from 1, 0 when the item was not in it."""

    model: str
    version: str
    variant: str
    rank: int


@dataclass(frozen=True, slots=True)
class ScoreOutcome:
    """A pending score resolved: ``positive`` is the label (churned; purchased)."""

    model: str
    version: str
    variant: str
    score: str
    probability: float
    positive: bool


@dataclass(frozen=True, slots=True)
class AlertOutcome:
    """An alerted or held-out shopper who returned within the churn horizon, or did not."""

    group: str
    returned: bool


@dataclass(frozen=True, slots=True)
class PendingDropped:
    """A pending score dropped by the cap before it resolved."""

    score: str


@dataclass(frozen=True, slots=True)
class OutOfOrder:
    """An event applied after one with a later (or equal) time from an earlier batch (module docstring)."""


Outcome = RecommendationOutcome | ScoreOutcome | AlertOutcome | PendingDropped | OutOfOrder


# ------------------------------------------------------------------------------ ledger
def _ledger_keys() -> tuple[tuple[str, ...], ...]:
    keys: list[tuple[str, ...]] = []
    for variant in VARIANTS:
        keys.append(("recommendation", variant, "opportunities"))
        keys.extend(("recommendation", variant, f"rank{rank}") for rank in range(1, MAX_RANK + 1))
        keys.extend(("score", variant, score, outcome) for score in SCORES for outcome in (POSITIVE, NEGATIVE))
    keys.extend(("alert", group, outcome) for group in GROUPS for outcome in (RETURNED, LAPSED))
    keys.extend(("dropped", score) for score in SCORES)
    keys.append(("out_of_order",))
    return tuple(keys)


#: Every ledger key; its position is its code in the encoding (append only).
LEDGER_KEYS = _ledger_keys()
_LEDGER_CODE = {key: code for code, key in enumerate(LEDGER_KEYS)}


def ledger_key(outcome: Outcome) -> tuple[tuple[str, ...], ...]:
    """The ledger keys one outcome adds 1 to (no version: a ledger outlives model versions)."""
    if isinstance(outcome, RecommendationOutcome):
        opportunity = ("recommendation", outcome.variant, "opportunities")
        if 1 <= outcome.rank <= MAX_RANK:
            return opportunity, ("recommendation", outcome.variant, f"rank{outcome.rank}")
        return (opportunity,)
    if isinstance(outcome, ScoreOutcome):
        return (("score", outcome.variant, outcome.score, POSITIVE if outcome.positive else NEGATIVE),)
    if isinstance(outcome, AlertOutcome):
        return (("alert", outcome.group, RETURNED if outcome.returned else LAPSED),)
    if isinstance(outcome, OutOfOrder):
        return (("out_of_order",),)
    return (("dropped", outcome.score),)


def metric_increments(outcomes: Iterable[Outcome], held_out_alerts: int = 0) -> dict[tuple[str, ...], float]:
    """What ``outcomes`` add to each ``shoppulse_live_*`` series: ``(metric, *label values)`` -> amount.

    The worker adds these to its counters; a test adds up a recount's the same way and compares.
    Label order: model, version, variant, then k / score, decile, outcome / group, outcome.
    """
    out: dict[tuple[str, ...], float] = {}

    def add(amount: float, *key: str) -> None:
        out[key] = out.get(key, 0.0) + amount

    for o in outcomes:
        if isinstance(o, RecommendationOutcome):
            served = (o.model, o.version, o.variant)
            add(1, "shoppulse_live_recommendation_opportunities_total", *served)
            for k in (5, 10):
                if 1 <= o.rank <= k:
                    add(1, "shoppulse_live_recommendation_hits_total", *served, str(k))
            add(gain(o.rank), "shoppulse_live_recommendation_gain_total", *served)
        elif isinstance(o, ScoreOutcome):
            score = (o.model, o.version, o.variant, o.score)
            cell = (*score, str(decile(o.probability)), POSITIVE if o.positive else NEGATIVE)
            add(1, "shoppulse_live_score_outcomes_total", *cell)
            add(o.probability, "shoppulse_live_score_probability_sum_total", *cell)
            add((o.probability - float(o.positive)) ** 2, "shoppulse_live_score_brier_sum_total", *score)
        elif isinstance(o, AlertOutcome):
            add(1, "shoppulse_live_alert_returns_total", o.group, RETURNED if o.returned else LAPSED)
        elif isinstance(o, OutOfOrder):
            add(1, "shoppulse_live_out_of_order_events_total")
        else:
            add(1, "shoppulse_live_pending_dropped_total", o.score)
    if held_out_alerts:
        add(held_out_alerts, "shoppulse_live_alerts_held_out_total")
    return out


def tally(outcomes: Iterable[Outcome]) -> dict[tuple[str, ...], int]:
    """Ledger counts of a sequence of outcomes (what :func:`recount` compares with summed ledgers)."""
    counts: dict[tuple[str, ...], int] = {}
    for outcome in outcomes:
        for key in ledger_key(outcome):
            counts[key] = counts.get(key, 0) + 1
    return counts


# ------------------------------------------------------------------------------ memory
@dataclass(slots=True)
class ServedList:
    """A variant's last served top-K, not yet resolved."""

    model: str
    version: str
    t_ms: int
    items: tuple[int, ...]


class PendingScore(NamedTuple):
    """A published (or shadow) score waiting for its outcome (a tuple: thousands are decoded per batch)."""

    score: str
    model: str
    version: str
    variant: str
    t_ms: int
    probability: float


@dataclass(slots=True)
class LiveMemory:
    """One shopper's evaluation memory (module docstring). Not thread-safe, like the state it sits with.

    Attributes:
        score_seq: scorings of this shopper so far (the outputs' ``score_seq``).
        scored_ms: the time ``t`` of the last scoring (what a re-send after a replay repeats).
        tail_item: hash of the item the shopper's interaction sequence ends with (0: none yet).
        since_order: hashes of the items interacted with since the last order (oldest first).
        lists: variant -> its last served list, until the next interaction resolves it.
        pending: pending scores, sorted by time (the cap drops the first).
        alerts: ``(group, t_ms)`` of alerts (sent or held out) waiting for a return or a lapse.
        ledger: :data:`LEDGER_KEYS` -> resolved count.
    """

    score_seq: int = 0
    scored_ms: int = 0
    tail_item: int = 0
    since_order: list[int] = field(default_factory=list)
    lists: dict[str, ServedList] = field(default_factory=dict)
    pending: list[PendingScore] = field(default_factory=list)
    alerts: list[tuple[str, int]] = field(default_factory=list)
    ledger: dict[tuple[str, ...], int] = field(default_factory=dict)

    # -------------------------------------------------------------- recording
    def next_seq(self, t_ms: int) -> int:
        """Counts a scoring at ``t_ms``; the number its outputs carry (a replay from the same stored
        memory repeats it)."""
        self.score_seq += 1
        self.scored_ms = t_ms
        return self.score_seq

    def record_list(self, variant: str, model: str, version: str, t_ms: int, item_ids: Iterable[str]) -> None:
        """Remember a served top-K; it replaces the variant's previous, unresolved one."""
        self.lists[variant] = ServedList(model, version, t_ms, tuple(item_hash(item) for item in item_ids))

    def record_score(
        self, score: str, model: str, version: str, variant: str, t_ms: int, probability: float, config: EvalConfig
    ) -> list[Outcome]:
        """Remember a score; returns a :class:`PendingDropped` when the cap pushed the oldest one out."""
        insort(self.pending, PendingScore(score, model, version, variant, t_ms, probability), key=_pending_order)
        if len(self.pending) <= config.max_pending:
            return []
        return self._count([PendingDropped(self.pending.pop(0).score)])

    def record_alert(self, group: str, t_ms: int) -> None:
        """Remember a churn alert (sent: ``alerted``; withheld: ``holdout``) until the shopper returns or lapses."""
        self.alerts.append((group, t_ms))

    # -------------------------------------------------------------- resolving
    def observe(self, event: Event, watermark_ms: int, config: EvalConfig, in_order: bool = True) -> list[Outcome]:
        """Resolve what the applied ``event`` decides, then what the new ``watermark_ms`` (the state's
        latest event time, after the event) puts beyond reach. Call for APPLIED events only;
        ``in_order``: False when the event is not later than every event of earlier batches."""
        outcomes: list[Outcome] = [] if in_order else [OutOfOrder()]
        ts = event.ts_ms
        entry = self._advance_sequence(event, config)
        if entry is not None:
            for variant, served in list(self.lists.items()):
                if ts > served.t_ms:
                    rank = served.items.index(entry) + 1 if entry in served.items else 0
                    outcomes.append(RecommendationOutcome(served.model, served.version, variant, rank))
                    del self.lists[variant]
        if self.pending:
            kept: list[PendingScore] = []
            for pending in self.pending:
                inside = pending.t_ms < ts <= pending.t_ms + config.horizon_ms(pending.score)
                if inside and pending.score == CHURN:  # any event: the shopper did not churn
                    outcomes.append(_resolved(pending, positive=False))
                elif inside and event.kind == KIND_ORDER:  # purchase: an order inside the horizon
                    outcomes.append(_resolved(pending, positive=True))
                else:
                    kept.append(pending)
            self.pending = kept
        if self.alerts:
            returned = [(g, t) for g, t in self.alerts if t < ts <= t + config.churn_horizon_ms]
            outcomes.extend(AlertOutcome(group, True) for group, _ in returned)
            self.alerts = [alert for alert in self.alerts if alert not in returned]
        outcomes.extend(self.expire(watermark_ms - config.grace_ms, config, count=False))
        return self._count(outcomes)

    def expire(self, cutoff_ms: int, config: EvalConfig, count: bool = True) -> list[Outcome]:
        """Resolve the pending scores and alerts whose whole window ends before ``cutoff_ms``: no event
        inside it can be applied any more (module docstring), so the quiet outcome is final."""
        outcomes: list[Outcome] = []
        if self.pending:
            kept = []
            for pending in self.pending:
                if pending.t_ms + config.horizon_ms(pending.score) < cutoff_ms:
                    outcomes.append(_resolved(pending, positive=pending.score == CHURN))
                else:
                    kept.append(pending)
            self.pending = kept
        if self.alerts:
            lapsed = [(g, t) for g, t in self.alerts if t + config.churn_horizon_ms < cutoff_ms]
            outcomes.extend(AlertOutcome(group, False) for group, _ in lapsed)
            self.alerts = [alert for alert in self.alerts if alert not in lapsed]
        return self._count(outcomes) if count else outcomes

    def _advance_sequence(self, event: Event, config: EvalConfig) -> int | None:
        """Fold the event into the interaction-sequence tail as :func:`models.labels.item_sequences`
        does; the hash of the first new entry it appends, or None (merged, upgraded, no item)."""
        kind = event.kind
        if kind == KIND_VIEW or kind == KIND_CART_ADD:
            item = item_hash(event.item_id or "")
            if item == self.tail_item:
                return None  # merged into the last entry
            self._append(item, config)
            return item
        if kind != KIND_ORDER:
            return None  # cart removes are no interaction
        since = set(self.since_order)
        first: int | None = None
        for line in event.order_lines:
            item = item_hash(line.item_id)
            if item in since or item == self.tail_item:
                continue  # upgrades an entry of the cart
            self._append(item, config)
            since.add(item)
            if first is None:
                first = item
        self.since_order = []
        return first

    def _append(self, item: int, config: EvalConfig) -> None:
        self.tail_item = item
        self.since_order.append(item)
        if len(self.since_order) > config.max_since_order:
            del self.since_order[0]

    def _count(self, outcomes: list[Outcome]) -> list[Outcome]:
        ledger = self.ledger
        for outcome in outcomes:
            for key in ledger_key(outcome):
                ledger[key] = ledger.get(key, 0) + 1
        return outcomes

    # -------------------------------------------------------------- bytes
    def encode(self) -> bytes:
        """Compact bytes (little-endian; model and version strings written once per value)."""
        strings: dict[str, int] = {}
        setdefault = strings.setdefault

        def ref(text: str) -> int:
            return setdefault(text, len(strings))

        body = bytearray()
        body += _U8.pack(len(self.lists))
        for variant, served in sorted(self.lists.items()):
            body += _LIST.pack(VARIANTS.index(variant), ref(served.model), ref(served.version), served.t_ms)
            body += _U8.pack(len(served.items))
            body += struct.pack(f"<{len(served.items)}Q", *served.items)
        body += _U8.pack(len(self.pending))
        pack, codes = _PENDING.pack, _PENDING_CODE
        body += b"".join(
            [
                pack(
                    codes[p.score, p.variant],
                    setdefault(p.model, len(strings)),
                    setdefault(p.version, len(strings)),
                    p.t_ms,
                    p.probability,
                )
                for p in self.pending
            ]
        )
        body += _U8.pack(len(self.alerts))
        for group, t_ms in self.alerts:
            body += _ALERT.pack(GROUPS.index(group), t_ms)
        counts = [(_LEDGER_CODE[key], n) for key, n in self.ledger.items() if n]
        body += _U8.pack(len(counts))
        for code, n in sorted(counts):
            body += _U8.pack(code)
            _put_varint(body, n)
        head = bytearray(_U8.pack(_FORMAT_VERSION))
        _put_varint(head, self.score_seq)
        head += _I64.pack(self.scored_ms)
        head += _TAIL.pack(self.tail_item, len(self.since_order))
        head += struct.pack(f"<{len(self.since_order)}Q", *self.since_order)
        if len(strings) > 255:
            raise ValueError("more than 255 model and version strings in one shopper's memory")
        head += _U8.pack(len(strings))
        for text in strings:  # insertion order = reference order
            raw = text.encode()[:255]
            head += _U8.pack(len(raw)) + raw
        return bytes(head + body)

    @classmethod
    def decode(cls, data: bytes | None) -> LiveMemory:
        """The memory; a fresh one for None. ValueError on bytes of another format or cut short."""
        if not data:
            return cls()
        try:
            return _decode(data)
        except (IndexError, struct.error, UnicodeDecodeError, KeyError) as exc:
            raise ValueError(f"live memory of {len(data)} bytes is corrupt: {exc}") from None


def _pending_order(pending: PendingScore) -> int:
    return pending.t_ms


def _resolved(pending: PendingScore, positive: bool) -> ScoreOutcome:
    return ScoreOutcome(pending.model, pending.version, pending.variant, pending.score, pending.probability, positive)


_U8 = struct.Struct("<B")
_I64 = struct.Struct("<q")
_TAIL = struct.Struct("<QB")  # tail item hash, number of since-order hashes
_LIST = struct.Struct("<BBBq")  # variant, model ref, version ref, t_ms
_PENDING = struct.Struct("<BBBqd")  # score | variant << 1, model ref, version ref, t_ms, probability
_ALERT = struct.Struct("<Bq")  # group, t_ms
#: A pending score's ``(score, variant)`` <-> its code in the encoding (score | variant << 1).
_PENDING_KIND = [(score, variant) for variant in VARIANTS for score in SCORES]
_PENDING_CODE = {kind: code for code, kind in enumerate(_PENDING_KIND)}


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _get_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


class _Reader:
    """A cursor over encoded bytes."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, layout: struct.Struct) -> tuple:
        values = layout.unpack_from(self.data, self.at)
        self.at += layout.size
        return values

    def u8(self) -> int:
        self.at += 1
        return self.data[self.at - 1]

    def hashes(self, n: int) -> tuple[int, ...]:
        return self.take(struct.Struct(f"<{n}Q"))

    def varint(self) -> int:
        value, self.at = _get_varint(self.data, self.at)
        return value


def _decode(data: bytes) -> LiveMemory:
    read = _Reader(data)
    if (version := read.u8()) != _FORMAT_VERSION:
        raise ValueError(f"live memory format {version}; this release reads {_FORMAT_VERSION}")
    memory = LiveMemory(score_seq=read.varint())
    (memory.scored_ms,) = read.take(_I64)
    memory.tail_item, n_since = read.take(_TAIL)
    memory.since_order = list(read.hashes(n_since))
    strings: list[str] = []
    for _ in range(read.u8()):
        length = read.u8()
        strings.append(bytes(data[read.at : read.at + length]).decode())
        read.at += length
    for _ in range(read.u8()):
        variant, model, version, t_ms = read.take(_LIST)
        items = read.hashes(read.u8())
        memory.lists[VARIANTS[variant]] = ServedList(strings[model], strings[version], t_ms, items)
    size = read.u8() * _PENDING.size
    if read.at + size > len(data):
        raise ValueError("pending scores cut short")
    kinds = _PENDING_KIND
    memory.pending = [
        PendingScore(kinds[code][0], strings[model], strings[version], kinds[code][1], t_ms, probability)
        for code, model, version, t_ms, probability in _PENDING.iter_unpack(data[read.at : read.at + size])
    ]
    read.at += size
    for _ in range(read.u8()):
        group, t_ms = read.take(_ALERT)
        memory.alerts.append((GROUPS[group], t_ms))
    for _ in range(read.u8()):
        key = LEDGER_KEYS[read.u8()]
        memory.ledger[key] = read.varint()
    if read.at != len(data):
        raise ValueError(f"{len(data) - read.at} trailing bytes")
    return memory


# ------------------------------------------------------------------------------ offline recount
@dataclass(frozen=True, slots=True)
class ServedPrediction:
    """What an output message says was served or measured for a shopper (:func:`recount`'s input).

    ``scores`` holds churn risk and purchase propensity as published (rounded); ``items`` the
    recommended item ids; ``alert_group`` is set when that scoring raised a churn alert.
    """

    user_id: str
    score_seq: int
    t_ms: int
    variant: str = CHAMPION
    classifier: tuple[str, str] | None = None  # (model, version) of the scores
    scores: Mapping[str, float] = field(default_factory=dict)
    recommender: tuple[str, str] | None = None  # (model, version) of the items
    items: tuple[str, ...] = ()
    recommendation_variant: str = CHAMPION
    alert_group: str | None = None


def predictions_from_outputs(
    scores: Iterable[Mapping[str, Any]], recommendations: Iterable[Mapping[str, Any]]
) -> list[ServedPrediction]:
    """The served predictions of decoded scores and recommendations messages (docs/outputs.md).

    Deduplicated by ``(user_id, score_seq)``, the last message of each topic winning: after a
    crash the replay re-sends a number, and its last message is the scoring the stored state kept.
    """
    by_seq: dict[tuple[str, int], dict[str, Any]] = {}
    for doc in scores:
        by_seq.setdefault((doc["user_id"], doc["score_seq"]), {})["scores"] = doc
    for doc in recommendations:
        by_seq.setdefault((doc["user_id"], doc["score_seq"]), {})["recommendation"] = doc
    out = []
    for (user, seq), docs in by_seq.items():
        score, rec = docs.get("scores"), docs.get("recommendation")
        any_doc = score or rec
        assert any_doc is not None
        classifier = model_and_version(score["model_versions"].get(CHURN)) if score else None
        out.append(
            ServedPrediction(
                user,
                seq,
                any_doc["as_of_ts"],
                variant=score["variant"] if score else CHAMPION,
                classifier=classifier,
                scores={name: p for name, p in score["scores"].items() if name in SCORES} if score else {},
                recommender=model_and_version(rec["model_version"]) if rec else None,
                items=tuple(item["item_id"] for item in rec["items"]) if rec else (),
                recommendation_variant=rec["variant"] if rec else CHAMPION,
                alert_group=score.get("churn_alert") if score else None,
            )
        )
    return out


def model_and_version(entry: str | None) -> tuple[str, str] | None:
    """``(model, version)`` of a ``model:version`` entry of an output's versions; None when absent."""
    if entry is None or ":" not in entry:
        return None
    model, version = entry.split(":", 1)
    return model, version


def recount(
    events: Iterable[Event],
    predictions: Iterable[ServedPrediction],
    config: EvalConfig = EvalConfig(),
    swept_at_ms: int | None = None,
) -> list[Outcome]:
    """Every outcome of :func:`recount_by_shopper`, in one list."""
    return [o for outcomes in recount_by_shopper(events, predictions, config, swept_at_ms).values() for o in outcomes]


def recount_by_shopper(
    events: Iterable[Event],
    predictions: Iterable[ServedPrediction],
    config: EvalConfig = EvalConfig(),
    swept_at_ms: int | None = None,
) -> dict[str, list[Outcome]]:
    """Every outcome, recomputed offline from the valid events and the served predictions.

    Per shopper, events are taken in event-time order (ties by event-id hash, as the offline replay
    folds them; a repeated event id counts once) and each prediction, in ``score_seq`` order, right
    after the events with ``ts <= t`` (those the worker had applied when it scored). Predictions must
    be deduplicated by ``(user_id, score_seq)`` already: the last message wins, as it is the one the
    stored state kept. ``swept_at_ms``: wall clock of a silent-shopper sweep that ran after the log.
    """
    events_by_user: dict[str, dict[str, Event]] = {}
    for event in sorted(events, key=lambda e: (e.ts_ms, event_id_hash(e.event_id))):
        events_by_user.setdefault(event.user_id, {}).setdefault(event.event_id, event)
    served_by_user: dict[str, list[ServedPrediction]] = {}
    for prediction in predictions:
        served_by_user.setdefault(prediction.user_id, []).append(prediction)
    outcomes: dict[str, list[Outcome]] = {}
    for user in events_by_user.keys() | served_by_user.keys():
        served = sorted(served_by_user.get(user, []), key=lambda p: p.score_seq)
        events_of = list(events_by_user.get(user, {}).values())
        outcomes[user] = _recount_shopper(events_of, served, config, swept_at_ms)
    return outcomes


def _recount_shopper(
    events: list[Event], served: list[ServedPrediction], config: EvalConfig, swept_at_ms: int | None
) -> list[Outcome]:
    """One shopper's outcomes: sorted events, each prediction after the events with ``ts <= t``."""
    memory, watermark_ms, at, outcomes = LiveMemory(), 0, 0, []
    for prediction in [*served, None]:
        limit_ms = math.inf if prediction is None else prediction.t_ms
        while at < len(events) and events[at].ts_ms <= limit_ms:
            watermark_ms = max(watermark_ms, events[at].ts_ms)
            outcomes += memory.observe(events[at], watermark_ms, config)
            at += 1
        if prediction is not None:
            outcomes += replay_prediction(memory, prediction, config)
    if swept_at_ms is not None:
        outcomes += memory.expire(swept_at_ms - config.grace_ms, config)
    return outcomes


def replay_prediction(memory: LiveMemory, served: ServedPrediction, config: EvalConfig) -> list[Outcome]:
    """Record one served prediction into ``memory`` as the worker does when it scores."""
    outcomes: list[Outcome] = []
    if served.classifier is not None:
        model, version = served.classifier
        for score in SCORES:
            if score in served.scores:
                outcomes += memory.record_score(
                    score, model, version, served.variant, served.t_ms, served.scores[score], config
                )
    if served.recommender is not None and served.items:
        model, version = served.recommender
        memory.record_list(served.recommendation_variant, model, version, served.t_ms, served.items)
    if served.alert_group is not None:
        memory.record_alert(served.alert_group, served.t_ms)
    return outcomes
