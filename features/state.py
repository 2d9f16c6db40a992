"""Per-shopper feature state: small, pure, updated one event at a time (River style).

A :class:`ShopperState` folds a shopper's events into everything the feature vector needs,
in bounded memory, and answers :meth:`ShopperState.raw_features` for any ``now_ms``. The same
:meth:`ShopperState.update` runs online (worker) and offline (:mod:`features.offline`), which
is what makes training rows and served rows agree.

Time is event time in epoch milliseconds throughout; the wall clock is never read.

Windows are sums of time buckets, never scans of events. Three bucket tiers are kept sparse
(only buckets that saw an event exist), each holding per-kind event counts:

============  ============  ==========  ======================================================
tier          bucket width  buckets     windows served (resolution = one bucket)
============  ============  ==========  ======================================================
fine          5 min         12          1 h
hour          1 h           24          24 h
coarse        6 h           120         7 d (28), 14-7 d trend (28), 30 d (120); also revenue
                                        (cents) and session starts per bucket
============  ============  ==========  ======================================================

A window of ``n`` buckets at ``now_ms`` is the bucket holding ``now_ms`` plus the ``n - 1``
before it, so it covers between ``(n - 1)`` and ``n`` bucket widths of time: 55-60 min,
23-24 h, 6.75-7 d and 29.75-30 d. Buckets are aligned to the epoch, so 4 coarse buckets
make one UTC day.

Arrival rules (see :meth:`ShopperState.update`):

* the shopper's *watermark* is :attr:`ShopperState.last_event_ms`, its latest event time;
* an event older than ``watermark - grace_ms`` is :data:`LATE` and changes nothing;
* an event whose id is among the shopper's recent ids is a :data:`DUPLICATE` and changes nothing;
* anything else is :data:`APPLIED`.

Order independence: the state (and so :func:`features.encoding.encode_state` and every
feature) depends on the *set* of applied events, never on their arrival order, as long as
each event arrives within ``grace_ms`` of the watermark and the shopper has at most
``dedup_ids`` events (and at most :data:`CART_MAX_LINES` cart changes) within one grace
period. The worker reads three topics independently and the offline replay sorts by time;
both end in the same bytes. How:

* events are kept in the *canonical order* ``(ts_ms, event_id_hash)``: recent events are
  inserted at their canonical place, history entries at ``(ts_ms, kind code, item_id)``
  (an order's lines with one ``ts_ms`` sort by item id), cart lines sorted as whole tuples;
* anything whose result depends on the order of its inputs (float sums, the affinity
  anchor, Space-Saving eviction, cart compaction) is done only when events are *frozen*,
  i.e. fall behind ``watermark - grace_ms``: no later arrival can precede them (it would be
  LATE), so they are folded in canonical order whatever the arrival. Until then a recent
  event keeps its kind and category (``recent_codes``, ``recent_categories``), and readers
  (:meth:`ShopperState.raw_features`, :meth:`ShopperState.top_categories`) fold the recent
  events into a copy of the accumulator, in canonical order, with the same operation.

Beyond ``dedup_ids`` events within one grace period the oldest are frozen early (and a late
event among them joins the session it is nearest to); beyond :data:`CART_MAX_LINES` cart
lines within one grace period the whole cart is merged. Results are then still deterministic
for a given arrival order, but no longer independent of it.

Not thread-safe: one state belongs to the one task that owns the shopper's partition, and
one :class:`StateConfig` must be used for a state's whole life.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass

from features.events import KIND_CART_ADD, KIND_CART_REMOVE, KIND_ORDER, KIND_VIEW, Event

#: :meth:`ShopperState.update` outcomes.
APPLIED = "applied"
DUPLICATE = "duplicate"
LATE = "late"

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

#: Kind codes: the slot of a kind's count in a bucket, and its code in the encoding.
KIND_CODES: dict[str, int] = {KIND_VIEW: 0, KIND_CART_ADD: 1, KIND_CART_REMOVE: 2, KIND_ORDER: 3}
CODE_KINDS: tuple[str, ...] = (KIND_VIEW, KIND_CART_ADD, KIND_CART_REMOVE, KIND_ORDER)
SLOT_VIEW, SLOT_CART_ADD, SLOT_CART_REMOVE, SLOT_ORDER = 0, 1, 2, 3
#: Coarse buckets also hold revenue (integer cents) and session starts.
SLOT_REVENUE_CENTS, SLOT_SESSION_STARTS = 4, 5
COUNT_STRIDE = 4
COARSE_STRIDE = 6

FINE_BUCKET_MS = 5 * MINUTE_MS
FINE_BUCKETS = 12
HOUR_BUCKET_MS = HOUR_MS
HOUR_BUCKETS = 24
COARSE_BUCKET_MS = 6 * HOUR_MS
COARSE_BUCKETS = 120
COARSE_PER_DAY = DAY_MS // COARSE_BUCKET_MS
COARSE_WEEK = 7 * COARSE_PER_DAY

#: Category affinity: half-life of an interaction's weight, in ms.
AFFINITY_HALF_LIFE_MS = 7 * DAY_MS
#: Category affinity: how many categories are tracked (Space-Saving eviction beyond that).
AFFINITY_TOP_K = 5
#: Category affinity: weight of one interaction, by kind code (views 1, cart adds 3).
AFFINITY_WEIGHTS: tuple[float, ...] = (1.0, 3.0, 0.0, 0.0)
#: Scores are kept relative to an anchor time; it moves forward after this many ms (float range).
AFFINITY_REBASE_MS = 32 * AFFINITY_HALF_LIFE_MS

#: Cart lines are merged per item as soon as their event falls behind the grace period. Hard
#: cap on the lines within the grace period: beyond it all lines are merged per item (late
#: orders become approximate, and the cart may depend on arrival order).
CART_MAX_LINES = 64
#: Distinct items remembered for the frozen part of the current session.
SESSION_ITEMS_CAP = 64

#: Bump when the meaning of any raw feature changes (bucket widths, session rule, ...);
#: it is part of every FeatureSpec hash.
FEATURE_LOGIC_VERSION = 1

#: Names of :meth:`ShopperState.raw_features`, in order (units: see ``docs/features.md``).
RAW_FEATURE_NAMES: tuple[str, ...] = (
    "views_1h",
    "cart_adds_1h",
    "cart_removes_1h",
    "orders_1h",
    "views_24h",
    "cart_adds_24h",
    "cart_removes_24h",
    "orders_24h",
    "views_7d",
    "cart_adds_7d",
    "cart_removes_7d",
    "orders_7d",
    "views_30d",
    "cart_adds_30d",
    "cart_removes_30d",
    "orders_30d",
    "ms_since_last_event",
    "ms_since_last_view",
    "ms_since_last_cart_add",
    "ms_since_last_order",
    "ms_since_first_event",
    "orders_lifetime",
    "revenue_30d",
    "revenue_lifetime",
    "avg_order_value",
    "session_events",
    "session_distinct_items",
    "session_length_ms",
    "sessions_7d",
    "cart_items_now",
    "cart_value_now",
    "cart_adds_since_order",
    "active_days_30d",
    "trend_7d",
    "view_to_cart_30d",
    "cart_to_order_30d",
    "category_top_share",
    "category_affinity_total",
)


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Rules for folding events into a :class:`ShopperState`; keep them fixed for a state's life.

    Attributes:
        grace_ms: out-of-order tolerance, ms: events older than the shopper's latest event
            time minus this are LATE and not applied (default 1 h).
        history_len: item interactions kept for the next-item model (default 50).
        dedup_ids: how many recent event ids (and event times, for exact sessions) a shopper
            keeps; a repeat of one of them is a DUPLICATE (default 64). Ids older than
            ``grace_ms`` before the latest event are dropped earlier: a repeat that old is LATE
            anyway.
        retention_ms: a shopper idle this long (event time) may be evicted (default 90 d).
        session_gap_ms: a gap longer than this between consecutive events starts a new
            session (default 30 min).
    """

    grace_ms: int = HOUR_MS
    history_len: int = 50
    dedup_ids: int = 64
    retention_ms: int = 90 * DAY_MS
    session_gap_ms: int = 30 * MINUTE_MS

    def __post_init__(self) -> None:
        for name in ("grace_ms", "history_len", "dedup_ids", "retention_ms", "session_gap_ms"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"StateConfig.{name} must be a positive int, got {value!r}")


def event_id_hash(event_id: str) -> int:
    """Stable 64-bit hash of an event id (process-independent, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")


def to_cents(amount: float) -> int:
    """Money amount in currency units -> integer cents (minor units)."""
    return round(amount * 100)


def _bump(keys: list[int], values: list[int], stride: int, bucket: int, oldest: int, slot: int, amount: int) -> None:
    """Add ``amount`` to ``slot`` of ``bucket`` in a sparse tier; buckets before ``oldest`` are gone."""
    if bucket < oldest:
        return
    if keys and keys[-1] == bucket:
        values[len(values) - stride + slot] += amount
        return
    i = len(keys) if not keys or keys[-1] < bucket else bisect_left(keys, bucket)
    if i < len(keys) and keys[i] == bucket:
        values[i * stride + slot] += amount
        return
    keys.insert(i, bucket)
    row = [0] * stride
    row[slot] = amount
    values[i * stride : i * stride] = row


def _evict(keys: list[int], values: list[int], stride: int, oldest: int) -> None:
    """Drop buckets before ``oldest`` from a sparse tier."""
    if keys and keys[0] < oldest:
        i = bisect_left(keys, oldest)
        del keys[:i]
        del values[: i * stride]


def _window(keys: list[int], values: list[int], stride: int, first: int, last: int) -> list[int]:
    """Per-slot sums over buckets ``first..last`` (inclusive) of a sparse tier."""
    i0 = bisect_left(keys, first)
    i1 = bisect_right(keys, last)
    if i0 >= i1:
        return [0] * stride
    start, stop = i0 * stride, i1 * stride
    return [sum(values[start + slot : stop : stride]) for slot in range(stride)]


def _fold_affinity(
    anchor: int, categories: list[str], scores: list[float], category: str, weight: float, ts: int
) -> int:
    """Add ``weight`` at ``ts`` to ``category``'s decayed score (Space-Saving top-K), in place;
    returns the new anchor. Depends only on the accumulator and this event (the anchor moves to
    ``ts`` when ``ts`` is more than :data:`AFFINITY_REBASE_MS` past it), so folding the same
    events in the same (canonical) order gives the same floats."""
    if not categories:
        anchor = ts
    elif ts - anchor > AFFINITY_REBASE_MS:
        factor = 2.0 ** ((anchor - ts) / AFFINITY_HALF_LIFE_MS)
        scores[:] = [score * factor for score in scores]
        anchor = ts
    value = weight * 2.0 ** ((ts - anchor) / AFFINITY_HALF_LIFE_MS)
    if category in categories:
        scores[categories.index(category)] += value
    elif len(categories) < AFFINITY_TOP_K:
        categories.append(category)
        scores.append(value)
    else:
        weakest = scores.index(min(scores))
        categories[weakest] = category
        scores[weakest] += value
    return anchor


class ShopperState:
    """Everything ShopPulse remembers about one shopper, in bounded memory.

    Public attributes are read-only for callers (times are epoch ms, 0 = never; money is in
    integer cents): ``user_id``, ``first_event_ms``, ``last_event_ms`` (the watermark),
    ``last_view_ms``, ``last_cart_add_ms``, ``last_order_ms``, ``events_lifetime``,
    ``orders_lifetime``, ``revenue_lifetime_cents``. The remaining slots are internal and exist
    so that :mod:`features.encoding` can persist them.
    """

    __slots__ = (
        "user_id",
        "first_event_ms",
        "last_event_ms",
        "last_view_ms",
        "last_cart_add_ms",
        "last_order_ms",
        "events_lifetime",
        "orders_lifetime",
        "revenue_lifetime_cents",
        # sparse bucket tiers: sorted bucket numbers (ts // width) and flat per-bucket slots
        "fine_keys",
        "fine_counts",
        "hour_keys",
        "hour_counts",
        "coarse_keys",
        "coarse_values",
        # events of the last grace_ms (at most dedup_ids), in canonical order (ts, id hash): for
        # dedup, exact sessions and order-independent folds; starts[i] is 1 where event i begins
        # a session; codes are kind codes; categories are "" where the event has no affinity weight
        "recent_ts",
        "recent_ids",
        "recent_item_ids",
        "recent_starts",
        "recent_codes",
        "recent_categories",
        # the older part ("frozen") of the session that precedes or holds the recent events
        "frozen_session_start_ms",
        "frozen_session_last_ms",
        "frozen_session_events",
        "frozen_session_items",
        # cart lines since the last order, sorted: (ts_ms, item_id, quantity_delta, price_cents, adds);
        # lines of frozen events are merged into one line per item (adds moved to compacted adds)
        "cart_lines",
        "cart_compacted_adds",
        # last history_len item interactions, sorted by (ts, kind code, item), as parallel lists
        "history_items",
        "history_codes",
        "history_ts",
        # decayed category affinity of the frozen events, scores relative to the anchor time
        "affinity_anchor_ms",
        "affinity_categories",
        "affinity_scores",
    )

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.first_event_ms = 0
        self.last_event_ms = 0
        self.last_view_ms = 0
        self.last_cart_add_ms = 0
        self.last_order_ms = 0
        self.events_lifetime = 0
        self.orders_lifetime = 0
        self.revenue_lifetime_cents = 0
        self.fine_keys: list[int] = []
        self.fine_counts: list[int] = []
        self.hour_keys: list[int] = []
        self.hour_counts: list[int] = []
        self.coarse_keys: list[int] = []
        self.coarse_values: list[int] = []
        self.recent_ts: list[int] = []
        self.recent_ids: list[int] = []
        self.recent_item_ids: list[str] = []
        self.recent_starts: list[int] = []
        self.recent_codes: list[int] = []
        self.recent_categories: list[str] = []
        self.frozen_session_start_ms = 0
        self.frozen_session_last_ms = 0
        self.frozen_session_events = 0
        self.frozen_session_items: list[str] = []
        self.cart_lines: list[tuple[int, str, int, int, int]] = []
        self.cart_compacted_adds = 0
        self.history_items: list[str] = []
        self.history_codes: list[int] = []
        self.history_ts: list[int] = []
        self.affinity_anchor_ms = 0
        self.affinity_categories: list[str] = []
        self.affinity_scores: list[float] = []

    @classmethod
    def new(cls, user_id: str) -> ShopperState:
        """An empty state for a shopper never seen before."""
        return cls(user_id)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShopperState):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __repr__(self) -> str:
        return (
            f"ShopperState(user_id={self.user_id!r}, events_lifetime={self.events_lifetime}, "
            f"last_event_ms={self.last_event_ms})"
        )

    # -- update ---------------------------------------------------------------------------------

    def update(self, event: Event, config: StateConfig) -> str:
        """Fold one event in; returns :data:`APPLIED`, :data:`DUPLICATE` or :data:`LATE`.

        LATE: ``event.ts_ms < last_event_ms - grace_ms`` (checked first, so a late repeat is
        LATE). DUPLICATE: the event id is among the recent ids. Neither changes the state.
        """
        ts = event.ts_ms
        last = self.last_event_ms
        if last and ts < last - config.grace_ms:
            return LATE
        id_hash = event_id_hash(event.event_id)
        if id_hash in self.recent_ids:
            return DUPLICATE
        kind = event.kind
        code = KIND_CODES.get(kind)
        if code is None:
            raise ValueError(f"event {event.event_id!r} has unknown kind {kind!r}; expected one of {CODE_KINDS}")

        if ts > last:
            self.last_event_ms = last = ts
            self._advance(last, config)
        if not self.first_event_ms or ts < self.first_event_ms:
            self.first_event_ms = ts
        self.events_lifetime += 1

        _bump(
            self.fine_keys,
            self.fine_counts,
            COUNT_STRIDE,
            ts // FINE_BUCKET_MS,
            last // FINE_BUCKET_MS - FINE_BUCKETS + 1,
            code,
            1,
        )
        _bump(
            self.hour_keys,
            self.hour_counts,
            COUNT_STRIDE,
            ts // HOUR_BUCKET_MS,
            last // HOUR_BUCKET_MS - HOUR_BUCKETS + 1,
            code,
            1,
        )
        coarse_bucket = ts // COARSE_BUCKET_MS
        coarse_oldest = last // COARSE_BUCKET_MS - COARSE_BUCKETS + 1
        _bump(self.coarse_keys, self.coarse_values, COARSE_STRIDE, coarse_bucket, coarse_oldest, code, 1)

        item_id = event.item_id
        weight = AFFINITY_WEIGHTS[code]
        self._add_recent(ts, id_hash, item_id, code, event.category if weight else "", config)
        if code == SLOT_ORDER:
            cents = to_cents(event.total)
            self.orders_lifetime += 1
            self.revenue_lifetime_cents += cents
            _bump(
                self.coarse_keys,
                self.coarse_values,
                COARSE_STRIDE,
                coarse_bucket,
                coarse_oldest,
                SLOT_REVENUE_CENTS,
                cents,
            )
            for line in event.order_lines:
                self._add_history(line.item_id, code, ts)
            if ts > self.last_order_ms:
                self.last_order_ms = ts
                self.cart_lines = [line for line in self.cart_lines if line[0] > ts]
                self.cart_compacted_adds = 0
        else:
            self._add_history(item_id, code, ts)
            if code == SLOT_VIEW:
                if ts > self.last_view_ms:
                    self.last_view_ms = ts
            else:
                if code == SLOT_CART_ADD and ts > self.last_cart_add_ms:
                    self.last_cart_add_ms = ts
                if ts > self.last_order_ms:
                    adds = 1 if code == SLOT_CART_ADD else 0
                    quantity = event.quantity if adds else -event.quantity
                    cart_line = (ts, item_id, quantity, to_cents(event.price), adds)
                    lines = self.cart_lines
                    if not lines or cart_line >= lines[-1]:
                        lines.append(cart_line)
                    else:
                        insort(lines, cart_line)
                    if (
                        len(lines) > CART_MAX_LINES
                        and len(lines) - bisect_left(lines, (last - config.grace_ms,)) > CART_MAX_LINES
                    ):
                        self._compact_cart(None)
        excess = len(self.history_ts) - config.history_len
        if excess > 0:
            del self.history_items[:excess], self.history_codes[:excess], self.history_ts[:excess]
        return APPLIED

    def _advance(self, last: int, config: StateConfig) -> None:
        """The watermark moved to ``last``: drop buckets out of every tier, freeze old events."""
        _evict(self.fine_keys, self.fine_counts, COUNT_STRIDE, last // FINE_BUCKET_MS - FINE_BUCKETS + 1)
        _evict(self.hour_keys, self.hour_counts, COUNT_STRIDE, last // HOUR_BUCKET_MS - HOUR_BUCKETS + 1)
        _evict(self.coarse_keys, self.coarse_values, COARSE_STRIDE, last // COARSE_BUCKET_MS - COARSE_BUCKETS + 1)
        recent_ts = self.recent_ts
        cutoff = last - config.grace_ms  # no event before it can still be applied
        if recent_ts and recent_ts[0] < cutoff:
            self._freeze(bisect_left(recent_ts, cutoff), config)

    def _add_recent(self, ts: int, id_hash: int, item_id: str, code: int, category: str, config: StateConfig) -> None:
        """Insert an event into the recent lists at its canonical place (ts, then id hash) and
        keep session-start flags right."""
        recent_ts = self.recent_ts
        gap = config.session_gap_ms
        n = len(recent_ts)
        if not n or ts > recent_ts[-1]:
            i = n
        else:
            i = bisect_right(recent_ts, ts)
            ids = self.recent_ids
            while i and recent_ts[i - 1] == ts and ids[i - 1] > id_hash:
                i -= 1
        if i:
            starts = 1 if ts - recent_ts[i - 1] > gap else 0
        else:
            starts = 1 if not self.frozen_session_events or ts - self.frozen_session_last_ms > gap else 0
        recent_ts.insert(i, ts)
        self.recent_ids.insert(i, id_hash)
        self.recent_item_ids.insert(i, item_id)
        self.recent_starts.insert(i, starts)
        self.recent_codes.insert(i, code)
        self.recent_categories.insert(i, category)
        if i < n:
            self.recent_starts[i + 1] = 1 if recent_ts[i + 1] - ts > gap else 0
        if n + 1 > config.dedup_ids:
            self._freeze(n + 1 - config.dedup_ids, config)

    def _freeze(self, count: int, config: StateConfig) -> None:
        """Fold the oldest ``count`` recent events, in canonical order, into the frozen session
        summary and the affinity accumulator, merge the cart lines behind the grace period."""
        gap = config.session_gap_ms
        coarse_oldest = self.last_event_ms // COARSE_BUCKET_MS - COARSE_BUCKETS + 1
        items = self.frozen_session_items
        oldest = zip(self.recent_ts[:count], self.recent_item_ids[:count], self.recent_starts[:count], strict=True)
        for ts, item_id, starts in oldest:
            if starts:
                self.frozen_session_start_ms = ts
                self.frozen_session_last_ms = ts
                self.frozen_session_events = 1
                items = self.frozen_session_items = []
                _bump(
                    self.coarse_keys,
                    self.coarse_values,
                    COARSE_STRIDE,
                    ts // COARSE_BUCKET_MS,
                    coarse_oldest,
                    SLOT_SESSION_STARTS,
                    1,
                )
            else:
                self.frozen_session_events += 1
                if ts > self.frozen_session_last_ms:
                    self.frozen_session_last_ms = ts
                if ts < self.frozen_session_start_ms:
                    self.frozen_session_start_ms = ts
            if item_id and item_id not in items:
                # Kept sorted, the smallest ids past the cap: the same list whatever order the events
                # were frozen in (more than ``dedup_ids`` events in one millisecond can freeze out of order).
                insort(items, item_id)
                if len(items) > SESSION_ITEMS_CAP:
                    items.pop()
        codes = self.recent_codes[:count]
        categories = self.recent_categories[:count]
        if any(categories):
            anchor = self.affinity_anchor_ms
            tracked, scores = self.affinity_categories, self.affinity_scores
            for ts, code, category in zip(self.recent_ts[:count], codes, categories, strict=True):
                if category:
                    anchor = _fold_affinity(anchor, tracked, scores, category, AFFINITY_WEIGHTS[code], ts)
            self.affinity_anchor_ms = anchor
        compact = self.cart_lines and (SLOT_CART_ADD in codes or SLOT_CART_REMOVE in codes)
        del self.recent_ts[:count], self.recent_ids[:count], self.recent_item_ids[:count], self.recent_starts[:count]
        del self.recent_codes[:count], self.recent_categories[:count]
        if self.recent_ts:
            self.recent_starts[0] = 1 if self.recent_ts[0] - self.frozen_session_last_ms > gap else 0
        if compact:
            self._compact_cart(self.last_event_ms - config.grace_ms)

    def _add_history(self, item_id: str, code: int, ts: int) -> None:
        """Insert an interaction at its place in (ts, kind code, item id) order."""
        history_ts = self.history_ts
        if not history_ts or ts > history_ts[-1]:
            history_ts.append(ts)
            self.history_items.append(item_id)
            self.history_codes.append(code)
        else:
            codes, items = self.history_codes, self.history_items
            i = bisect_right(history_ts, ts)
            while i and history_ts[i - 1] == ts and (codes[i - 1], items[i - 1]) > (code, item_id):
                i -= 1
            history_ts.insert(i, ts)
            self.history_items.insert(i, item_id)
            self.history_codes.insert(i, code)

    def _compact_cart(self, cutoff: int | None) -> None:
        """Merge the cart lines before ``cutoff`` (``None``: all lines) into one line per item.

        Exact for features: no accepted order can fall before ``cutoff`` (watermark - grace),
        an item's units add up, and its price is the latest line's. Lines are sorted, so the
        latest is the last (equal times: the largest line), whatever the arrival order."""
        lines = self.cart_lines
        i = len(lines) if cutoff is None else bisect_left(lines, (cutoff,))
        if not i:
            return
        merged: dict[str, list[int]] = {}
        adds = 0
        for ts, item_id, quantity, price_cents, line_adds in lines[:i]:
            adds += line_adds
            entry = merged.get(item_id)
            if entry is None:
                merged[item_id] = [ts, quantity, price_cents]
            else:
                entry[0] = ts
                entry[1] += quantity
                entry[2] = price_cents
        self.cart_compacted_adds += adds
        compacted = sorted(
            (ts, item_id, quantity, price_cents, 0)
            for item_id, (ts, quantity, price_cents) in merged.items()
            if quantity
        )
        self.cart_lines = compacted + lines[i:]

    def _affinity(self) -> tuple[int, list[str], list[float]]:
        """``(anchor_ms, categories, scores)``: the frozen accumulator with the recent events
        folded in (on a copy), in canonical order: what freezing them all would give."""
        recent = self.recent_categories
        if not any(recent):
            return self.affinity_anchor_ms, self.affinity_categories, self.affinity_scores
        anchor, categories, scores = self.affinity_anchor_ms, self.affinity_categories[:], self.affinity_scores[:]
        for ts, code, category in zip(self.recent_ts, self.recent_codes, recent, strict=True):
            if category:
                anchor = _fold_affinity(anchor, categories, scores, category, AFFINITY_WEIGHTS[code], ts)
        return anchor, categories, scores

    # -- reading --------------------------------------------------------------------------------

    def recent_items(self) -> list[tuple[str, str, int]]:
        """The last ``history_len`` item interactions ``(item_id, kind, ts_ms)``, oldest first.

        Views and cart adds/removes give one entry each, an order one entry per order line.
        """
        kinds = [CODE_KINDS[code] for code in self.history_codes]
        return list(zip(self.history_items, kinds, self.history_ts, strict=True))

    def history_item_ids(self) -> list[str]:
        """The item ids of :meth:`recent_items`, oldest first, without building the tuples
        (the state's own list: read it, do not change it)."""
        return self.history_items

    def top_categories(self, now_ms: int | None = None) -> list[tuple[str, float]]:
        """Tracked categories with their affinity decayed to ``now_ms`` (default: the watermark),
        strongest first. One view counts 1, one cart add 3, halving every 7 days."""
        now_ms = self.last_event_ms if now_ms is None else now_ms
        anchor, categories, scores = self._affinity()
        scale = 2.0 ** ((anchor - now_ms) / AFFINITY_HALF_LIFE_MS)
        pairs = [(category, score * scale) for category, score in zip(categories, scores, strict=True)]
        pairs.sort(key=lambda pair: -pair[1])
        return pairs

    def is_expired(self, now_ms: int, config: StateConfig) -> bool:
        """True when the shopper has had no event for more than ``retention_ms`` before ``now_ms``."""
        return now_ms - self.last_event_ms > config.retention_ms

    def current_session(self) -> tuple[int, int, int]:
        """``(start_ms, events, distinct_items)`` of the session holding the latest event."""
        recent_ts = self.recent_ts
        if not recent_ts:
            return 0, 0, 0
        starts = self.recent_starts
        n = len(starts)
        try:
            first = n - 1 - starts[::-1].index(1)
        except ValueError:  # no start among recent events: the session began in the frozen part
            items = set(self.recent_item_ids)
            items.update(self.frozen_session_items)
            items.discard("")
            return self.frozen_session_start_ms, self.frozen_session_events + n, len(items)
        items = set(self.recent_item_ids[first:])
        items.discard("")
        return recent_ts[first], n - first, len(items)

    def raw_features(self, now_ms: int | None = None) -> tuple[float, ...]:
        """Feature values in natural units, in :data:`RAW_FEATURE_NAMES` order, as of ``now_ms``.

        ``now_ms`` defaults to the watermark. Counts are plain counts, durations ms (``inf``
        when the thing never happened), money currency units. Window sums include only
        buckets up to the one holding ``now_ms``.
        """
        now = self.last_event_ms if now_ms is None else int(now_ms)
        fine_now = now // FINE_BUCKET_MS
        hour_now = now // HOUR_BUCKET_MS
        coarse_now = now // COARSE_BUCKET_MS
        h1 = _window(self.fine_keys, self.fine_counts, COUNT_STRIDE, fine_now - FINE_BUCKETS + 1, fine_now)
        h24 = _window(self.hour_keys, self.hour_counts, COUNT_STRIDE, hour_now - HOUR_BUCKETS + 1, hour_now)
        keys, values = self.coarse_keys, self.coarse_values
        d7 = _window(keys, values, COARSE_STRIDE, coarse_now - COARSE_WEEK + 1, coarse_now)
        d14 = _window(keys, values, COARSE_STRIDE, coarse_now - 2 * COARSE_WEEK + 1, coarse_now - COARSE_WEEK)
        month_first = coarse_now - COARSE_BUCKETS + 1
        d30 = _window(keys, values, COARSE_STRIDE, month_first, coarse_now)
        active_days = len(
            {key // COARSE_PER_DAY for key in keys[bisect_left(keys, month_first) : bisect_right(keys, coarse_now)]}
        )

        inf = math.inf
        last_view, last_add, last_order = self.last_view_ms, self.last_cart_add_ms, self.last_order_ms
        orders_lifetime = self.orders_lifetime
        revenue_lifetime = self.revenue_lifetime_cents / 100

        session_start, session_events, session_items = self.current_session()
        sessions_7d = d7[SLOT_SESSION_STARTS]
        week_first = coarse_now - COARSE_WEEK + 1
        for ts, starts in zip(self.recent_ts, self.recent_starts, strict=True):
            if starts and week_first <= ts // COARSE_BUCKET_MS <= coarse_now:
                sessions_7d += 1

        cart_items, cart_value, cart_adds = self._cart_now()

        events_7d = d7[0] + d7[1] + d7[2] + d7[3]
        events_prev_7d = d14[0] + d14[1] + d14[2] + d14[3]
        trend = (events_7d - events_prev_7d) / (events_7d + events_prev_7d) if events_7d + events_prev_7d else 0.0
        views_30d, adds_30d, orders_30d = d30[SLOT_VIEW], d30[SLOT_CART_ADD], d30[SLOT_ORDER]
        view_to_cart = min(adds_30d / views_30d, 1.0) if views_30d else 0.0
        cart_to_order = min(orders_30d / adds_30d, 1.0) if adds_30d else 0.0

        anchor, _, scores = self._affinity()
        total = sum(scores)
        top_share = max(scores) / total if total > 0 else 0.0
        affinity_total = total * 2.0 ** ((anchor - now) / AFFINITY_HALF_LIFE_MS) if scores else 0.0

        return (
            h1[0],
            h1[1],
            h1[2],
            h1[3],
            h24[0],
            h24[1],
            h24[2],
            h24[3],
            d7[0],
            d7[1],
            d7[2],
            d7[3],
            d30[0],
            d30[1],
            d30[2],
            d30[3],
            now - self.last_event_ms if self.last_event_ms else inf,
            now - last_view if last_view else inf,
            now - last_add if last_add else inf,
            now - last_order if last_order else inf,
            now - self.first_event_ms if self.first_event_ms else 0,
            orders_lifetime,
            d30[SLOT_REVENUE_CENTS] / 100,
            revenue_lifetime,
            revenue_lifetime / orders_lifetime if orders_lifetime else 0.0,
            session_events,
            session_items,
            self.last_event_ms - session_start if session_events else 0,
            sessions_7d,
            cart_items,
            cart_value,
            cart_adds,
            active_days,
            trend,
            view_to_cart,
            cart_to_order,
            top_share,
            affinity_total,
        )

    def _cart_now(self) -> tuple[int, float, int]:
        """``(items, value in currency units, adds since last order)`` of the cart now."""
        quantities: dict[str, int] = {}
        prices: dict[str, tuple[int, int]] = {}
        adds = self.cart_compacted_adds
        for ts, item_id, quantity, price_cents, line_adds in self.cart_lines:
            quantities[item_id] = quantities.get(item_id, 0) + quantity
            adds += line_adds
            seen = prices.get(item_id)
            if seen is None or ts >= seen[0]:
                prices[item_id] = (ts, price_cents)
        items = 0
        value_cents = 0
        for item_id, quantity in quantities.items():
            if quantity > 0:
                items += quantity
                value_cents += quantity * prices[item_id][1]
        return items, value_cents / 100, adds
