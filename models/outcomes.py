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
  :func:`models.labels.item_sequences` in event-time order (a view or cart add of the item the
  sequence ends with is merged, an ordered item already in the cart since the last order upgrades
  its entry) after the list was served; the outcome is its rank in the list (0: not in it). A list
  replaced by a newer one before such an interaction is no opportunity (the shopper was shown the
  newer one);
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
offline replay (:mod:`features.offline`).

The interaction sequence, unlike a window, depends on the order of its events (merges, upgrades),
so recommendations are decided the same way: an applied item interaction waits in a small buffer
(:attr:`LiveMemory.buffer`, in canonical order: time, then event-id hash) until it falls behind the
cutoff, and only then is it folded into the sequence, in that order, resolving the served lists it
follows. A list is therefore counted up to one grace period after its resolving event, and its
outcome is a pure function of the accepted events, whatever order they arrived in. Served lists
wait per variant (:attr:`LiveMemory.lists`) with their *placement*: the latest time of any
prediction recorded up to and including theirs, since the offline recount records a prediction
right after the events at or before it. Bounds: :attr:`EvalConfig.max_buffered` buffered
interactions (beyond it the oldest is folded early) and :attr:`EvalConfig.max_lists` waiting lists
per variant (beyond it the oldest is dropped, a :class:`PendingDropped` of ``"recommendation"``).
An interaction applied behind one already folded (after the buffer cap folded early, or after a
silent-shopper sweep folded by wall clock an event that then arrived more than a grace period
late) is folded out of order and counted (:class:`OutOfOrder`, in the ledger and a metric): from
it on that shopper's recommendation outcomes may differ from the offline recount.
"""

from __future__ import annotations

import math
import struct
from bisect import bisect_left, insort
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
#: The :class:`PendingDropped` name of a served list dropped by :attr:`EvalConfig.max_lists`.
RECOMMENDATION = "recommendation"

_FORMAT_VERSION = 3


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """Horizons and bounds of the live evaluation (all times in ms).

    Attributes:
        purchase_horizon_ms / churn_horizon_ms: as :class:`models.labels.LabelConfig` (24 h, 14 d).
        grace_ms: the state's out-of-order tolerance (:class:`features.state.StateConfig`).
        max_pending: pending scores kept per shopper; beyond it the oldest is dropped (and counted).
        max_since_order: item hashes kept since the shopper's last order (beyond it the oldest are
            forgotten: an order of such an item then counts as a new interaction).
        max_buffered: item interactions kept within the grace period (the state's ``dedup_ids``
            bound); beyond it the oldest is folded into the sequence early.
        max_lists: served lists waiting per variant (those served within about one grace period:
            at most one per scoring, which needs an applied event); beyond it the oldest is dropped
            (and counted).
    """

    purchase_horizon_ms: int = DAY_MS
    churn_horizon_ms: int = 14 * DAY_MS
    grace_ms: int = HOUR_MS
    max_pending: int = 32
    max_since_order: int = 64
    max_buffered: int = 64
    max_lists: int = 64

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
    """A pending score (or a served list: ``score`` is :data:`RECOMMENDATION`) dropped by its cap
    before it resolved."""

    score: str


@dataclass(frozen=True, slots=True)
class OutOfOrder:
    """An item interaction folded after a later one had been folded already (module docstring)."""


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
    keys.append(("dropped", RECOMMENDATION))
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
    """A served top-K, not yet resolved; ``placed_ms``: its placement (module docstring)."""

    model: str
    version: str
    placed_ms: int
    items: tuple[int, ...]


class Interaction(NamedTuple):
    """An applied item interaction waiting for the cutoff (a view or cart add, or an order).

    ``items``: the item hash (view, cart add) or those of the order lines, in line order."""

    ts_ms: int
    id_hash: int
    is_order: bool
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
        scored_alert: the alert group the last scoring raised, or None (what its re-send repeats: a
            later scoring can share its ``t``, so the pending alerts cannot tell which raised one).
        placed_ms: the latest time of a prediction recorded so far (a list's placement).
        tail_item: hash of the item the shopper's folded interaction sequence ends with (0: none yet).
        since_order: hashes of the items folded since the last order (oldest first).
        folded: ``(ts_ms, id_hash)`` of the last interaction folded into the sequence.
        buffer: applied interactions not yet folded, in canonical order (time, event-id hash).
        lists: variant -> its served lists waiting for an interaction, in the order served.
        pending: pending scores, sorted by time (the cap drops the first).
        alerts: ``(group, t_ms)`` of alerts (sent or held out) waiting for a return or a lapse.
        ledger: :data:`LEDGER_KEYS` -> resolved count.
    """

    score_seq: int = 0
    scored_ms: int = 0
    scored_alert: str | None = None
    placed_ms: int = 0
    tail_item: int = 0
    since_order: list[int] = field(default_factory=list)
    folded: tuple[int, int] = (0, 0)
    buffer: list[Interaction] = field(default_factory=list)
    lists: dict[str, list[ServedList]] = field(default_factory=dict)
    pending: list[PendingScore] = field(default_factory=list)
    alerts: list[tuple[str, int]] = field(default_factory=list)
    ledger: dict[tuple[str, ...], int] = field(default_factory=dict)

    # -------------------------------------------------------------- recording
    def next_seq(self, t_ms: int) -> int:
        """Counts a scoring at ``t_ms``; the number its outputs carry (a replay from the same stored
        memory repeats it)."""
        self.score_seq += 1
        self.scored_ms = t_ms
        self.scored_alert = None
        self.placed_ms = max(self.placed_ms, t_ms)
        return self.score_seq

    def record_list(
        self, variant: str, model: str, version: str, t_ms: int, item_ids: Iterable[str], config: EvalConfig
    ) -> list[Outcome]:
        """Remember a served top-K after the variant's waiting ones (the first new interaction after
        its placement resolves it, or it is replaced); a :class:`PendingDropped` when the cap pushed
        the oldest waiting list out."""
        self.placed_ms = max(self.placed_ms, t_ms)
        waiting = self.lists.setdefault(variant, [])
        waiting.append(ServedList(model, version, self.placed_ms, tuple(item_hash(item) for item in item_ids)))
        if len(waiting) <= config.max_lists:
            return []
        del waiting[0]
        return self._count([PendingDropped(RECOMMENDATION)])

    def record_score(
        self, score: str, model: str, version: str, variant: str, t_ms: int, probability: float, config: EvalConfig
    ) -> list[Outcome]:
        """Remember a score; returns a :class:`PendingDropped` when the cap pushed the oldest one out."""
        insort(self.pending, PendingScore(score, model, version, variant, t_ms, probability), key=_pending_order)
        if len(self.pending) <= config.max_pending:
            return []
        return self._count([PendingDropped(self.pending.pop(0).score)])

    def record_alert(self, group: str, t_ms: int) -> None:
        """Remember a churn alert (sent: ``alerted``; withheld: ``holdout``) of the last scoring until
        the shopper returns or lapses."""
        self.alerts.append((group, t_ms))
        self.scored_alert = group

    # -------------------------------------------------------------- resolving
    def observe(self, event: Event, watermark_ms: int, config: EvalConfig) -> list[Outcome]:
        """Resolve what the applied ``event`` decides, then what the new ``watermark_ms`` (the state's
        latest event time, after the event) puts beyond reach. Call for APPLIED events only."""
        outcomes: list[Outcome] = []
        ts = event.ts_ms
        if event.kind in (KIND_VIEW, KIND_CART_ADD, KIND_ORDER):
            outcomes += self._buffer(event, config)
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
        """Resolve what no event at or after ``cutoff_ms`` can change any more (module docstring): fold
        the buffered interactions before it, drop the lists replaced before it, and give the pending
        scores and alerts whose whole window ends before it their quiet outcome."""
        outcomes: list[Outcome] = []
        while self.buffer and self.buffer[0].ts_ms < cutoff_ms:
            outcomes += self._fold(self.buffer.pop(0), config)
        for waiting in self.lists.values():
            # every interaction up to the next list's placement is folded: none resolved this one
            while len(waiting) > 1 and waiting[1].placed_ms < cutoff_ms:
                del waiting[0]
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

    def _buffer(self, event: Event, config: EvalConfig) -> list[Outcome]:
        """Keep an applied item interaction until the cutoff passes it; counts one that arrived behind
        an interaction already folded, and folds the oldest early beyond the cap."""
        if event.kind == KIND_ORDER:
            items = tuple(item_hash(line.item_id) for line in event.order_lines)
        else:
            items = (item_hash(event.item_id or ""),)
        interaction = Interaction(event.ts_ms, event_id_hash(event.event_id), event.kind == KIND_ORDER, items)
        insort(self.buffer, interaction, key=_canonical)
        outcomes: list[Outcome] = [OutOfOrder()] if _canonical(interaction) < self.folded else []
        if len(self.buffer) > config.max_buffered:
            outcomes += self._fold(self.buffer.pop(0), config)
        return outcomes

    def _fold(self, interaction: Interaction, config: EvalConfig) -> list[Outcome]:
        """Fold an interaction into the sequence; a new entry resolves, per variant, the latest list
        placed before it (the older ones were replaced)."""
        self.folded = max(self.folded, _canonical(interaction))
        entry = self._advance_sequence(interaction, config)
        if entry is None:
            return []
        outcomes: list[Outcome] = []
        for variant, waiting in list(self.lists.items()):
            before = bisect_left(waiting, interaction.ts_ms, key=_placement)
            if before:
                served = waiting[before - 1]
                rank = served.items.index(entry) + 1 if entry in served.items else 0
                outcomes.append(RecommendationOutcome(served.model, served.version, variant, rank))
                del waiting[:before]
                if not waiting:
                    del self.lists[variant]
        return outcomes

    def _advance_sequence(self, interaction: Interaction, config: EvalConfig) -> int | None:
        """Fold the interaction into the sequence tail as :func:`models.labels.item_sequences` does;
        the hash of the first new entry it appends, or None (merged, upgraded, no line)."""
        if not interaction.is_order:
            (item,) = interaction.items
            if item == self.tail_item:
                return None  # merged into the last entry
            self._append(item, config)
            return item
        since = set(self.since_order)
        first: int | None = None
        for item in interaction.items:
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
        body += _U8.pack(len(self.buffer))
        for ts_ms, id_hash, is_order, items in self.buffer:
            body += _with_hashes(_INTERACTION, len(items)).pack(ts_ms, id_hash, is_order, len(items), *items)
        waiting = [(variant, served) for variant, lists in sorted(self.lists.items()) for served in lists]
        body += _U8.pack(len(waiting))
        for variant, served in waiting:
            model, version, items = ref(served.model), ref(served.version), served.items
            code = VARIANTS.index(variant)
            body += _with_hashes(_LIST, len(items)).pack(code, model, version, served.placed_ms, len(items), *items)
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
        head += _U8.pack(0 if self.scored_alert is None else 1 + GROUPS.index(self.scored_alert))
        ahead_ms = self.placed_ms - self.scored_ms  # usually 0: the latest scoring is the latest time
        _put_varint(head, 2 * ahead_ms if ahead_ms >= 0 else -2 * ahead_ms - 1)  # zigzag
        head += _FOLDED.pack(*self.folded)
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


def _canonical(interaction: Interaction) -> tuple[int, int]:
    """The offline replay's order of events: time, then event-id hash."""
    return interaction.ts_ms, interaction.id_hash


def _placement(served: ServedList) -> int:
    return served.placed_ms


def _resolved(pending: PendingScore, positive: bool) -> ScoreOutcome:
    return ScoreOutcome(pending.model, pending.version, pending.variant, pending.score, pending.probability, positive)


_U8 = struct.Struct("<B")
_I64 = struct.Struct("<q")
_TAIL = struct.Struct("<QB")  # tail item hash, number of since-order hashes
_FOLDED = struct.Struct("<qQ")  # ts_ms, event-id hash of the last interaction folded
_NONE = struct.Struct("<")
_INTERACTION = struct.Struct("<qQBB")  # ts_ms, event-id hash, is an order, number of item hashes (then those)
_LIST = struct.Struct("<BBBqB")  # variant, model ref, version ref, placed_ms, number of item hashes (then those)


@lru_cache(maxsize=1024)
def _with_hashes(head: struct.Struct, n: int) -> struct.Struct:
    """``head`` followed by ``n`` 64-bit hashes, as one layout (one pack or unpack per record)."""
    return struct.Struct(f"{head.format}{n}Q")


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
        return self.take(_with_hashes(_NONE, n))

    def varint(self) -> int:
        value, self.at = _get_varint(self.data, self.at)
        return value


def _decode(data: bytes) -> LiveMemory:
    read = _Reader(data)
    # format 1 (before the interaction buffer): no placement, folded key nor buffer; its lists,
    # one per variant, were served at their placement. Format 2: no last scoring's alert.
    if (version := read.u8()) not in (1, 2, _FORMAT_VERSION):
        raise ValueError(f"live memory format {version}; this release reads 1 to {_FORMAT_VERSION}")
    memory = LiveMemory(score_seq=read.varint())
    (memory.scored_ms,) = read.take(_I64)
    memory.placed_ms = memory.scored_ms
    scored_alert = read.u8() if version >= 3 else None
    if version >= 2:
        zigzag = read.varint()
        memory.placed_ms += zigzag >> 1 if zigzag % 2 == 0 else -(zigzag + 1 >> 1)
        memory.folded = read.take(_FOLDED)
    memory.tail_item, n_since = read.take(_TAIL)
    memory.since_order = list(read.hashes(n_since))
    strings: list[str] = []
    for _ in range(read.u8()):
        length = read.u8()
        strings.append(bytes(data[read.at : read.at + length]).decode())
        read.at += length
    for _ in range(read.u8() if version >= 2 else 0):
        ts_ms, id_hash, is_order, n_items = read.take(_INTERACTION)
        memory.buffer.append(Interaction(ts_ms, id_hash, bool(is_order), read.hashes(n_items)))
    for _ in range(read.u8()):
        variant, model, version, placed_ms, n_items = read.take(_LIST)
        items = read.hashes(n_items)
        memory.lists.setdefault(VARIANTS[variant], []).append(
            ServedList(strings[model], strings[version], placed_ms, items)
        )
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
    if scored_alert is None:  # formats 1 and 2: a pending alert at the last scoring's time, as they assumed
        memory.scored_alert = next((g for g, t in memory.alerts if t == memory.scored_ms), None)
    elif scored_alert:
        memory.scored_alert = GROUPS[scored_alert - 1]
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
    memory.next_seq(served.t_ms)
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
        outcomes += memory.record_list(served.recommendation_variant, model, version, served.t_ms, served.items, config)
    if served.alert_group is not None:
        memory.record_alert(served.alert_group, served.t_ms)
    return outcomes
