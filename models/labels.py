"""Labels from behaviour: churn, purchase propensity and next item, with censoring.

Pure functions over a time-sorted event log (``features.events.Event``); no Kafka, no torch.
Nothing here reads the simulator's hidden truth: every label is something the shopper later
*did* (or did not do) in the log.

**Scoring moments.** A model scores a shopper at a moment ``t`` (epoch ms) from the
point-in-time feature row of :mod:`features.offline`. Two kinds of moment are labelled, as the
worker produces both:

* *event* moments: right after one of the shopper's applied events (the worker scores after
  each batch); at most one per shopper per ``example_gap_ms`` (default 1 h: the first applied
  event, then the first one at least 1 h after the previous example), so long sessions do not
  dominate (:class:`MomentSampler`);
* *sweep* moments: every ``sweep_every_ms`` (default 24 h, aligned to UTC midnight) for every
  shopper seen before and idle at most ``sweep_max_idle_ms`` (default: the churn horizon), as
  the silent-shopper sweep does;
  without them a churn model would only ever see ``ms_since_last_event == 0``.

**Labels** at moment ``t`` (half-open future window, the moment itself excluded):

* ``churn``    = 1 if the shopper has **no** event in ``(t, t + churn_horizon_ms]`` (default 14 d);
* ``purchase`` = 1 if the shopper places an order in ``(t, t + purchase_horizon_ms]`` (default 24 h).

**Censoring.** When ``t + horizon`` is after the end of the observed log the outcome is not
known, so that task's label is NaN (dropped) for the example, whether or not an event was
already seen: keeping only the already-known outcomes would bias the labels.

Computing a label is a binary search in the shopper's sorted event (or order) times
(:class:`FutureIndex`): O(n log n) to build, O(log n) per moment, never quadratic.

**Next item.** :func:`item_sequences` turns each shopper's events into a sequence of item
interactions with weights (views ``view_weight`` 1, cart adds ``cart_weight`` 3, bought items
``order_weight`` 5): a view or cart add of the item the sequence already ends with is merged into
that entry (a cart add after a view of the same item is one interaction, upgraded to a cart),
cart removes are ignored, and an order upgrades the entries of its items since the previous
order (the cart) instead of repeating them; ordered items not seen since then are appended.
:func:`next_item_split` cuts the sequences at a split time: history = items before it, target =
the shopper's first interaction at or after it (``next``), and also the first interaction with an
item not in the history (``next_new``), since the served recommender never proposes history items.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from features.events import KIND_CART_ADD, KIND_ORDER, KIND_VIEW, Event
from features.state import DAY_MS, HOUR_MS

TASKS: tuple[str, ...] = ("churn", "purchase")
MOMENT_EVENT = 0
MOMENT_SWEEP = 1
MOMENT_NAMES = ("event", "sweep")

#: Interaction kinds of next-item sequence entries, weakest first.
ENTRY_VIEW, ENTRY_CART, ENTRY_ORDER = "view", "cart", "order"
_ENTRY_RANK = {ENTRY_VIEW: 0, ENTRY_CART: 1, ENTRY_ORDER: 2}


@dataclass(frozen=True)
class LabelConfig:
    """Label definitions and how scoring moments are picked (all times in ms).

    Attributes:
        churn_horizon_ms: churn = no event in ``(t, t + this]`` (default 14 days).
        purchase_horizon_ms: purchase = an order in ``(t, t + this]`` (default 24 hours).
        example_gap_ms: at most one event moment per shopper per this gap (0 = every event).
        sweep_every_ms: a sweep moment for every seen shopper this often (0 = no sweeps).
        sweep_max_idle_ms: sweeps skip shoppers idle longer than this (default: the churn horizon;
            a shopper silent for longer has churned by definition, scoring them again only
            inflates every method's churn metrics).
        view_weight / cart_weight / order_weight: next-item interaction weights.
    """

    churn_horizon_ms: int = 14 * DAY_MS
    purchase_horizon_ms: int = DAY_MS
    example_gap_ms: int = HOUR_MS
    sweep_every_ms: int = DAY_MS
    sweep_max_idle_ms: int | None = None
    view_weight: float = 1.0
    cart_weight: float = 3.0
    order_weight: float = 5.0

    def __post_init__(self) -> None:
        for name in ("churn_horizon_ms", "purchase_horizon_ms"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LabelConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("example_gap_ms", "sweep_every_ms"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"LabelConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.view_weight <= self.cart_weight <= self.order_weight:
            raise ValueError("next-item weights must satisfy 0 < view_weight <= cart_weight <= order_weight")

    @property
    def max_idle_ms(self) -> int:
        """Longest idle time of a shopper still swept."""
        return int(self.churn_horizon_ms if self.sweep_max_idle_ms is None else self.sweep_max_idle_ms)

    def horizons(self) -> dict[str, int]:
        """Label horizon per task, in :data:`TASKS` order."""
        return {"churn": int(self.churn_horizon_ms), "purchase": int(self.purchase_horizon_ms)}

    def weight(self, entry_kind: str) -> float:
        return {ENTRY_VIEW: self.view_weight, ENTRY_CART: self.cart_weight, ENTRY_ORDER: self.order_weight}[entry_kind]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> dict[str, str]:
        """The label definitions in words (for reports and artifact metadata)."""
        return {
            "churn": f"no event of the shopper in (t, t + {_duration(self.churn_horizon_ms)}]",
            "purchase": f"an order by the shopper in (t, t + {_duration(self.purchase_horizon_ms)}]",
            "next_item": (
                f"the shopper's next item interaction (view weight {self.view_weight:g}, cart add "
                f"{self.cart_weight:g}, bought {self.order_weight:g}; repeats of the last item merged, "
                "cart removes ignored)"
            ),
            "censoring": "a task's label is dropped when t + its horizon is after the end of the log",
            "moments": (
                f"event moments: at most one per shopper per {_duration(self.example_gap_ms)}; sweep moments: "
                f"every {_duration(self.sweep_every_ms)} for shoppers idle at most "
                f"{_duration(self.max_idle_ms)}"
                if self.sweep_every_ms
                else f"event moments only: at most one per shopper per {_duration(self.example_gap_ms)}"
            ),
        }


def _duration(ms: int) -> str:
    ms = int(ms)
    if ms == 0:
        return "0 ms"
    for unit, size in (("d", DAY_MS), ("h", HOUR_MS), ("min", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size} {unit}"
    return f"{ms} ms"


# ------------------------------------------------------------------------------ future index
class FutureIndex:
    """Every shopper's event and order times, sorted, for O(log n) "what happens next" queries.

    Built from the applied events of a log in O(n log n). Times are int64 epoch ms; keys are
    ``user_code * stride + (ts - base)`` so one ``np.searchsorted`` answers a whole batch of
    moments for many shoppers at once.
    """

    def __init__(self, events: Iterable[Event]) -> None:
        users: dict[str, int] = {}
        ev_user: list[int] = []
        ev_ts: list[int] = []
        od_user: list[int] = []
        od_ts: list[int] = []
        for event in events:
            code = users.setdefault(event.user_id, len(users))
            ev_user.append(code)
            ev_ts.append(event.ts_ms)
            if event.kind == KIND_ORDER:
                od_user.append(code)
                od_ts.append(event.ts_ms)
        self.user_codes = users
        ts = np.asarray(ev_ts, dtype=np.int64)
        self.first_ms = int(ts.min()) if ts.size else 0
        self.last_ms = int(ts.max()) if ts.size else 0
        self._base = self.first_ms
        self._stride = np.int64(self.last_ms - self.first_ms + 2)
        self._events = self._keys(np.asarray(ev_user, dtype=np.int64), ts)
        self._orders = self._keys(np.asarray(od_user, dtype=np.int64), np.asarray(od_ts, dtype=np.int64))

    def _keys(self, codes: np.ndarray, ts: np.ndarray) -> np.ndarray:
        return np.sort(codes * self._stride + (ts - self._base))

    def _next(self, keys: np.ndarray, users: Sequence[str], times: np.ndarray) -> np.ndarray:
        times = np.asarray(times, dtype=np.int64)
        codes = np.fromiter((self.user_codes.get(u, -1) for u in users), dtype=np.int64, count=len(users))
        rel = np.clip(times - self._base, -1, int(self._stride) - 1)
        q = codes * self._stride + rel
        j = np.searchsorted(keys, q, side="right")
        out = np.full(len(times), -1, dtype=np.int64)
        ok = (codes >= 0) & (j < len(keys))
        if ok.any():
            found = keys[j[ok]]
            same = found // self._stride == codes[ok]
            vals = np.where(same, found % self._stride + self._base, -1)
            out[ok] = vals
        return out

    def next_event_ms(self, users: Sequence[str], times: Sequence[int] | np.ndarray) -> np.ndarray:
        """Time of each shopper's first event strictly after each time; -1 when none."""
        return self._next(self._events, users, np.asarray(times))

    def next_order_ms(self, users: Sequence[str], times: Sequence[int] | np.ndarray) -> np.ndarray:
        """Time of each shopper's first order strictly after each time; -1 when none."""
        return self._next(self._orders, users, np.asarray(times))


def _happens_within(next_ms: np.ndarray, times: np.ndarray, horizon_ms: int, observed_until_ms: int) -> np.ndarray:
    """1.0 where the next occurrence falls in ``(t, t + horizon]``, 0.0 where not, NaN where censored."""
    y = ((next_ms >= 0) & (next_ms <= times + horizon_ms)).astype(np.float32)
    y[times + horizon_ms > observed_until_ms] = np.nan
    return y


def churn_labels(
    index: FutureIndex, users: Sequence[str], times: Sequence[int] | np.ndarray, horizon_ms: int, observed_until_ms: int
) -> np.ndarray:
    """1.0 = no event in ``(t, t + horizon]``, 0.0 = some event, NaN = censored (``t + horizon > end``)."""
    times = np.asarray(times, dtype=np.int64)
    return 1.0 - _happens_within(index.next_event_ms(users, times), times, horizon_ms, observed_until_ms)


def purchase_labels(
    index: FutureIndex, users: Sequence[str], times: Sequence[int] | np.ndarray, horizon_ms: int, observed_until_ms: int
) -> np.ndarray:
    """1.0 = an order in ``(t, t + horizon]``, 0.0 = none, NaN = censored (``t + horizon > end``)."""
    times = np.asarray(times, dtype=np.int64)
    return _happens_within(index.next_order_ms(users, times), times, horizon_ms, observed_until_ms)


def label_moments(
    index: FutureIndex,
    users: Sequence[str],
    times: Sequence[int] | np.ndarray,
    config: LabelConfig,
    observed_until_ms: int,
) -> np.ndarray:
    """``float32 [M, 2]`` labels (columns :data:`TASKS`) with NaN where censored."""
    h = config.horizons()
    return np.stack(
        [
            churn_labels(index, users, times, h["churn"], observed_until_ms),
            purchase_labels(index, users, times, h["purchase"], observed_until_ms),
        ],
        axis=1,
    )


# ------------------------------------------------------------------------------ moments
class MomentSampler:
    """At most one event moment per shopper per ``gap_ms``: the first event, then the first one at
    least ``gap_ms`` after the previous accepted one. Decides from the past only."""

    def __init__(self, gap_ms: int) -> None:
        self.gap_ms = int(gap_ms)
        self._last: dict[str, int] = {}

    def accept(self, user_id: str, ts_ms: int) -> bool:
        last = self._last.get(user_id)
        if last is not None and ts_ms - last < self.gap_ms:
            return False
        self._last[user_id] = ts_ms
        return True


def sweep_times(start_ms: int, end_ms: int, every_ms: int) -> list[int]:
    """Multiples of ``every_ms`` (epoch-aligned: UTC midnights for a day) in ``(start_ms, end_ms]``."""
    if every_ms <= 0 or end_ms <= start_ms:
        return []
    first = (start_ms // every_ms + 1) * every_ms
    return list(range(first, end_ms + 1, every_ms))


# ------------------------------------------------------------------------------ next item
@dataclass
class ItemSequence:
    """One shopper's item interactions, oldest first (parallel lists)."""

    items: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


def _upgrade(seq: ItemSequence, i: int, kind: str, config: LabelConfig) -> None:
    if _ENTRY_RANK[kind] > _ENTRY_RANK[seq.kinds[i]]:
        seq.kinds[i] = kind
        seq.weights[i] = config.weight(kind)


def item_sequences(events: Iterable[Event], config: LabelConfig = LabelConfig()) -> dict[str, ItemSequence]:
    """Per-shopper interaction sequences from time-sorted, applied events (see the module docstring)."""
    seqs: dict[str, ItemSequence] = {}
    since_order: dict[str, int] = {}  # index of the first entry after the shopper's last order
    for event in events:
        kind = event.kind
        if kind == KIND_VIEW or kind == KIND_CART_ADD:
            seq = seqs.get(event.user_id)
            if seq is None:
                seq = seqs[event.user_id] = ItemSequence()
            entry = ENTRY_VIEW if kind == KIND_VIEW else ENTRY_CART
            if seq.items and seq.items[-1] == event.item_id:
                _upgrade(seq, len(seq) - 1, entry, config)
                continue
            seq.items.append(event.item_id)
            seq.kinds.append(entry)
            seq.weights.append(config.weight(entry))
            seq.ts.append(event.ts_ms)
        elif kind == KIND_ORDER:
            seq = seqs.get(event.user_id)
            if seq is None:
                seq = seqs[event.user_id] = ItemSequence()
            start = since_order.get(event.user_id, 0)
            positions = {item: i for i, item in enumerate(seq.items[start:], start)}  # latest entry per item
            for line in event.order_lines:
                i = positions.get(line.item_id)
                if i is None and seq.items and seq.items[-1] == line.item_id:
                    i = len(seq) - 1
                if i is not None:
                    _upgrade(seq, i, ENTRY_ORDER, config)
                else:
                    seq.items.append(line.item_id)
                    seq.kinds.append(ENTRY_ORDER)
                    seq.weights.append(config.order_weight)
                    seq.ts.append(event.ts_ms)
                    positions[line.item_id] = len(seq) - 1
            since_order[event.user_id] = len(seq)
        # cart removes carry no interest signal for "what next": ignored
    return seqs


@dataclass
class NextItemTargets:
    """One evaluation target per shopper (parallel lists): history = items before the split."""

    users: list[str] = field(default_factory=list)
    history: list[list[str]] = field(default_factory=list)
    target: list[str] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    weight: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.users)

    def add(self, user: str, history: list[str], seq: ItemSequence, i: int) -> None:
        self.users.append(user)
        self.history.append(history)
        self.target.append(seq.items[i])
        self.kind.append(seq.kinds[i])
        self.weight.append(seq.weights[i])


@dataclass
class NextItemSplit:
    """Sequences cut at ``split_ms``.

    Attributes:
        train_users / train: every shopper's items before the split (non-empty lists only).
        next: shoppers with items on both sides; target = the first interaction at or after the
            split (the issue's protocol: a repeat of a history item is a miss when history items
            are excluded, as the served recommender does).
        next_new: target = the first interaction at or after the split with an item *not* in the
            history (what a recommender that excludes history items can hit).
    """

    split_ms: int
    train_users: list[str]
    train: list[list[str]]
    next: NextItemTargets
    next_new: NextItemTargets


def next_item_split(sequences: Mapping[str, ItemSequence], split_ms: int) -> NextItemSplit:
    """Time split of next-item data: train on the past, one target per shopper after the split."""
    from bisect import bisect_left

    out = NextItemSplit(int(split_ms), [], [], NextItemTargets(), NextItemTargets())
    for user in sorted(sequences):
        seq = sequences[user]
        cut = bisect_left(seq.ts, split_ms)
        if cut == 0:
            continue
        history = seq.items[:cut]
        out.train_users.append(user)
        out.train.append(history)
        if cut < len(seq):
            out.next.add(user, history, seq, cut)
            seen = set(history)
            for i in range(cut, len(seq)):
                if seq.items[i] not in seen:
                    out.next_new.add(user, history, seq, i)
                    break
    return out


def label_summary(y: np.ndarray) -> dict[str, dict[str, float]]:
    """Per task: labelled rows, positives, positive rate, censored rows."""
    out = {}
    for t, task in enumerate(TASKS):
        col = y[:, t]
        known = ~np.isnan(col)
        n = int(known.sum())
        pos = int(np.nansum(col))
        out[task] = {
            "labelled": n,
            "positives": pos,
            "rate": pos / n if n else math.nan,
            "censored": int((~known).sum()),
        }
    return out
