"""A synthetic shop: a deterministic, seeded stream of shopper events with real funnels and churn.

Pure Python and numpy, no Kafka: :class:`ShopSimulator` yields :class:`~features.events.Event`
objects in event-time order (:meth:`ShopSimulator.events`) or the Kafka messages that carry them
(:meth:`ShopSimulator.messages`), optionally mixed with invalid messages that record the
``features.events.REASON_*`` code the worker must reject them with. ``docs/generator.md``
describes the simulated shop.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

from features.events import (
    KIND_CART_ADD,
    KIND_CART_REMOVE,
    KIND_ORDER,
    KIND_VIEW,
    REASON_BAD_JSON,
    REASON_BAD_VALUE,
    REASON_MISSING_FIELD,
    REASON_NEGATIVE_PRICE,
    REASON_NOT_OBJECT,
    REASON_OVERSIZED,
    REASON_TS_FUTURE,
    REASON_TS_TOO_OLD,
    REASON_UNSAFE_ID,
    REASON_UNSUPPORTED_VERSION,
    REASON_WRONG_KEY,
    REASON_WRONG_TYPE,
    TOPIC_KIND_CART,
    TOPIC_KIND_ORDER,
    TOPIC_KIND_VIEW,
    Event,
    OrderLine,
    encode_event,
    event_to_dict,
    topic_kind_of,
)

DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
#: Default event-time origin: 2024-01-01T00:00:00Z, in epoch ms (fixed, so output is reproducible).
DEFAULT_START_MS = 1_704_067_200_000
#: Shortest gap between two sessions of one shopper, in ms (the usual 30-minute session cut).
MIN_SESSION_GAP_MS = 30 * 60 * 1000
#: A fading shopper's decay starts at a uniform point in the first this share of the time
#: between their first session and the span's end.
FADE_START_SHARE = 0.7

CLOCK_SIMULATED: Final = "simulated"
CLOCK_LIVE: Final = "live"


@dataclass(frozen=True, slots=True)
class Segment:
    """How one kind of shopper behaves.

    Attributes:
        name: segment name (never put in events; see :meth:`ShopSimulator.shopper_profiles`).
        weight: relative share of the shopper population.
        sessions_per_week: mean session rate of an active shopper (each shopper draws a
            log-normal multiplier around it).
        max_sessions: the shopper never returns after this many sessions (0 = no limit).
        views_per_session: mean page views per session (geometric, at least 1).
        dwell_s: mean seconds spent on a page before the next view.
        cart_prob: probability that a viewed item goes into the cart.
        remove_prob: probability, per page view while the cart is not empty, that one cart line
            is removed.
        order_prob: probability that a session ending with a non-empty cart checks it out.
        extra_quantity_prob: probability that a cart add is for 2 to 4 units instead of 1.
        price_sensitivity: exponent on (item price / category median price) in the cart
            probability: > 0 prefers cheap items, < 0 expensive ones.
        churn_prob: probability that a shopper of this segment fades out and stops.
        favourite_categories: how many categories the shopper mostly browses.
    """

    name: str
    weight: float
    sessions_per_week: float
    max_sessions: int
    views_per_session: float
    dwell_s: float
    cart_prob: float
    remove_prob: float
    order_prob: float
    extra_quantity_prob: float
    price_sensitivity: float
    churn_prob: float
    favourite_categories: int


#: The default shopper population (see ``docs/generator.md`` for the reasoning).
DEFAULT_SEGMENTS: tuple[Segment, ...] = (
    Segment("window_shopper", 0.30, 2.0, 0, 9.0, 25.0, 0.03, 0.04, 0.15, 0.05, 0.0, 0.35, 4),
    Segment("regular_buyer", 0.25, 1.5, 0, 5.0, 40.0, 0.14, 0.03, 0.60, 0.15, 0.0, 0.20, 3),
    Segment("bargain_hunter", 0.15, 3.0, 0, 12.0, 15.0, 0.06, 0.06, 0.35, 0.20, 1.5, 0.30, 5),
    Segment("one_off", 0.20, 1.0, 1, 4.0, 35.0, 0.12, 0.02, 0.35, 0.05, 0.3, 0.0, 2),
    Segment("loyal_high_value", 0.10, 4.0, 0, 6.0, 45.0, 0.22, 0.03, 0.75, 0.30, -0.5, 0.08, 3),
)

_DEPARTMENTS = (
    "electronics",
    "appliances",
    "apparel",
    "home",
    "garden",
    "toys",
    "sports",
    "beauty",
    "books",
    "grocery",
    "auto",
    "pets",
    "office",
    "health",
    "jewelry",
    "music",
)


@dataclass(frozen=True, slots=True)
class GeneratorConfig:
    """Parameters of the simulated shop; equal configs give equal output (except ``clock="live"`` ts).

    Attributes:
        seed: random seed of catalogue, population and behaviour.
        n_shoppers: number of shoppers (user ids ``u000000`` ...).
        n_items: catalogue size (item ids ``i000000`` ...); at least ``n_categories``.
        n_categories: number of categories (names like ``electronics.0``).
        duration_days: simulated span; no event has ts >= ``start_ms + span_ms``.
        start_ms: event-time origin, epoch ms. To feed a worker (which rejects ts more than
            5 min ahead of its clock) pass ``now_ms - span_ms`` so the last events land at now.
        clock: ``"simulated"`` stamps events with simulated time (reproducible);
            ``"live"`` stamps each event with the wall clock when it is yielded (the order and
            content of events stay the same, only ``ts`` changes).
        item_popularity_exponent: Zipf exponent of item popularity (weight of the r-th most
            popular item is 1 / r ** exponent).
        price_sigma: spread of item prices around their category median (log-normal sigma).
        new_shopper_fraction: share of returning shoppers whose first session falls in the first
            75% of the span instead of near its start (one-off shoppers arrive over the whole span).
        fade_days: mean time constant of a fading shopper's session-rate decay, in days.
        stop_after_decays: a fading shopper starts no session after this many time constants
            (3 leaves e**-3, 5% of the rate).
        malformed_fraction: share of :meth:`ShopSimulator.messages` that are invalid, in [0, 1).
        segments: the shopper population.
    """

    seed: int = 0
    n_shoppers: int = 10_000
    n_items: int = 5_000
    n_categories: int = 40
    duration_days: float = 28.0
    start_ms: int = DEFAULT_START_MS
    clock: Literal["simulated", "live"] = CLOCK_SIMULATED
    item_popularity_exponent: float = 1.1
    price_sigma: float = 0.6
    new_shopper_fraction: float = 0.5
    fade_days: float = 4.0
    stop_after_decays: float = 3.0
    malformed_fraction: float = 0.0
    segments: tuple[Segment, ...] = DEFAULT_SEGMENTS

    def __post_init__(self) -> None:
        if self.n_shoppers < 1 or self.n_categories < 1 or self.n_items < self.n_categories:
            raise ValueError(
                f"need n_shoppers >= 1 and n_items >= n_categories >= 1, got {self.n_shoppers}, "
                f"{self.n_items}, {self.n_categories}"
            )
        if self.duration_days <= 0 or self.fade_days <= 0 or self.stop_after_decays <= 0:
            raise ValueError("duration_days, fade_days and stop_after_decays must be positive")
        if self.clock not in (CLOCK_SIMULATED, CLOCK_LIVE):
            raise ValueError(f"clock must be {CLOCK_SIMULATED!r} or {CLOCK_LIVE!r}, got {self.clock!r}")
        if not 0.0 <= self.malformed_fraction < 1.0:
            raise ValueError(f"malformed_fraction must be in [0, 1), got {self.malformed_fraction}")
        if not 0.0 <= self.new_shopper_fraction <= 1.0:
            raise ValueError(f"new_shopper_fraction must be in [0, 1], got {self.new_shopper_fraction}")
        if not self.segments or sum(segment.weight for segment in self.segments) <= 0:
            raise ValueError("segments must be non-empty with a positive total weight")

    @property
    def span_ms(self) -> int:
        """Length of the simulated span, in ms."""
        return int(self.duration_days * DAY_MS)


@dataclass(frozen=True, slots=True)
class GeneratedMessage:
    """One Kafka message for an input topic kind; ``malformed_reason`` is the ``REASON_*`` code
    the worker must reject it with, or None for a valid message."""

    topic_kind: str
    key: bytes
    value: bytes
    malformed_reason: str | None = None


@dataclass(frozen=True, slots=True)
class ShopperProfile:
    """Ground truth about a shopper that events never carry (for labelling and tests).

    Attributes:
        user_id: the shopper's id.
        segment: the segment name.
        first_session_ms: simulated start of the first session, epoch ms.
        fades: whether the shopper churns (session rate decays, then stops).
        fade_start_ms: simulated time the decay starts, epoch ms (None when not fading).
        stop_ms: simulated time from which the shopper starts no session, epoch ms (None when
            not fading; may lie past the span's end).
    """

    user_id: str
    segment: str
    first_session_ms: int
    fades: bool
    fade_start_ms: int | None
    stop_ms: int | None


def at_most_per_shopper(messages: Iterable[GeneratedMessage], limit: int) -> Iterator[GeneratedMessage]:
    """The messages, less each shopper's (by key) beyond the first ``limit``.

    A live-clock run packs days of a shopper's activity into seconds. Capped at the state's
    ``dedup_ids``, a run of less than ``grace_ms`` stays inside the envelope docs/features.md
    states for order independence: online state equals the offline replay whatever order the
    worker reads the three topics in. (Replays after a crash need no such cap: the stored input
    offsets skip them, :mod:`streams.worker.checkpoint`.)
    """
    seen: dict[bytes | None, int] = {}
    for message in messages:
        seen[message.key] = seen.get(message.key, 0) + 1
        if seen[message.key] <= limit:
            yield message


def message_of(event: Event) -> GeneratedMessage:
    """The valid Kafka message of an event: its topic kind, user_id key and contract JSON."""
    return GeneratedMessage(topic_kind_of(event), event.user_id.encode(), encode_event(event))


# Session plan steps: (ts_ms, step, item index or order lines, quantity).
_VIEW, _ADD, _REMOVE, _ORDER = 0, 1, 2, 3


class _Shopper:
    """Static traits (from the seed) and run state of one shopper."""

    __slots__ = (
        "user_id",
        "segment",
        "rate_per_ms",
        "first_session_ms",
        "fade_start_ms",
        "fade_decay_ms",
        "stop_ms",
        "favourites",
        "favourite_cum",
        "sessions",
        "cart",
        "recent",
        "plan",
        "position",
    )

    def __init__(
        self,
        user_id: str,
        segment: Segment,
        rate_per_ms: float,
        first_session_ms: int,
        fade_start_ms: float,
        fade_decay_ms: float,
        stop_ms: float,
        favourites: tuple[int, ...],
        favourite_cum: tuple[float, ...],
    ) -> None:
        self.user_id = user_id
        self.segment = segment
        self.rate_per_ms = rate_per_ms
        self.first_session_ms = first_session_ms
        self.fade_start_ms = fade_start_ms
        self.fade_decay_ms = fade_decay_ms
        self.stop_ms = stop_ms
        self.favourites = favourites
        self.favourite_cum = favourite_cum
        self.sessions = 0
        self.cart: dict[int, int] = {}
        self.recent: list[int] = []
        self.plan: list[tuple[int, int, Any, int]] = []
        self.position = 0

    def engagement(self, ts_ms: int) -> float:
        """1 while active; decays as exp(-t / decay) once fading starts."""
        if ts_ms <= self.fade_start_ms:
            return 1.0
        return math.exp(-(ts_ms - self.fade_start_ms) / self.fade_decay_ms)


class ShopSimulator:
    """A seeded simulated shop: catalogue, shoppers in segments, sessions, funnels and churn.

    Every call of :meth:`events` or :meth:`messages` replays the same simulation from the start.
    """

    def __init__(self, config: GeneratorConfig = GeneratorConfig()) -> None:
        self.config = config
        self.end_ms = config.start_ms + config.span_ms
        self._build_catalogue()
        self._profiles = self._build_population()

    # -- catalogue and population (fixed by the seed) -------------------------------------------

    def _build_catalogue(self) -> None:
        config = self.config
        rng = np.random.default_rng(config.seed)
        n_items, n_categories = config.n_items, config.n_categories
        self.category_names = [
            f"{_DEPARTMENTS[c % len(_DEPARTMENTS)]}.{c // len(_DEPARTMENTS)}" for c in range(n_categories)
        ]
        category_share = 1.0 / np.arange(1, n_categories + 1) ** 0.7
        item_category = np.concatenate(
            [
                np.arange(n_categories),
                rng.choice(n_categories, size=n_items - n_categories, p=category_share / category_share.sum()),
            ]
        )
        rng.shuffle(item_category)
        median_price = np.exp(rng.uniform(math.log(5.0), math.log(500.0), size=n_categories))
        log_price_ratio = rng.normal(0.0, config.price_sigma, size=n_items)
        prices = np.maximum(np.round(median_price[item_category] * np.exp(log_price_ratio), 2), 0.5)
        popularity = 1.0 / (rng.permutation(n_items) + 1.0) ** config.item_popularity_exponent

        self.item_ids = [f"i{index:06d}" for index in range(n_items)]
        self.item_prices = prices.tolist()
        self.item_log_price_ratio = log_price_ratio.tolist()
        self.item_category = item_category.tolist()
        self.item_category_name = [self.category_names[c] for c in self.item_category]
        # Items of a category sorted by price, so neighbours are "similar items" for browsing chains.
        self.category_items: list[list[int]] = []
        self.category_cum_popularity: list[list[float]] = []
        self.item_position: list[int] = [0] * n_items
        for category in range(n_categories):
            members = np.flatnonzero(item_category == category)
            members = members[np.argsort(prices[members], kind="stable")]
            self.category_items.append(members.tolist())
            self.category_cum_popularity.append(np.cumsum(popularity[members]).tolist())
            for position, item in enumerate(members.tolist()):
                self.item_position[item] = position
        category_popularity = np.bincount(item_category, weights=popularity, minlength=n_categories)
        self.category_cum = np.cumsum(category_popularity).tolist()

    def _pick_category(self, rng: random.Random) -> int:
        return bisect_right(self.category_cum, rng.random() * self.category_cum[-1])

    def _build_population(self) -> list[ShopperProfile]:
        config = self.config
        rng = random.Random(f"{config.seed}:population")
        segments = config.segments
        segment_cum = np.cumsum([segment.weight for segment in segments]).tolist()
        self._shoppers: list[_Shopper] = []
        profiles = []
        for index in range(config.n_shoppers):
            segment = segments[bisect_right(segment_cum, rng.random() * segment_cum[-1])]
            rate_per_ms = segment.sessions_per_week / WEEK_MS * rng.lognormvariate(0.0, 0.5)
            if segment.max_sessions == 1:
                first = config.start_ms + int(rng.random() * config.span_ms)
            elif rng.random() < config.new_shopper_fraction:
                first = config.start_ms + int(rng.random() * 0.75 * config.span_ms)
            else:
                first = config.start_ms + int(rng.expovariate(rate_per_ms))
            fades = rng.random() < segment.churn_prob
            if fades:
                fade_start: float = first + int(rng.random() * FADE_START_SHARE * max(self.end_ms - first, 0))
                decay = config.fade_days * DAY_MS * rng.uniform(0.5, 1.5)
                stop: float = fade_start + int(config.stop_after_decays * decay)
            else:
                fade_start, decay, stop = math.inf, 1.0, math.inf
            favourites: list[int] = []
            wanted = min(segment.favourite_categories, config.n_categories)
            while len(favourites) < wanted:
                category = self._pick_category(rng)
                if category not in favourites:
                    favourites.append(category)
            affinity = np.cumsum([rng.expovariate(1.0) for _ in favourites]).tolist()
            user_id = f"u{index:06d}"
            self._shoppers.append(
                _Shopper(
                    user_id, segment, rate_per_ms, first, fade_start, decay, stop, tuple(favourites), tuple(affinity)
                )
            )
            profiles.append(
                ShopperProfile(
                    user_id,
                    segment.name,
                    first,
                    fades,
                    int(fade_start) if fades else None,
                    int(stop) if fades else None,
                )
            )
        return profiles

    def shopper_profiles(self) -> list[ShopperProfile]:
        """Ground truth per shopper (segment, churn timing), in user-id order."""
        return list(self._profiles)

    # -- sessions -------------------------------------------------------------------------------

    def _plan_session(self, shopper: _Shopper, start_ms: int, rng: random.Random) -> None:
        """Fill ``shopper.plan`` with one session starting at ``start_ms`` (mutates the cart)."""
        segment = shopper.segment
        engagement = shopper.engagement(start_ms)
        cart, recent = shopper.cart, shopper.recent
        mean_views = segment.views_per_session * (0.4 + 0.6 * engagement)
        n_views = 1 + int(rng.expovariate(1.0 / mean_views)) if mean_views > 1.0 else 1
        session_categories = []
        for _ in range(1 + (rng.random() < 0.5) + (rng.random() < 0.2)):
            if rng.random() < 0.1:
                session_categories.append(self._pick_category(rng))
            else:
                cum = shopper.favourite_cum
                session_categories.append(shopper.favourites[bisect_right(cum, rng.random() * cum[-1])])
        cart_prob = segment.cart_prob * (0.5 + 0.5 * engagement)
        sensitivity = segment.price_sensitivity
        dwell_ms = segment.dwell_s * 1000.0
        plan: list[tuple[int, int, Any, int]] = []
        ts = start_ms
        item = -1
        for _ in range(n_views):
            draw = rng.random()
            if item >= 0 and draw < 0.3:  # a similar item: a price neighbour in the same category
                members = self.category_items[self.item_category[item]]
                position = self.item_position[item] + rng.choice((-2, -1, 1, 2))
                item = members[min(max(position, 0), len(members) - 1)]
            elif recent and draw < 0.4:  # back to something seen before
                item = recent[int(rng.random() * len(recent))]
            else:
                category = session_categories[int(rng.random() * len(session_categories))]
                category_cum = self.category_cum_popularity[category]
                item = self.category_items[category][bisect_right(category_cum, rng.random() * category_cum[-1])]
            plan.append((ts, _VIEW, item, 1))
            recent.append(item)
            if len(recent) > 20:
                del recent[0]
            ts += 1000 + int(rng.expovariate(1.0 / dwell_ms))
            probability = cart_prob
            if sensitivity:
                probability *= min(max(math.exp(-sensitivity * self.item_log_price_ratio[item]), 0.2), 3.0)
            if rng.random() < probability:
                quantity = 1 + rng.randint(1, 3) if rng.random() < segment.extra_quantity_prob else 1
                cart[item] = cart.get(item, 0) + quantity
                plan.append((ts, _ADD, item, quantity))
                ts += 2000 + int(rng.random() * 18_000)
            if cart and rng.random() < segment.remove_prob:
                removed = rng.choice(list(cart))
                plan.append((ts, _REMOVE, removed, cart.pop(removed)))
                ts += 1000 + int(rng.random() * 9000)
        if cart and rng.random() < segment.order_prob * math.sqrt(engagement):
            ts += 30_000 + int(rng.random() * 150_000)
            plan.append((ts, _ORDER, tuple(cart.items()), 0))
            cart.clear()
        shopper.sessions += 1
        shopper.plan = plan
        shopper.position = 0

    def _next_session_ms(self, shopper: _Shopper, after_ms: int, rng: random.Random) -> int | None:
        """Start of the shopper's next session after ``after_ms``, or None if they never return."""
        max_sessions = shopper.segment.max_sessions
        if max_sessions and shopper.sessions >= max_sessions:
            return None
        rate = shopper.rate_per_ms * shopper.engagement(after_ms)
        start = after_ms + MIN_SESSION_GAP_MS + int(rng.expovariate(rate))
        if start >= shopper.stop_ms or start >= self.end_ms:
            return None
        return start

    # -- output ---------------------------------------------------------------------------------

    def events(self, limit: int | None = None) -> Iterator[Event]:
        """Events of all shoppers in non-decreasing ``ts_ms``, at most ``limit`` of them."""
        rng = random.Random(f"{self.config.seed}:sessions")
        live = self.config.clock == CLOCK_LIVE
        for shopper in self._shoppers:
            shopper.sessions, shopper.cart, shopper.recent, shopper.plan = 0, {}, [], []
        heap = []
        for index, shopper in enumerate(self._shoppers):
            if shopper.first_session_ms < self.end_ms:
                self._plan_session(shopper, shopper.first_session_ms, rng)
                heap.append((shopper.first_session_ms, index))
        heapq.heapify(heap)
        item_ids, prices, category_names = self.item_ids, self.item_prices, self.item_category_name
        end_ms, shoppers = self.end_ms, self._shoppers
        id_prefix = f"e{self.config.seed}-"
        emitted = 0
        last_live_ms = 0
        while heap and (limit is None or emitted < limit):
            ts, index = heap[0]
            if ts >= end_ms:
                break
            shopper = shoppers[index]
            user_id = shopper.user_id
            session_id = f"{user_id}-{shopper.sessions}"
            _, step, item, quantity = shopper.plan[shopper.position]
            shopper.position += 1
            if shopper.position < len(shopper.plan):
                heapq.heapreplace(heap, (shopper.plan[shopper.position][0], index))
            else:
                next_ms = self._next_session_ms(shopper, ts, rng)
                if next_ms is None:
                    heapq.heappop(heap)
                else:
                    self._plan_session(shopper, next_ms, rng)
                    heapq.heapreplace(heap, (next_ms, index))
            if live:
                last_live_ms = ts = max(last_live_ms, time.time_ns() // 1_000_000)
            event_id = f"{id_prefix}{emitted}"
            emitted += 1
            if step == _VIEW:
                yield Event(
                    KIND_VIEW,
                    event_id,
                    user_id,
                    ts,
                    session_id=session_id,
                    item_id=item_ids[item],
                    category=category_names[item],
                    price=prices[item],
                    quantity=1,
                )
            elif step == _ORDER:
                lines = tuple(
                    OrderLine(item_ids[line_item], line_quantity, prices[line_item])
                    for line_item, line_quantity in item
                )
                total = round(sum(line.quantity * line.price for line in lines), 2)
                yield Event(
                    KIND_ORDER,
                    event_id,
                    user_id,
                    ts,
                    session_id=session_id,
                    order_id=f"{session_id}-o",
                    order_lines=lines,
                    total=total,
                )
            else:
                yield Event(
                    KIND_CART_ADD if step == _ADD else KIND_CART_REMOVE,
                    event_id,
                    user_id,
                    ts,
                    session_id=session_id,
                    item_id=item_ids[item],
                    category=category_names[item],
                    price=prices[item],
                    quantity=quantity,
                )

    def messages(self, limit: int | None = None) -> Iterator[GeneratedMessage]:
        """Kafka messages of :meth:`events`, at most ``limit`` of them (malformed ones included).

        With ``malformed_fraction`` f > 0, invalid messages derived from the next valid event are
        inserted so that a share f of all messages is invalid; the valid messages are exactly
        those of a run with f = 0.
        """
        fraction = self.config.malformed_fraction
        rng = random.Random(f"{self.config.seed}:malformed")
        produced = 0
        for event in self.events():
            while fraction and rng.random() < fraction:
                if limit is not None and produced >= limit:
                    return
                yield malformed_message(event, rng)
                produced += 1
            if limit is not None and produced >= limit:
                return
            yield message_of(event)
            produced += 1


# -- invalid messages --------------------------------------------------------------------------

_REQUIRED_FIELDS = {
    TOPIC_KIND_VIEW: ("event_id", "user_id", "ts", "session_id", "item_id", "category", "price"),
    TOPIC_KIND_CART: ("event_id", "user_id", "ts", "session_id", "item_id", "price", "action", "quantity"),
    TOPIC_KIND_ORDER: ("event_id", "user_id", "ts", "order_id", "items", "total"),
}
_FIFTY_YEARS_MS = 50 * 365 * DAY_MS
_Doc = dict[str, Any]


def _bad_json(doc: _Doc, topic_kind: str, rng: random.Random) -> bytes:
    raw = json.dumps(doc).encode()
    variant = rng.randrange(3)
    if variant == 0:
        return raw[: len(raw) // 2]  # truncated
    if variant == 1:
        return raw[:-1] + b', "note": "caf\xe9"}'  # Latin-1 byte: not UTF-8
    return repr(doc).encode()  # a Python dict repr: single quotes


def _not_object(doc: _Doc, topic_kind: str, rng: random.Random) -> bytes:
    return json.dumps([doc]).encode()


def _missing_field(doc: _Doc, topic_kind: str, rng: random.Random) -> bytes:
    del doc[rng.choice(_REQUIRED_FIELDS[topic_kind])]
    return json.dumps(doc).encode()


def _wrong_type(doc: _Doc, topic_kind: str, rng: random.Random) -> bytes:
    name = rng.choice(("ts", "user_id", "total" if topic_kind == TOPIC_KIND_ORDER else "price"))
    doc[name] = 12345 if name == "user_id" else str(doc[name])
    return json.dumps(doc).encode()


def _bad_value(doc: _Doc, topic_kind: str, rng: random.Random) -> bytes:
    if topic_kind == TOPIC_KIND_ORDER:
        doc["items"] = []
    elif topic_kind == TOPIC_KIND_CART:
        doc["action"] = "update"
    else:
        doc["category"] = ""
    return json.dumps(doc).encode()


def _negative_price(doc: _Doc, topic_kind: str, rng: random.Random) -> bytes:
    name = "total" if topic_kind == TOPIC_KIND_ORDER else "price"
    doc[name] = -max(doc[name], 0.01)
    return json.dumps(doc).encode()


def _ts_in_future(doc: _Doc, topic_kind: str, rng: random.Random) -> bytes:
    doc["ts"] += _FIFTY_YEARS_MS
    return json.dumps(doc).encode()


def _ts_too_old(doc: _Doc, topic_kind: str, rng: random.Random) -> bytes:
    doc["ts"] //= 1000  # seconds instead of milliseconds
    return json.dumps(doc).encode()


def _unsupported_version(doc: _Doc, topic_kind: str, rng: random.Random) -> bytes:
    doc["schema_version"] = 2
    return json.dumps(doc).encode()


def _oversized(doc: _Doc, topic_kind: str, rng: random.Random) -> bytes:
    doc["padding"] = "x" * (65 * 1024)
    return json.dumps(doc).encode()


#: (prefix, suffix) pairs that make an id unsafe, one of each kind docs/events.md ("Ids") names:
#: a log-line break, NUL, a bidi override, a zero-width space, a no-break space, a trailing
#: space and a CSV formula.
_UNSAFE_ID_WRAPPINGS = (
    ("", "\nlevel=error"),
    ("", "\x00"),
    ("\u202e", ""),
    ("\u200b", ""),
    ("", "\u00a0x"),
    ("", " "),
    ("=", ""),
)


def _unsafe_id(doc: _Doc, topic_kind: str, rng: random.Random) -> bytes:
    name = rng.choice(("event_id", "user_id", "order_id" if topic_kind == TOPIC_KIND_ORDER else "item_id"))
    prefix, suffix = rng.choice(_UNSAFE_ID_WRAPPINGS)
    doc[name] = prefix + doc[name] + suffix
    return json.dumps(doc).encode()


#: Invalid-message makers by the reason the worker must give; each breaks exactly one rule.
_MALFORMERS: dict[str, Callable[[_Doc, str, random.Random], bytes]] = {
    REASON_BAD_JSON: _bad_json,
    REASON_NOT_OBJECT: _not_object,
    REASON_MISSING_FIELD: _missing_field,
    REASON_WRONG_TYPE: _wrong_type,
    REASON_BAD_VALUE: _bad_value,
    REASON_NEGATIVE_PRICE: _negative_price,
    REASON_TS_FUTURE: _ts_in_future,
    REASON_TS_TOO_OLD: _ts_too_old,
    REASON_UNSUPPORTED_VERSION: _unsupported_version,
    REASON_OVERSIZED: _oversized,
    REASON_UNSAFE_ID: _unsafe_id,
}
#: Reasons :meth:`ShopSimulator.messages` produces invalid messages for (plus ``wrong_key``).
MALFORMED_REASONS: tuple[str, ...] = (*_MALFORMERS, REASON_WRONG_KEY)


def malformed_message(event: Event, rng: random.Random) -> GeneratedMessage:
    """An invalid message derived from a valid event, of a reason drawn uniformly from
    :data:`MALFORMED_REASONS` (ts far in the future is 50 years ahead, so it is invalid for any
    worker clock)."""
    topic_kind = topic_kind_of(event)
    reason = rng.choice(MALFORMED_REASONS)
    if reason == REASON_WRONG_KEY:  # keyed by session (or event) instead of user
        return GeneratedMessage(topic_kind, (event.session_id or event.event_id).encode(), encode_event(event), reason)
    value = _MALFORMERS[reason](event_to_dict(event), topic_kind, rng)
    return GeneratedMessage(topic_kind, event.user_id.encode(), value, reason)
