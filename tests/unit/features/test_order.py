"""Arrival-order independence: any arrival within grace gives the state of in-order replay, byte for byte.

The worker consumes the page-view, cart and order topics independently, so one shopper's events
reach ``ShopperState.update`` in an order that differs from event time (and many share one
millisecond). The offline replay (``features.offline``) folds them sorted by ``ts_ms``. These
tests check that every arrival order the rules allow (each event at most ``grace_ms`` behind the
shopper's watermark, at most ``dedup_ids`` events per grace period) gives byte-identical
``encode_state`` output and identical feature rows.
"""

from __future__ import annotations

import random
from collections import deque
from itertools import pairwise

import numpy as np
import pytest

from features.encoding import decode_state, encode_state
from features.events import KIND_CART_ADD, KIND_CART_REMOVE, KIND_ORDER, KIND_VIEW, Event, OrderLine
from features.offline import final_states
from features.spec import DEFAULT_FEATURE_SPEC
from features.state import (
    AFFINITY_TOP_K,
    APPLIED,
    CART_MAX_LINES,
    DAY_MS,
    DUPLICATE,
    HOUR_MS,
    LATE,
    MINUTE_MS,
    ShopperState,
    StateConfig,
)

START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
ITEMS = [f"sku-{n}" for n in range(8)]  # few items: equal-ts events often share one
CATEGORIES = [f"cat{n}" for n in range(9)]  # more than AFFINITY_TOP_K
TOPIC_OF_KIND = {KIND_VIEW: "page_view", KIND_CART_ADD: "cart", KIND_CART_REMOVE: "cart", KIND_ORDER: "order"}

CONFIGS = {
    "default": StateConfig(),
    # small grace, cap and history: many freezes, compactions and history truncations per stream
    "tight": StateConfig(grace_ms=10 * MINUTE_MS, dedup_ids=24, history_len=12, session_gap_ms=4 * MINUTE_MS),
}


def tied_stream(seed: int, n: int, config: StateConfig, user_id: str = "u1") -> list[Event]:
    """One shopper's events in non-decreasing ts, about half of them sharing a millisecond with
    the previous one, all kinds, every category, repeated items (also within one ms, at different
    prices); odd seeds order rarely, so carts grow long. Keeps at most ``dedup_ids`` events and
    ``CART_MAX_LINES`` cart changes in any closed grace window, the condition under which arrival
    order cannot matter."""
    rng = random.Random(seed)
    kind_weights = (50, 25, 12, 13) if seed % 2 == 0 else (40, 42, 17, 1)
    per_window = min(config.dedup_ids, CART_MAX_LINES)
    window: deque[int] = deque()
    events = []
    ts = START_MS
    for i in range(n):
        r = rng.random()
        if r < 0.5:
            pass  # same millisecond as the previous event
        elif r < 0.8:
            ts += rng.randint(1, 3 * MINUTE_MS)
        elif r < 0.95:
            ts += rng.randint(10 * MINUTE_MS, 5 * HOUR_MS)
        else:
            ts += rng.randint(1 * DAY_MS, 9 * DAY_MS)
        while window and window[0] < ts - config.grace_ms:
            window.popleft()
        if len(window) >= per_window:
            ts = window[-1] + config.grace_ms + 1
            window.clear()
        window.append(ts)
        kind = rng.choices((KIND_VIEW, KIND_CART_ADD, KIND_CART_REMOVE, KIND_ORDER), kind_weights)[0]
        event_id = f"{user_id}-{i}-{rng.getrandbits(32):08x}"
        if kind == KIND_ORDER:
            lines = tuple(
                OrderLine(rng.choice(ITEMS), rng.randint(1, 3), rng.choice((4.99, 12.5, 30.0)))
                for _ in range(rng.randint(1, 4))
            )
            events.append(
                Event(
                    kind,
                    event_id,
                    user_id,
                    ts,
                    order_id=f"o{i}",
                    order_lines=lines,
                    total=round(sum(line.quantity * line.price for line in lines), 2),
                )
            )
        else:
            events.append(
                Event(
                    kind,
                    event_id,
                    user_id,
                    ts,
                    session_id="s",
                    item_id=rng.choice(ITEMS),
                    category=rng.choice(CATEGORIES) if rng.random() < 0.95 else "",
                    price=rng.choice((1.0, 2.5, 9.99, 20.0)),
                    quantity=rng.randint(1, 3),
                )
            )
    return events


def within_grace(arrival: list[Event], grace_ms: int) -> bool:
    watermark = 0
    for event in arrival:
        if event.ts_ms < watermark - grace_ms:
            return False
        watermark = max(watermark, event.ts_ms)
    return True


def jittered(events: list[Event], grace_ms: int, rng: random.Random) -> list[Event]:
    """Each event delayed by 0..grace_ms (ties in arrival time broken at random)."""
    keyed = [(e.ts_ms + rng.randint(0, grace_ms), rng.random(), i) for i, e in enumerate(events)]
    return [events[i] for _, _, i in sorted(keyed)]


def reversed_blocks(events: list[Event], grace_ms: int, rng: random.Random) -> list[Event]:
    """Events of each grace-wide block of event time arrive newest first (ties shuffled)."""
    keyed = [(e.ts_ms // (grace_ms + 1), -e.ts_ms, rng.random(), i) for i, e in enumerate(events)]
    return [events[i] for *_, i in sorted(keyed)]


def three_topics(events: list[Event], grace_ms: int, rng: random.Random) -> list[Event]:
    """Split the ts-sorted stream by topic into three queues and interleave random batches of
    them, keeping each queue's order (three topics consumed independently). A queue may run
    ahead of the others only while no other queue's head would fall more than grace behind."""
    queues: dict[str, deque[Event]] = {topic: deque() for topic in ("page_view", "cart", "order")}
    for event in events:
        queues[TOPIC_OF_KIND[event.kind]].append(event)
    arrival = []
    while any(queues.values()):
        heads = {topic: queue[0].ts_ms for topic, queue in queues.items() if queue}
        allowed = [
            topic
            for topic in heads
            if all(heads[topic] - grace_ms <= ts for other, ts in heads.items() if other != topic)
        ]
        topic = rng.choice(allowed)
        queue = queues[topic]
        for _ in range(rng.randint(1, 12)):
            if not queue:
                break
            others = [q[0].ts_ms for name, q in queues.items() if name != topic and q]
            if others and queue[0].ts_ms - grace_ms > min(others):
                break
            arrival.append(queue.popleft())
    return arrival


def with_redeliveries(arrival: list[Event], rng: random.Random) -> list[Event]:
    """Kafka is at-least-once: repeat some events a little later (DUPLICATE or LATE, never applied twice)."""
    out = list(arrival)
    for i in sorted(rng.sample(range(len(arrival)), len(arrival) // 10), reverse=True):
        out.insert(min(len(out), i + rng.randint(1, 40)), arrival[i])
    return out


def fold_arrival(arrival: list[Event], config: StateConfig, rng: random.Random | None = None) -> ShopperState:
    """Apply events in arrival order like the worker: optionally reloaded from bytes between batches."""
    state = ShopperState.new(arrival[0].user_id)
    applied: set[str] = set()
    for event in arrival:
        outcome = state.update(event, config)
        if event.event_id in applied:
            assert outcome in (DUPLICATE, LATE)
        else:
            assert outcome == APPLIED, f"{event.event_id} arrived out of grace: {outcome}"
            applied.add(event.event_id)
        if rng is not None and rng.random() < 0.05:
            state = decode_state(encode_state(state))  # a batch boundary: stored and loaded again
    return state


def assert_same(got: ShopperState, want: ShopperState, label: str) -> None:
    diff = {
        name: (getattr(got, name), getattr(want, name))
        for name in want.__slots__
        if getattr(got, name) != getattr(want, name)
    }
    assert encode_state(got) == encode_state(want), f"{label}: state differs: {str(diff)[:2000]}"
    now = want.last_event_ms
    for at in (now, now + 30 * MINUTE_MS, now + 3 * DAY_MS):
        assert got.raw_features(at) == want.raw_features(at), f"{label}: raw features differ at {at}"
        np.testing.assert_array_equal(
            DEFAULT_FEATURE_SPEC.row(got, at), DEFAULT_FEATURE_SPEC.row(want, at), err_msg=label
        )
    assert got.top_categories() == want.top_categories(), label
    assert got.recent_items() == want.recent_items(), label


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("seed", range(4))
def test_any_arrival_within_grace_gives_the_replay_state(config_name, seed):
    config = CONFIGS[config_name]
    events = tied_stream(seed, 500, config)
    assert sum(a.ts_ms == b.ts_ms for a, b in pairwise(events)) > 150  # many ties
    assert len({e.category for e in events} - {""}) > AFFINITY_TOP_K
    want = final_states(events, config)["u1"]
    assert_same(fold_arrival(events, config), want, "in order")
    rng = random.Random(seed)
    arrivals = {
        "ties reversed": sorted(events, key=lambda e: (e.ts_ms, -events.index(e))),
        "jittered": jittered(events, config.grace_ms, rng),
        "reversed blocks": reversed_blocks(events, config.grace_ms, rng),
    }
    for k in range(6):
        arrivals[f"three topics #{k}"] = three_topics(events, config.grace_ms, rng)
    for label, arrival in arrivals.items():
        assert sorted(arrival, key=lambda e: e.event_id) == sorted(events, key=lambda e: e.event_id)
        assert within_grace(arrival, config.grace_ms), label
        assert_same(fold_arrival(arrival, config), want, label)
        assert_same(fold_arrival(with_redeliveries(arrival, rng), config, rng), want, label + " + redelivery, reloads")


@pytest.mark.parametrize("seed", range(3))
def test_interleaved_topics_agree_at_every_batch_boundary_once_caught_up(seed):
    """Whenever the arrival has delivered exactly the events up to some time (and nothing later),
    the state equals the replay of that prefix: order independence holds mid-stream too."""
    config = CONFIGS["tight"]
    events = tied_stream(100 + seed, 300, config)
    arrival = three_topics(events, config.grace_ms, random.Random(seed))
    state = ShopperState.new("u1")
    seen: set[str] = set()
    checked = 0
    for i, event in enumerate(arrival):
        state.update(event, config)
        seen.add(event.event_id)
        prefix = events[: len(seen)]
        closed_prefix = len(seen) == len(events) or events[len(seen)].ts_ms > prefix[-1].ts_ms
        if {e.event_id for e in prefix} == seen and closed_prefix:
            assert_same(state, final_states(prefix, config)["u1"], f"after {i + 1} arrivals")
            checked += 1
    assert checked >= 20


def test_equal_timestamps_are_ordered_by_event_id_hash_not_arrival():
    config = StateConfig()
    events = [Event(KIND_VIEW, f"e{i}", "u1", START_MS, item_id=f"sku-{i}", category=f"cat{i}") for i in range(8)]
    states = [fold_arrival(order, config) for order in (events, events[::-1], events[3:] + events[:3])]
    assert len({encode_state(state) for state in states}) == 1
    assert states[0].recent_ids == sorted(states[0].recent_ids)
    assert [item for item, _, _ in states[0].recent_items()] == sorted(f"sku-{i}" for i in range(8))


def test_cart_compaction_does_not_depend_on_arrival():
    """Old cart lines are merged per item as soon as they fall behind the grace period, not when
    the cart happens to be long at some arrival: a view that moves the watermark before the
    last cart add arrives must not change the stored cart."""
    config = StateConfig()
    adds = [
        Event(KIND_CART_ADD, f"c{i}", "u1", START_MS + i * MINUTE_MS, item_id=ITEMS[i % 3], price=1.0 + i, quantity=1)
        for i in range(17)
    ]
    view = Event(KIND_VIEW, "v", "u1", START_MS + 70 * MINUTE_MS, item_id="sku-9", category="cat1")
    want = final_states(adds + [view], config)["u1"]
    got = fold_arrival(adds[:16] + [view, adds[16]], config)
    assert_same(got, want, "view before the last add")
    assert len(want.cart_lines) < 17 and want.cart_compacted_adds == 10  # adds before minute 10 were merged


def test_frozen_session_items_do_not_depend_on_freeze_order():
    """Past the guarantee (more than ``dedup_ids`` events in one millisecond, as a burst of live
    traffic gives), events freeze in arrival order; the frozen session's items still come out the same."""
    config = StateConfig(dedup_ids=8)
    views = [Event(KIND_VIEW, f"v{i}", "u1", START_MS, item_id=f"sku-{i % 5}", category="cat1") for i in range(12)]
    adds = [
        Event(KIND_CART_ADD, f"c{i}", "u1", START_MS, item_id=f"sku-{9 - i}", price=1.0, quantity=1) for i in range(4)
    ]
    later = [Event(KIND_VIEW, f"w{i}", "u1", START_MS + 1 + i, item_id="sku-7", category="cat1") for i in range(10)]
    views_first = fold_arrival(views + adds + later, config)
    adds_first = fold_arrival(adds + views + later, config)
    frozen_items = views_first.frozen_session_items
    assert frozen_items == adds_first.frozen_session_items == sorted(frozen_items)
    assert len(views_first.frozen_session_items) >= 6
