"""Offline replay: same update code, event-time order, point-in-time rows, online/offline parity."""

from __future__ import annotations

import random

import numpy as np

from features.events import KIND_CART_ADD, KIND_CART_REMOVE, KIND_ORDER, KIND_VIEW, Event, OrderLine
from features.offline import final_states, replay, split_late
from features.spec import DEFAULT_FEATURE_SPEC
from features.state import APPLIED, DUPLICATE, HOUR_MS, LATE, MINUTE_MS, ShopperState, StateConfig

T = 1_704_067_200_000


def shop_log(seed: int, users: int = 12, per_user: int = 60) -> list[Event]:
    """Interleaved events of several shoppers, in event-time order."""
    rng = random.Random(seed)
    events = []
    for u in range(users):
        ts = T + rng.randint(0, 6 * HOUR_MS)
        for i in range(per_user):
            ts += rng.choice((rng.randint(1_000, 3 * MINUTE_MS), rng.randint(MINUTE_MS, 30 * HOUR_MS)))
            kind = rng.choices((KIND_VIEW, KIND_CART_ADD, KIND_CART_REMOVE, KIND_ORDER), (60, 20, 8, 6))[0]
            user_id, event_id = f"u{u}", f"u{u}-e{i}"
            if kind == KIND_ORDER:
                events.append(
                    Event(
                        kind,
                        event_id,
                        user_id,
                        ts,
                        order_id=f"o{i}",
                        order_lines=(OrderLine(f"i{rng.randint(0, 9)}", 1, 12.5),),
                        total=12.5,
                    )
                )
            else:
                events.append(
                    Event(
                        kind,
                        event_id,
                        user_id,
                        ts,
                        item_id=f"i{rng.randint(0, 9)}",
                        category=rng.choice(("toys", "books")),
                        price=12.5,
                        quantity=1,
                    )
                )
    events.sort(key=lambda e: e.ts_ms)
    return events


def assert_same_states(online: dict[str, ShopperState], offline: dict[str, ShopperState], now_ms: int) -> None:
    """The same shoppers with the same feature rows at ``now_ms`` and the same recent items."""
    assert sorted(online) == sorted(offline)
    users = sorted(online)
    np.testing.assert_allclose(
        DEFAULT_FEATURE_SPEC.matrix([online[u] for u in users], now_ms),
        DEFAULT_FEATURE_SPEC.matrix([offline[u] for u in users], now_ms),
        rtol=1e-6,
    )
    for user in users:
        assert online[user].recent_items() == offline[user].recent_items()


def test_replay_yields_every_event_in_event_time_order():
    """Arrival out of order within the grace period: every event is kept and sorted into place."""
    log = shop_log(0)
    rng = random.Random(0)
    grace_ms = StateConfig().grace_ms
    scrambled = [e for _, e in sorted(((e.ts_ms + rng.randint(0, grace_ms - 1), e) for e in log), key=lambda p: p[0])]
    assert scrambled != log
    out = list(replay(scrambled))
    assert [event.ts_ms for event, _, _ in out] == sorted(e.ts_ms for e in log)
    assert all(outcome == APPLIED for _, outcome, _ in out)
    assert all(row.dtype == np.float32 and row.shape == (DEFAULT_FEATURE_SPEC.dim,) for _, _, row in out)


def test_events_the_worker_rejects_as_late_in_arrival_order_are_left_out_exactly():
    """Arrival far out of order: the worker's rule (ShopperState.update in arrival order) and the
    offline replay reject the same events as LATE and end in the same states."""
    config = StateConfig(dedup_ids=10_000)
    log = shop_log(5)
    scrambled = log[:]
    random.Random(5).shuffle(scrambled)
    online: dict[str, ShopperState] = {}
    rejected = []
    for event in scrambled:
        state = online.setdefault(event.user_id, ShopperState.new(event.user_id))
        if state.update(event, config) == LATE:
            rejected.append(event)
    kept, late = split_late(scrambled, config)
    assert late == rejected and len(late) > len(log) // 4, "a shuffle makes many events late"
    assert split_late(kept, config) == (kept, []), "the rule keeps what it kept"
    out = list(replay(scrambled, config))
    assert sorted(e.event_id for e, _, _ in out) == sorted(e.event_id for e in kept)
    assert all(outcome == APPLIED for _, outcome, _ in out)
    assert_same_states(online, final_states(scrambled, config), log[-1].ts_ms + HOUR_MS)


def test_rows_are_point_in_time():
    """Row i equals the row of a state built from only the events up to i: nothing leaks back."""
    log = shop_log(1, users=4, per_user=40)
    out = list(replay(log))
    config = StateConfig()
    for i in range(0, len(log), 7):
        event = log[i]
        state = ShopperState.new(event.user_id)
        for earlier in log[: i + 1]:
            if earlier.user_id == event.user_id:
                state.update(earlier, config)
        np.testing.assert_array_equal(out[i][2], DEFAULT_FEATURE_SPEC.row(state, event.ts_ms))


def test_future_events_do_not_change_past_rows():
    log = shop_log(2)
    cut = len(log) // 2
    future = [
        Event(
            KIND_ORDER,
            f"future-{i}",
            e.user_id,
            log[-1].ts_ms + HOUR_MS + i,
            order_id="f",
            order_lines=(OrderLine("i1", 9, 999.0),),
            total=8991.0,
        )
        for i, e in enumerate(log[:cut])
    ]
    past_rows = [row for _, _, row in replay(log[:cut])]
    with_future = [row for _, _, row in replay(log[:cut] + future)][:cut]
    for a, b in zip(past_rows, with_future, strict=True):
        np.testing.assert_array_equal(a, b)


def test_duplicates_in_the_log_are_reported_and_applied_once():
    log = shop_log(3)
    # Each repeat arrives right after its original (a producer retry); one repeated hours later is LATE.
    doubled = [copy for i, e in enumerate(log) for copy in ([e, e] if i % 5 == 0 else [e])]
    out = list(replay(doubled))
    assert sum(outcome == DUPLICATE for _, outcome, _ in out) == len(log[::5])
    assert final_states(doubled) == final_states(log)


def test_final_states_match_the_worker_fed_out_of_order_within_grace():
    """The online path (arrival order, per-shopper update) and the offline path agree."""
    config = StateConfig(dedup_ids=10_000)
    log = shop_log(4)
    rng = random.Random(4)
    arrival = [
        e
        for _, e in sorted(((e.ts_ms + rng.randint(0, config.grace_ms - 1), e) for e in log), key=lambda pair: pair[0])
    ]
    online: dict[str, ShopperState] = {}
    for event in arrival:
        state = online.setdefault(event.user_id, ShopperState.new(event.user_id))
        assert state.update(event, config) == APPLIED
    assert_same_states(online, final_states(log, config), log[-1].ts_ms + HOUR_MS)
