"""ShopperState against a brute-force reference over random event streams, plus arrival rules."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import pytest

from features.events import KIND_CART_ADD, KIND_CART_REMOVE, KIND_ORDER, KIND_VIEW, Event, OrderLine
from features.state import (
    AFFINITY_HALF_LIFE_MS,
    AFFINITY_TOP_K,
    APPLIED,
    COARSE_BUCKET_MS,
    DAY_MS,
    DUPLICATE,
    FINE_BUCKET_MS,
    HOUR_MS,
    LATE,
    MINUTE_MS,
    RAW_FEATURE_NAMES,
    ShopperState,
    StateConfig,
)

START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
ITEMS = [f"i{n:04d}" for n in range(30)]
CATEGORIES = ["toys", "books", "garden", "music", "pets"]
#: dedup_ids large enough that every event of the grace period is kept, which is what makes
#: out-of-order arrival exact (see StateConfig.dedup_ids).
ROOMY = StateConfig(dedup_ids=100_000)


def random_stream(
    seed: int, n: int, user_id: str = "u1", start_ms: int = START_MS, categories: list[str] = CATEGORIES
) -> list[Event]:
    """Events of one shopper in strictly increasing ts: bursts (sessions), gaps of hours and days."""
    rng = random.Random(seed)
    events = []
    ts = start_ms
    for i in range(n):
        r = rng.random()
        if r < 0.70:
            ts += rng.randint(1, 5 * MINUTE_MS)
        elif r < 0.85:
            ts += rng.randint(20 * MINUTE_MS, 3 * HOUR_MS)
        elif r < 0.97:
            ts += rng.randint(3 * HOUR_MS, 3 * DAY_MS)
        else:
            ts += rng.randint(5 * DAY_MS, 20 * DAY_MS)
        kind = rng.choices((KIND_VIEW, KIND_CART_ADD, KIND_CART_REMOVE, KIND_ORDER), (60, 20, 8, 6))[0]
        event_id = f"{user_id}-e{i}"
        if kind == KIND_ORDER:
            lines = tuple(
                OrderLine(rng.choice(ITEMS), rng.randint(1, 3), round(rng.uniform(1, 300), 2))
                for _ in range(rng.randint(1, 3))
            )
            total = round(sum(line.quantity * line.price for line in lines), 2)
            events.append(Event(kind, event_id, user_id, ts, order_id=f"o{i}", order_lines=lines, total=total))
        else:
            category = rng.choice(categories) if rng.random() < 0.9 else ""
            events.append(
                Event(
                    kind,
                    event_id,
                    user_id,
                    ts,
                    session_id="s",
                    item_id=rng.choice(ITEMS),
                    category=category,
                    price=round(rng.uniform(0.5, 500), 2),
                    quantity=1 if kind == KIND_VIEW else rng.randint(1, 4),
                )
            )
    return events


def fold(events: list[Event], config: StateConfig = StateConfig(), user_id: str = "u1") -> ShopperState:
    state = ShopperState.new(user_id)
    for event in events:
        assert state.update(event, config) == APPLIED
    return state


def shuffled_within(events: list[Event], max_delay_ms: int, seed: int) -> list[Event]:
    """Arrival order in which every event is at most ``max_delay_ms`` older than the watermark."""
    rng = random.Random(seed)
    return [e for _, e in sorted(((e.ts_ms + rng.randint(0, max_delay_ms), e) for e in events), key=lambda p: p[0])]


# -- brute-force reference ------------------------------------------------------------------------


def reference(events: list[Event], now: int, gap_ms: int = 30 * MINUTE_MS) -> dict[str, float]:
    """Every raw feature from the full event list, by definition (bucket-aligned windows)."""
    events = sorted(events, key=lambda e: e.ts_ms)
    last = events[-1].ts_ms

    def window(width: int, n: int, lag: int = 0) -> list[Event]:
        hi = now // width - lag
        return [e for e in events if hi - n < e.ts_ms // width <= hi]

    ref: dict[str, float] = {}
    for label, width, n in (
        ("1h", FINE_BUCKET_MS, 12),
        ("24h", HOUR_MS, 24),
        ("7d", COARSE_BUCKET_MS, 28),
        ("30d", COARSE_BUCKET_MS, 120),
    ):
        in_window = window(width, n)
        for name, kind in (
            ("views", KIND_VIEW),
            ("cart_adds", KIND_CART_ADD),
            ("cart_removes", KIND_CART_REMOVE),
            ("orders", KIND_ORDER),
        ):
            ref[f"{name}_{label}"] = sum(1 for e in in_window if e.kind == kind)

    def since(kind: str | None) -> float:
        times = [e.ts_ms for e in events if kind is None or e.kind == kind]
        return now - max(times) if times else math.inf

    ref["ms_since_last_event"] = since(None)
    ref["ms_since_last_view"] = since(KIND_VIEW)
    ref["ms_since_last_cart_add"] = since(KIND_CART_ADD)
    ref["ms_since_last_order"] = since(KIND_ORDER)
    ref["ms_since_first_event"] = now - events[0].ts_ms
    orders = [e for e in events if e.kind == KIND_ORDER]
    ref["orders_lifetime"] = len(orders)
    ref["revenue_30d"] = sum(round(e.total * 100) for e in window(COARSE_BUCKET_MS, 120) if e.kind == KIND_ORDER) / 100
    ref["revenue_lifetime"] = sum(round(e.total * 100) for e in orders) / 100
    ref["avg_order_value"] = ref["revenue_lifetime"] / len(orders) if orders else 0.0

    sessions: list[list[Event]] = []
    for e in events:
        if sessions and e.ts_ms - sessions[-1][-1].ts_ms <= gap_ms:
            sessions[-1].append(e)
        else:
            sessions.append([e])
    current = sessions[-1]
    ref["session_events"] = len(current)
    ref["session_distinct_items"] = len({e.item_id for e in current if e.item_id})
    ref["session_length_ms"] = last - current[0].ts_ms
    week_hi = now // COARSE_BUCKET_MS
    ref["sessions_7d"] = sum(1 for s in sessions if week_hi - 28 < s[0].ts_ms // COARSE_BUCKET_MS <= week_hi)

    last_order = max((e.ts_ms for e in orders), default=0)
    net: dict[str, int] = defaultdict(int)
    price: dict[str, int] = {}
    adds = 0
    for e in events:
        if e.kind in (KIND_CART_ADD, KIND_CART_REMOVE) and e.ts_ms > last_order:
            net[e.item_id] += e.quantity if e.kind == KIND_CART_ADD else -e.quantity
            price[e.item_id] = round(e.price * 100)
            adds += e.kind == KIND_CART_ADD
    ref["cart_items_now"] = sum(q for q in net.values() if q > 0)
    ref["cart_value_now"] = sum(q * price[i] for i, q in net.items() if q > 0) / 100
    ref["cart_adds_since_order"] = adds

    month = window(COARSE_BUCKET_MS, 120)
    ref["active_days_30d"] = len({e.ts_ms // DAY_MS for e in month})
    this_week, week_before = len(window(COARSE_BUCKET_MS, 28)), len(window(COARSE_BUCKET_MS, 28, lag=28))
    ref["trend_7d"] = (this_week - week_before) / (this_week + week_before) if this_week + week_before else 0.0
    v, a, o = ref["views_30d"], ref["cart_adds_30d"], ref["orders_30d"]
    ref["view_to_cart_30d"] = min(a / v, 1.0) if v else 0.0
    ref["cart_to_order_30d"] = min(o / a, 1.0) if a else 0.0

    affinity: dict[str, float] = defaultdict(float)
    for e in events:
        weight = {KIND_VIEW: 1.0, KIND_CART_ADD: 3.0}.get(e.kind, 0.0)
        if weight and e.category:
            affinity[e.category] += weight * 2.0 ** (-(now - e.ts_ms) / AFFINITY_HALF_LIFE_MS)
    total = sum(affinity.values())
    ref["category_top_share"] = max(affinity.values()) / total if total else 0.0
    ref["category_affinity_total"] = total
    assert set(ref) == set(RAW_FEATURE_NAMES)
    return ref


def reference_history(events: list[Event], n: int = 50) -> list[tuple[str, str, int]]:
    """The last ``n`` interactions in canonical order: by time, then kind code, then item id
    (so an order's lines, which share its time, are sorted by item id)."""
    codes = {KIND_VIEW: 0, KIND_CART_ADD: 1, KIND_CART_REMOVE: 2, KIND_ORDER: 3}
    entries: list[tuple[str, str, int]] = []
    for e in events:
        if e.kind == KIND_ORDER:
            entries.extend((line.item_id, e.kind, e.ts_ms) for line in e.order_lines)
        else:
            entries.append((e.item_id, e.kind, e.ts_ms))
    entries.sort(key=lambda entry: (entry[2], codes[entry[1]], entry[0]))
    return entries[-n:]


def assert_matches(state: ShopperState, events: list[Event], now: int) -> None:
    got = dict(zip(RAW_FEATURE_NAMES, state.raw_features(now), strict=True))
    want = reference(events, now)
    for name in RAW_FEATURE_NAMES:
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-9), f"{name} at now={now}"


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_every_feature_matches_brute_force_reference(seed):
    events = random_stream(seed, 400)
    state = fold(events)
    last = events[-1].ts_ms
    for now in (
        last,
        last + 7 * MINUTE_MS,
        last + 50 * MINUTE_MS,
        last + 5 * HOUR_MS,
        last + 3 * DAY_MS,
        last + 8 * DAY_MS,
        last + 29 * DAY_MS,
        last + 40 * DAY_MS,
    ):
        assert_matches(state, events, now)
    assert state.recent_items() == reference_history(events)
    assert state.history_item_ids() == [item for item, _, _ in reference_history(events)]


@pytest.mark.parametrize("seed", range(3))
def test_features_match_reference_after_every_prefix(seed):
    events = random_stream(100 + seed, 150)
    state = ShopperState.new("u1")
    for i, event in enumerate(events):
        assert state.update(event, StateConfig()) == APPLIED
        assert_matches(state, events[: i + 1], event.ts_ms)


@pytest.mark.parametrize("seed", range(4))
def test_out_of_order_within_grace_equals_in_order(seed):
    events = random_stream(200 + seed, 400)
    in_order = fold(events, ROOMY)
    shuffled = shuffled_within(events, ROOMY.grace_ms - 1, seed)
    assert shuffled != events
    out_of_order = fold(shuffled, ROOMY)
    last = events[-1].ts_ms
    for now in (last, last + 20 * MINUTE_MS, last + 2 * DAY_MS, last + 10 * DAY_MS):
        assert out_of_order.raw_features(now) == pytest.approx(in_order.raw_features(now), rel=1e-12, abs=1e-12)
        assert_matches(out_of_order, events, now)
    assert out_of_order.recent_items() == in_order.recent_items()
    for name in (
        "fine_keys",
        "fine_counts",
        "hour_keys",
        "hour_counts",
        "coarse_keys",
        "coarse_values",
        "recent_ts",
        "recent_starts",
        "frozen_session_start_ms",
        "frozen_session_events",
    ):
        assert getattr(out_of_order, name) == getattr(in_order, name), name


def test_out_of_order_event_lands_in_its_own_bucket():
    config = StateConfig()
    state = ShopperState.new("u1")
    t = START_MS + 10 * HOUR_MS
    state.update(Event(KIND_VIEW, "a", "u1", t, item_id="x"), config)
    late_but_ok = t - 40 * MINUTE_MS  # previous hour bucket, 8 fine buckets back
    assert state.update(Event(KIND_VIEW, "b", "u1", late_but_ok, item_id="y"), config) == APPLIED
    assert state.fine_keys == [late_but_ok // FINE_BUCKET_MS, t // FINE_BUCKET_MS]
    assert state.hour_keys == [late_but_ok // HOUR_MS, t // HOUR_MS]
    assert state.last_event_ms == t
    assert [entry[0] for entry in state.recent_items()] == ["y", "x"]


def test_late_beyond_grace_is_not_applied():
    config = StateConfig()
    events = random_stream(7, 60)
    state = fold(events, config)
    before = state.raw_features(events[-1].ts_ms), state.recent_items(), state.events_lifetime
    last = state.last_event_ms
    too_old = Event(
        KIND_ORDER,
        "late-1",
        "u1",
        last - config.grace_ms - 1,
        order_id="o",
        order_lines=(OrderLine("i0001", 1, 10.0),),
        total=10.0,
    )
    assert state.update(too_old, config) == LATE
    edge = Event(KIND_VIEW, "edge-1", "u1", last - config.grace_ms, item_id="i0002")
    assert state.update(edge, config) == APPLIED  # exactly grace old is still on time
    assert state.events_lifetime == before[2] + 1
    assert state.update(too_old, config) == LATE
    assert state.orders_lifetime == sum(e.kind == KIND_ORDER for e in events)


def test_duplicates_are_applied_once():
    config = StateConfig()
    events = random_stream(8, 200)
    rng = random.Random(8)
    state = ShopperState.new("u1")
    redelivered = {DUPLICATE: 0, LATE: 0}
    for i, event in enumerate(events):
        assert state.update(event, config) == APPLIED
        if rng.random() < 0.3:  # redeliver one of the last few events, as a Kafka retry would
            again = events[max(0, i - rng.randint(0, 10))]
            expected = DUPLICATE if again.ts_ms >= state.last_event_ms - config.grace_ms else LATE
            assert state.update(again, config) == expected
            redelivered[expected] += 1
    assert redelivered[DUPLICATE] >= 10 and redelivered[LATE] >= 10
    assert state == fold(events, config)


def test_duplicate_older_than_grace_is_late_not_reapplied():
    config = StateConfig()
    state = ShopperState.new("u1")
    first = Event(KIND_VIEW, "e1", "u1", START_MS, item_id="a")
    state.update(first, config)
    state.update(Event(KIND_VIEW, "e2", "u1", START_MS + 3 * HOUR_MS, item_id="b"), config)
    assert state.update(first, config) == LATE
    assert state.events_lifetime == 2


def test_dedup_ids_bound_the_remembered_ids():
    config = StateConfig(dedup_ids=8)
    events = [Event(KIND_VIEW, f"e{i}", "u1", START_MS + i * 1000, item_id="a") for i in range(20)]
    state = fold(events, config)
    assert len(state.recent_ids) == 8
    assert state.update(events[-1], config) == DUPLICATE
    assert state.update(events[-8], config) == DUPLICATE
    assert state.update(events[-9], config) == APPLIED  # forgotten: the bound is a count
    assert_matches(fold(events, config), events, events[-1].ts_ms)  # bounded ids keep in-order sessions exact


def test_buckets_roll_off_and_memory_stays_bounded():
    config = StateConfig()
    state = ShopperState.new("u1")
    ts = START_MS
    for i in range(3000):  # one event every 17 min for ~35 days
        ts += 17 * MINUTE_MS
        state.update(Event(KIND_VIEW, f"e{i}", "u1", ts, item_id=f"i{i % 500}", category=f"c{i % 9}"), config)
    assert len(state.fine_keys) <= 12 and len(state.hour_keys) <= 24 and len(state.coarse_keys) <= 120
    assert len(state.recent_ts) <= config.dedup_ids and len(state.history_ts) == config.history_len
    assert len(state.affinity_categories) == AFFINITY_TOP_K and len(state.frozen_session_items) <= 64
    raw = dict(zip(RAW_FEATURE_NAMES, state.raw_features(), strict=True))
    assert 3 <= raw["views_1h"] <= 4 and 81 <= raw["views_24h"] <= 85  # 55-60 min, 23-24 h of 17 min steps
    after_quiet_hour = dict(zip(RAW_FEATURE_NAMES, state.raw_features(ts + HOUR_MS), strict=True))
    assert after_quiet_hour["views_1h"] == 0 and after_quiet_hour["views_24h"] < raw["views_24h"]
    state.update(Event(KIND_VIEW, "far", "u1", ts + 31 * DAY_MS, item_id="z"), config)
    assert state.fine_keys == [(ts + 31 * DAY_MS) // FINE_BUCKET_MS]
    assert len(state.hour_keys) == 1 and len(state.coarse_keys) == 1
    raw = dict(zip(RAW_FEATURE_NAMES, state.raw_features(), strict=True))
    assert raw["views_30d"] == 1 and raw["views_7d"] == 1 and raw["sessions_7d"] == 1
    assert raw["session_events"] == 1 and raw["ms_since_first_event"] > 60 * DAY_MS


def test_bucketed_windows_are_within_one_bucket_of_exact_sliding_windows():
    events = random_stream(11, 600)
    state = fold(events)
    now = events[-1].ts_ms
    raw = dict(zip(RAW_FEATURE_NAMES, state.raw_features(now), strict=True))
    views = [e.ts_ms for e in events if e.kind == KIND_VIEW]
    for label, span, width in (
        ("1h", HOUR_MS, FINE_BUCKET_MS),
        ("24h", DAY_MS, HOUR_MS),
        ("7d", 7 * DAY_MS, COARSE_BUCKET_MS),
        ("30d", 30 * DAY_MS, COARSE_BUCKET_MS),
    ):
        shortest = sum(1 for t in views if now - (span - width) < t <= now)
        longest = sum(1 for t in views if now - span < t <= now)
        assert shortest <= raw[f"views_{label}"] <= longest, label


def test_late_event_bridging_two_sessions_merges_them():
    config = StateConfig()
    state = ShopperState.new("u1")
    for event_id, offset, item in (("a", 0, "x"), ("b", 40 * MINUTE_MS, "y")):
        state.update(Event(KIND_VIEW, event_id, "u1", START_MS + offset, item_id=item), config)
    assert state.current_session() == (START_MS + 40 * MINUTE_MS, 1, 1)
    state.update(Event(KIND_VIEW, "c", "u1", START_MS + 20 * MINUTE_MS, item_id="z"), config)
    assert state.current_session() == (START_MS, 3, 3)
    assert dict(zip(RAW_FEATURE_NAMES, state.raw_features(), strict=True))["sessions_7d"] == 1


def test_late_order_clears_only_cart_lines_before_it():
    config = StateConfig()
    state = ShopperState.new("u1")
    state.update(Event(KIND_CART_ADD, "a", "u1", START_MS, item_id="x", price=10.0, quantity=2), config)
    state.update(Event(KIND_CART_ADD, "b", "u1", START_MS + 20 * MINUTE_MS, item_id="y", price=5.0, quantity=1), config)
    state.update(
        Event(
            KIND_ORDER,
            "o",
            "u1",
            START_MS + 10 * MINUTE_MS,
            order_id="o",
            order_lines=(OrderLine("x", 2, 10.0),),
            total=20.0,
        ),
        config,
    )
    raw = dict(zip(RAW_FEATURE_NAMES, state.raw_features(), strict=True))
    assert (raw["cart_items_now"], raw["cart_value_now"], raw["cart_adds_since_order"]) == (1, 5.0, 1)
    state.update(
        Event(KIND_CART_REMOVE, "c", "u1", START_MS + 30 * MINUTE_MS, item_id="y", price=5.0, quantity=3), config
    )
    raw = dict(zip(RAW_FEATURE_NAMES, state.raw_features(), strict=True))
    assert (raw["cart_items_now"], raw["cart_value_now"]) == (0, 0.0)


def test_cart_compaction_keeps_late_orders_exact():
    config = StateConfig()
    events = [
        Event(
            KIND_CART_ADD if i % 4 else KIND_CART_REMOVE,
            f"c{i}",
            "u1",
            START_MS + i * 4 * MINUTE_MS,
            item_id=ITEMS[i % 5],
            price=1.0 + i,
            quantity=1 + i % 3,
        )
        for i in range(60)
    ]
    for minutes_late in (2, 21, 39, 55, 59):
        state = fold(events, config)
        assert len(state.cart_lines) < 30  # lines older than the grace period were merged per item
        late_order = Event(
            KIND_ORDER,
            "o",
            "u1",
            events[-1].ts_ms - minutes_late * MINUTE_MS - 1,
            order_id="o",
            order_lines=(OrderLine(ITEMS[0], 1, 1.0),),
            total=1.0,
        )
        assert state.update(late_order, config) == APPLIED
        assert_matches(state, events + [late_order], state.last_event_ms)


def test_category_affinity_keeps_top_k_and_decays():
    config = StateConfig()
    state = ShopperState.new("u1")
    for i, category in enumerate(["a"] * 10 + ["b", "c", "d", "e", "f", "g"]):
        state.update(Event(KIND_VIEW, f"e{i}", "u1", START_MS + i * 1000, item_id="x", category=category), config)
    top = state.top_categories()
    assert len(top) == AFFINITY_TOP_K and top[0][0] == "a" and top[0][1] == pytest.approx(10, rel=1e-4)
    assert "g" in dict(top)  # a newcomer displaces the weakest (Space-Saving)
    week_later = dict(state.top_categories(state.last_event_ms + AFFINITY_HALF_LIFE_MS))
    assert week_later["a"] == pytest.approx(dict(top)["a"] / 2)


def test_expiry_uses_event_time_retention():
    config = StateConfig(retention_ms=10 * DAY_MS)
    state = fold([Event(KIND_VIEW, "a", "u1", START_MS, item_id="x")], config)
    assert not state.is_expired(START_MS + 10 * DAY_MS, config)
    assert state.is_expired(START_MS + 10 * DAY_MS + 1, config)


def test_new_state_has_neutral_features():
    raw = dict(zip(RAW_FEATURE_NAMES, ShopperState.new("u1").raw_features(START_MS), strict=True))
    assert raw["ms_since_last_order"] == math.inf and raw["views_30d"] == 0 and raw["session_events"] == 0
    assert all(not math.isnan(value) for value in raw.values())


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="grace_ms"):
        StateConfig(grace_ms=0)
    with pytest.raises(ValueError, match="history_len"):
        StateConfig(history_len=2.5)  # type: ignore[arg-type]  # the run-time check is what is tested
