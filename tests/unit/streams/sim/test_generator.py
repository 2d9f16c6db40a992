"""The synthetic shop: determinism, time order, funnel, carts, churn, invalid messages, speed."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, defaultdict

import pytest

from features.events import (
    KIND_CART_ADD,
    KIND_CART_REMOVE,
    KIND_ORDER,
    KIND_VIEW,
    InvalidEvent,
    parse_event,
)
from streams.sim.generator import (
    DAY_MS,
    MALFORMED_REASONS,
    GeneratorConfig,
    ShopSimulator,
    message_of,
)

SMALL = GeneratorConfig(seed=11, n_shoppers=500, n_items=800, n_categories=12)


@pytest.fixture(scope="module")
def small_run() -> tuple[ShopSimulator, list]:
    simulator = ShopSimulator(SMALL)
    return simulator, list(simulator.events())


def test_same_seed_same_output_and_other_seed_differs() -> None:
    config = dataclasses.replace(SMALL, malformed_fraction=0.1)
    first = ShopSimulator(config)
    expected = list(first.messages(3000))
    assert list(ShopSimulator(config).messages(3000)) == expected
    assert list(first.messages(3000)) == expected, "a second call must replay the same simulation"
    assert list(ShopSimulator(dataclasses.replace(config, seed=12)).messages(3000)) != expected


def test_events_are_in_time_order_within_the_span(small_run) -> None:
    simulator, events = small_run
    timestamps = [event.ts_ms for event in events]
    assert len(events) > 10_000
    assert timestamps == sorted(timestamps)
    assert SMALL.start_ms <= timestamps[0] and timestamps[-1] < simulator.end_ms == SMALL.start_ms + SMALL.span_ms
    assert len({event.event_id for event in events}) == len(events)


def test_funnel_views_far_outnumber_carts_which_outnumber_orders(small_run) -> None:
    kinds = Counter(event.kind for event in small_run[1])
    assert kinds[KIND_VIEW] > 5 * kinds[KIND_CART_ADD]
    assert kinds[KIND_CART_ADD] > 2 * kinds[KIND_ORDER] > 0
    assert 0 < kinds[KIND_CART_REMOVE] < kinds[KIND_CART_ADD] / 2


def test_orders_check_out_exactly_the_cart(small_run) -> None:
    carts: dict[str, dict[str, int]] = defaultdict(dict)
    prices: dict[str, float] = {}
    for event in small_run[1]:
        cart = carts[event.user_id]
        if event.kind == KIND_VIEW:
            prices[event.item_id] = event.price
        elif event.kind == KIND_CART_ADD:
            assert prices[event.item_id] == event.price, "an item keeps its price"
            cart[event.item_id] = cart.get(event.item_id, 0) + event.quantity
        elif event.kind == KIND_CART_REMOVE:
            assert cart.pop(event.item_id) == event.quantity, "a remove takes the whole cart line"
        else:
            assert {line.item_id: line.quantity for line in event.order_lines} == cart
            assert all(prices[line.item_id] == line.price for line in event.order_lines)
            assert event.total == round(sum(line.quantity * line.price for line in event.order_lines), 2)
            cart.clear()


def test_fading_shoppers_slow_down_and_go_silent(small_run) -> None:
    simulator, events = small_run
    profiles = {profile.user_id: profile for profile in simulator.shopper_profiles()}
    session_starts: dict[tuple[str, str], int] = {}
    last_seen: dict[str, int] = {}
    for event in events:
        session_starts.setdefault((event.user_id, event.session_id), event.ts_ms)
        last_seen[event.user_id] = event.ts_ms
    early = late = 0
    for (user_id, _), start_ms in session_starts.items():
        profile = profiles[user_id]
        if profile.fades:
            assert start_ms < profile.stop_ms, f"{user_id} started a session after churning"
            middle = (profile.fade_start_ms + profile.stop_ms) // 2
            early += profile.fade_start_ms <= start_ms < middle
            late += middle <= start_ms
    assert early > 2 * late > 0, "a fading shopper's session rate decays"

    final_week = simulator.end_ms - 7 * DAY_MS
    churned = [p for p in profiles.values() if p.fades and p.stop_ms < final_week and p.user_id in last_seen]
    staying = [p for p in profiles.values() if not p.fades and p.segment != "one_off" and p.user_id in last_seen]
    assert len(churned) >= 10
    assert all(last_seen[p.user_id] < p.stop_ms + DAY_MS for p in churned)
    active_share = sum(last_seen[p.user_id] >= final_week for p in staying) / len(staying)
    assert active_share > 0.6, "shoppers who do not fade keep coming back"


def test_malformed_messages_fail_with_their_recorded_reason() -> None:
    config = dataclasses.replace(SMALL, n_shoppers=200, malformed_fraction=0.3)
    simulator = ShopSimulator(config)
    messages = list(simulator.messages(5000))
    now_ms = simulator.end_ms
    reasons: Counter[str] = Counter()
    for message in messages:
        if message.malformed_reason is None:
            event = parse_event(message.topic_kind, message.key, message.value, now_ms)
            assert message_of(event) == message
            continue
        with pytest.raises(InvalidEvent) as caught:
            parse_event(message.topic_kind, message.key, message.value, now_ms)
        assert caught.value.reason == message.malformed_reason, caught.value.detail
        reasons[message.malformed_reason] += 1
    assert set(reasons) == set(MALFORMED_REASONS)
    assert 0.25 < sum(reasons.values()) / len(messages) < 0.35
    valid = [message for message in messages if message.malformed_reason is None]
    clean = ShopSimulator(dataclasses.replace(config, malformed_fraction=0.0))
    assert list(clean.messages(len(valid))) == valid, "invalid messages are inserted, valid ones unchanged"


def test_live_clock_stamps_wall_time_and_keeps_the_content() -> None:
    before_ms = time.time_ns() // 1_000_000
    live = list(ShopSimulator(dataclasses.replace(SMALL, clock="live")).events(2000))
    after_ms = time.time_ns() // 1_000_000
    stamps = [event.ts_ms for event in live]
    assert stamps == sorted(stamps) and before_ms <= stamps[0] and stamps[-1] <= after_ms
    simulated = ShopSimulator(SMALL).events(2000)
    assert [dataclasses.replace(event, ts_ms=0) for event in live] == [
        dataclasses.replace(event, ts_ms=0) for event in simulated
    ]


def test_config_rejects_impossible_values() -> None:
    with pytest.raises(ValueError, match="malformed_fraction"):
        GeneratorConfig(malformed_fraction=1.0)
    with pytest.raises(ValueError, match="clock"):
        GeneratorConfig(clock="wall")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_items"):
        GeneratorConfig(n_items=5, n_categories=10)


def test_generation_rate(capsys: pytest.CaptureFixture[str]) -> None:
    simulator = ShopSimulator(GeneratorConfig())
    started = time.perf_counter()
    n_events = sum(1 for _ in simulator.events(100_000))
    events_per_s = n_events / (time.perf_counter() - started)
    started = time.perf_counter()
    n_messages = sum(1 for _ in simulator.messages(50_000))
    messages_per_s = n_messages / (time.perf_counter() - started)
    with capsys.disabled():
        print(f"\ngenerator: {events_per_s:,.0f} events/s, {messages_per_s:,.0f} encoded messages/s (one core)")
    assert events_per_s > 10_000, "far below the 50k events/s target even on a loaded machine"
