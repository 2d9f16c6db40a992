"""Labels from behaviour: churn / purchase horizons, censoring, moments, next-item sequences."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest

from features.events import KIND_CART_ADD, KIND_CART_REMOVE, KIND_ORDER, KIND_VIEW, Event, OrderLine
from features.state import DAY_MS, HOUR_MS, MINUTE_MS
from models.labels import (
    ENTRY_CART,
    ENTRY_ORDER,
    ENTRY_VIEW,
    FutureIndex,
    LabelConfig,
    MomentSampler,
    churn_labels,
    item_sequences,
    label_moments,
    label_summary,
    next_item_split,
    purchase_labels,
    sweep_times,
)

T = 1_704_067_200_000  # 2024-01-01T00:00Z


def view(user: str, ts: int, item: str = "i1", n: int = 0) -> Event:
    return Event(KIND_VIEW, f"{user}-v{ts}-{n}", user, ts, item_id=item, category="c", price=1.0, quantity=1)


def cart(user: str, ts: int, item: str, kind: str = KIND_CART_ADD) -> Event:
    return Event(kind, f"{user}-c{ts}-{item}", user, ts, item_id=item, category="c", price=1.0, quantity=1)


def order(user: str, ts: int, *items: str) -> Event:
    lines = tuple(OrderLine(i, 1, 1.0) for i in items)
    return Event(KIND_ORDER, f"{user}-o{ts}", user, ts, order_id=f"o{ts}", order_lines=lines, total=float(len(items)))


def test_churn_is_no_event_in_the_half_open_horizon():
    h = 14 * DAY_MS
    log = [
        view("a", T),
        view("a", T + 3 * DAY_MS),
        view("a", T + 17 * DAY_MS),
        view("b", T + DAY_MS),
        view("z", T + 60 * DAY_MS),
    ]  # z only sets the end of the log
    idx = FutureIndex(log)
    end = idx.last_ms
    users = ["a", "a", "a", "b", "a"]
    times = [T, T + 3 * DAY_MS, T + 3 * DAY_MS - 1, T + DAY_MS, T + 17 * DAY_MS]
    y = churn_labels(idx, users, times, h, end)
    # a@T: next event after 3 d -> not churned; a@3d: next after exactly 14 d -> inside (t, t+h] -> not churned
    # a@(3d - 1 ms): the 3 d event is 1 ms later -> not churned; b has nothing after -> churned
    # a@17d: nothing in 14 d (z's events do not count for a) -> churned
    assert y.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    # exactly one ms past the horizon is churn
    assert churn_labels(idx, ["a"], [T], 3 * DAY_MS - 1, end)[0] == 1.0
    assert churn_labels(idx, ["a"], [T], 3 * DAY_MS, end)[0] == 0.0
    # an event at the same ms as the moment is not "after" it
    assert churn_labels(idx, ["b"], [T + DAY_MS], h, end)[0] == 1.0


def test_censoring_drops_labels_whose_horizon_passes_the_end():
    log = [view("a", T), view("a", T + DAY_MS), view("a", T + 10 * DAY_MS)]
    idx = FutureIndex(log)
    end = idx.last_ms
    h = 7 * DAY_MS
    y = churn_labels(idx, ["a", "a", "a"], [T, T + DAY_MS, T + 3 * DAY_MS + 1], h, end)
    assert y[0] == 0.0 and y[1] == 1.0
    # t + h = end + 1 ms: censored
    assert math.isnan(y[2])
    # censored even when an event was already seen inside the window (no selection on the outcome)
    assert math.isnan(churn_labels(idx, ["a"], [T + 9 * DAY_MS], h, end)[0])
    # horizon ending exactly at the end of the log: known (the last event is inside it)
    assert churn_labels(idx, ["a"], [end - h], h, end)[0] == 0.0


def test_purchase_is_an_order_within_the_horizon_and_censored_at_the_end():
    log = [
        view("a", T),
        order("a", T + 5 * HOUR_MS, "i1"),
        view("a", T + 2 * DAY_MS),
        order("a", T + 2 * DAY_MS + DAY_MS + 1, "i2"),
        view("b", T + 10 * DAY_MS),
    ]
    idx = FutureIndex(log)
    end = idx.last_ms
    h = DAY_MS
    times = [T, T + 5 * HOUR_MS, T + 2 * DAY_MS, T + 2 * DAY_MS + 1, end - h + 1]
    y = purchase_labels(idx, ["a", "a", "a", "a", "a"], times, h, end)
    # the order at the moment itself does not count; the next one is 1 ms past 24 h of the 2 d view
    assert y[:4].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert math.isnan(y[4])
    both = label_moments(
        idx,
        ["a", "b"],
        [T, T + 10 * DAY_MS - 2 * DAY_MS],
        LabelConfig(churn_horizon_ms=DAY_MS, purchase_horizon_ms=DAY_MS),
        end,
    )
    assert both.shape == (2, 2) and both.dtype == np.float32
    assert both[0].tolist() == [0.0, 1.0]  # a: an event (the order) within a day, and it is an order
    assert both[1].tolist() == [1.0, 0.0]  # b: its next event is 2 days later, beyond the 1-day churn horizon
    summary = label_summary(both)
    assert summary["churn"]["labelled"] == 2 and summary["purchase"]["positives"] == 1


def test_vectorised_labels_match_brute_force_and_are_fast():
    rng = random.Random(3)
    log = []
    for shopper in range(40):
        ts = T + rng.randint(0, DAY_MS)
        for i in range(rng.randint(1, 30)):
            ts += rng.choice((MINUTE_MS, HOUR_MS, DAY_MS, 5 * DAY_MS, 12 * DAY_MS))
            log.append(order(f"u{shopper}", ts, "i") if rng.random() < 0.15 else view(f"u{shopper}", ts, n=i))
    log.sort(key=lambda e: e.ts_ms)
    idx = FutureIndex(log)
    end = idx.last_ms
    users = [e.user_id for e in log] + ["u1", "nobody"]
    times = [e.ts_ms + rng.choice((0, -1, 7)) for e in log] + [T - DAY_MS, T]
    h_c, h_p = 7 * DAY_MS, DAY_MS
    yc = churn_labels(idx, users, times, h_c, end)
    yp = purchase_labels(idx, users, times, h_p, end)
    for i, (u, t) in enumerate(zip(users, times, strict=False)):
        later = [e for e in log if e.user_id == u and t < e.ts_ms <= t + h_c]
        orders = [e for e in log if e.user_id == u and e.kind == KIND_ORDER and t < e.ts_ms <= t + h_p]
        if t + h_c > end:
            assert math.isnan(yc[i])
        else:
            assert yc[i] == (0.0 if later else 1.0), (u, t)
        if t + h_p > end:
            assert math.isnan(yp[i])
        else:
            assert yp[i] == (1.0 if orders else 0.0), (u, t)
    # O(n log n): 200k events and 200k moments label in well under a second
    big = [view(f"u{i % 5000}", T + i * 1000, n=i) for i in range(200_000)]
    start = time.perf_counter()
    big_idx = FutureIndex(big)
    churn_labels(big_idx, [e.user_id for e in big], [e.ts_ms for e in big], DAY_MS, big_idx.last_ms)
    assert time.perf_counter() - start < 3.0


def test_moment_sampler_takes_at_most_one_example_per_shopper_per_gap():
    s = MomentSampler(HOUR_MS)
    got = [
        (u, t)
        for u, t in [
            ("a", T),
            ("a", T + 10 * MINUTE_MS),
            ("b", T + MINUTE_MS),
            ("a", T + HOUR_MS - 1),
            ("a", T + HOUR_MS),
            ("a", T + HOUR_MS + 1),
            ("a", T + 3 * HOUR_MS),
        ]
        if s.accept(u, t)
    ]
    assert got == [("a", T), ("b", T + MINUTE_MS), ("a", T + HOUR_MS), ("a", T + 3 * HOUR_MS)]
    every = MomentSampler(0)
    assert all(every.accept("a", T) for _ in range(3))


def test_sweep_times_are_utc_midnights_after_the_start():
    assert sweep_times(T + 5, T + 3 * DAY_MS, DAY_MS) == [T + DAY_MS, T + 2 * DAY_MS, T + 3 * DAY_MS]
    assert sweep_times(T, T + DAY_MS - 1, DAY_MS) == []
    assert sweep_times(T, T + 5 * DAY_MS, 0) == []


def test_label_config_validates_and_describes():
    cfg = LabelConfig()
    assert cfg.horizons() == {"churn": 14 * DAY_MS, "purchase": DAY_MS}
    assert cfg.max_idle_ms == 14 * DAY_MS
    text = cfg.describe()
    assert "14 d" in text["churn"] and "1 d" in text["purchase"] and "censoring" in text
    with pytest.raises(ValueError):
        LabelConfig(churn_horizon_ms=0)
    with pytest.raises(ValueError):
        LabelConfig(cart_weight=0.5)


def test_item_sequences_merge_repeats_and_let_carts_and_orders_weigh_more():
    log = [
        view("a", T, "i1"),
        cart("a", T + 1, "i1"),
        view("a", T + 2, "i2"),
        view("a", T + 3, "i2"),
        cart("a", T + 4, "i2", KIND_CART_REMOVE),
        view("a", T + 5, "i3"),
        cart("a", T + 6, "i3"),
        order("a", T + 7, "i1", "i3", "i9"),
        view("a", T + 8, "i1"),
        order("a", T + 9, "i1"),
        view("b", T + 1, "i5"),
    ]
    seqs = item_sequences(log)
    a = seqs["a"]
    assert a.items == ["i1", "i2", "i3", "i9", "i1"]
    assert a.kinds == [ENTRY_ORDER, ENTRY_VIEW, ENTRY_ORDER, ENTRY_ORDER, ENTRY_ORDER]
    assert a.weights == [5.0, 1.0, 5.0, 5.0, 5.0]
    assert a.ts == [T, T + 2, T + 5, T + 7, T + 8]
    assert seqs["b"].items == ["i5"] and seqs["b"].kinds == [ENTRY_VIEW]
    weights = LabelConfig(view_weight=1, cart_weight=2, order_weight=2)
    assert item_sequences([view("c", T, "x"), cart("c", T + 1, "x")], weights)["c"].weights == [2.0]
    assert item_sequences([view("c", T, "x"), cart("c", T + 1, "x")], weights)["c"].kinds == [ENTRY_CART]


def test_next_item_split_uses_only_the_past_as_history():
    log = [
        view("a", T, "i1"),
        view("a", T + 10, "i2"),
        view("a", T + 20, "i1"),
        view("a", T + 30, "i3"),
        view("b", T + 5, "i4"),
        view("c", T + 25, "i5"),
        view("d", T, "i6"),
        view("d", T + 1, "i7"),
    ]
    split = next_item_split(item_sequences(log), T + 15)
    assert split.train_users == ["a", "b", "d"]
    assert split.train == [["i1", "i2"], ["i4"], ["i6", "i7"]]
    assert split.next.users == ["a"] and split.next.target == ["i1"]  # a repeat: the literal next interaction
    assert split.next_new.users == ["a"] and split.next_new.target == ["i3"]  # first item not in the history
    assert split.next.history == [["i1", "i2"]]
