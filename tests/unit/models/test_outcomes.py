"""The live evaluation memory: each resolution rule, the cap, the bytes, and agreement with the
offline label definitions of models/labels.py on random logs."""

from __future__ import annotations

import random

import numpy as np
import pytest

from features.events import KIND_CART_ADD, KIND_CART_REMOVE, KIND_ORDER, KIND_VIEW, Event, OrderLine
from features.state import APPLIED, DAY_MS, HOUR_MS, ShopperState, StateConfig, event_id_hash
from models.labels import FutureIndex, churn_labels, item_sequences, purchase_labels
from models.outcomes import (
    ALERTED,
    CHURN,
    HOLDOUT,
    LEDGER_KEYS,
    PURCHASE,
    RECOMMENDATION,
    AlertOutcome,
    EvalConfig,
    LiveMemory,
    OutOfOrder,
    PendingDropped,
    RecommendationOutcome,
    ScoreOutcome,
    ServedPrediction,
    decile,
    gain,
    item_hash,
    recount,
    replay_prediction,
    tally,
)
from models.variants import CHALLENGER, CHAMPION

T0 = 1_760_000_000_000
CONFIG = EvalConfig()
CLF = ("shopper-classifier", "v1")


def view(ts: int, item: str, user: str = "u1", kind: str = KIND_VIEW) -> Event:
    return Event(kind, f"{user}-{kind}-{ts}-{item}", user, ts, item_id=item, category="c", price=1.0, quantity=1)


def order(ts: int, *items: str, user: str = "u1") -> Event:
    lines = tuple(OrderLine(item, 1, 1.0) for item in items)
    return Event(KIND_ORDER, f"{user}-o{ts}", user, ts, order_id=f"o{ts}", order_lines=lines, total=float(len(items)))


def observe(memory: LiveMemory, *events: Event) -> list:
    out = []
    watermark = 0
    for event in events:
        watermark = max(watermark, event.ts_ms)
        out += memory.observe(event, watermark, CONFIG)
    return out


def scored(memory: LiveMemory, t_ms: int, churn: float = 0.3, purchase: float = 0.6, variant: str = CHAMPION) -> None:
    for score, p in ((CHURN, churn), (PURCHASE, purchase)):
        assert memory.record_score(score, *CLF, variant, t_ms, p, CONFIG) == []


# ------------------------------------------------------------------ purchase and churn
def test_an_order_inside_the_purchase_horizon_resolves_positive_and_the_churn_score_negative():
    memory = LiveMemory()
    observe(memory, view(T0, "a"))
    scored(memory, T0)
    out = observe(memory, order(T0 + DAY_MS, "a"))  # the window's closed end
    assert sorted(out, key=lambda o: o.score) == [
        ScoreOutcome(*CLF, CHAMPION, CHURN, 0.3, positive=False),
        ScoreOutcome(*CLF, CHAMPION, PURCHASE, 0.6, positive=True),
    ]
    assert memory.pending == []


def test_an_event_at_the_scoring_moment_itself_resolves_nothing():
    memory = LiveMemory()
    scored(memory, T0)
    assert observe(memory, order(T0, "a")) == []  # the window is half-open: (t, t + horizon]


def test_no_purchase_is_decided_only_once_no_order_inside_the_window_can_still_be_applied():
    memory = LiveMemory()
    scored(memory, T0)
    after_horizon = T0 + DAY_MS + 1
    # a view past the horizon: the churn score resolves (the shopper returned), the purchase one waits,
    # since an order inside the window could still arrive within the grace period
    assert observe(memory, view(after_horizon, "a")) == [ScoreOutcome(*CLF, CHAMPION, CHURN, 0.3, positive=False)]
    assert [p.score for p in memory.pending] == [PURCHASE]
    # an out-of-order order inside the window, within grace: still a purchase
    late_order = order(T0 + DAY_MS - 5, "a")
    assert memory.observe(late_order, after_horizon, CONFIG) == [
        ScoreOutcome(*CLF, CHAMPION, PURCHASE, 0.6, positive=True)
    ]


def test_the_watermark_past_horizon_and_grace_resolves_no_purchase():
    memory = LiveMemory()
    scored(memory, T0)
    assert observe(memory, view(T0 + DAY_MS + CONFIG.grace_ms, "a"))[1:] == []  # cutoff == t + h: not beyond
    out = observe(memory, view(T0 + DAY_MS + CONFIG.grace_ms + 1, "b"))
    assert out == [ScoreOutcome(*CLF, CHAMPION, PURCHASE, 0.6, positive=False)]


def test_a_silent_shopper_churns_when_the_sweep_passes_the_churn_horizon():
    memory = LiveMemory()
    scored(memory, T0)
    horizon_end = T0 + CONFIG.churn_horizon_ms
    no_order = ScoreOutcome(*CLF, CHAMPION, PURCHASE, 0.6, positive=False)
    assert memory.expire(T0 + DAY_MS + 1, CONFIG) == [no_order]  # no order in 24 h
    assert memory.expire(horizon_end, CONFIG) == []
    assert memory.expire(horizon_end + 1, CONFIG) == [ScoreOutcome(*CLF, CHAMPION, CHURN, 0.3, positive=True)]
    assert memory.ledger[("score", CHAMPION, CHURN, "positive")] == 1


def test_the_cap_drops_the_oldest_pending_score_and_counts_it():
    config = EvalConfig(max_pending=4)
    memory = LiveMemory()
    outcomes = [memory.record_score(PURCHASE, *CLF, CHAMPION, T0 + i, 0.5, config) for i in (3, 1, 4, 2)]
    assert outcomes == [[], [], [], []]
    assert memory.record_score(PURCHASE, *CLF, CHAMPION, T0 + 5, 0.5, config) == [PendingDropped(PURCHASE)]
    assert [p.t_ms - T0 for p in memory.pending] == [2, 3, 4, 5]  # the oldest (t = 1) went
    assert memory.ledger[("dropped", PURCHASE)] == 1


# ------------------------------------------------------------------ recommendations
def served(memory: LiveMemory, t_ms: int, *items: str, variant: str = CHAMPION, config: EvalConfig = CONFIG) -> list:
    return memory.record_list(variant, "nextitem", "v2", t_ms, items, config)


def settled(memory: LiveMemory, ts_ms: int) -> list:
    """What the watermark passing ``ts_ms`` plus the grace period decides (no scores pending here)."""
    return memory.expire(ts_ms + CONFIG.grace_ms + 1, CONFIG)


def test_the_next_new_item_interaction_resolves_a_list_at_its_rank_one_grace_period_later():
    memory = LiveMemory()
    observe(memory, view(T0, "a"))
    served(memory, T0, "x", "b", "y")
    assert observe(memory, view(T0 + 1, "a")) == []  # the same item again: merged, no new interaction
    assert observe(memory, view(T0 + 2, "a", kind=KIND_CART_ADD)) == []  # upgraded to a cart: the same entry
    assert observe(memory, view(T0 + 3, "a", kind=KIND_CART_REMOVE)) == []  # removes are no interaction
    assert observe(memory, view(T0 + 4, "b")) == []  # an earlier interaction could still arrive
    assert observe(memory, view(T0 + 4 + CONFIG.grace_ms, "c", kind=KIND_CART_REMOVE)) == []  # cutoff == ts
    out = observe(memory, view(T0 + 5 + CONFIG.grace_ms, "c", kind=KIND_CART_REMOVE))
    assert out == [RecommendationOutcome("nextitem", "v2", CHAMPION, 2)]
    assert memory.lists == {} and memory.buffer == []


def test_an_interaction_arriving_late_within_grace_resolves_the_list_instead():
    memory = LiveMemory()
    served(memory, T0, "x", "b", "y")
    observe(memory, view(T0 + 10, "b"))
    observe(memory, view(T0 + 5, "y"))  # earlier in event time, arrived later: it is the next interaction
    assert settled(memory, T0 + 10) == [RecommendationOutcome("nextitem", "v2", CHAMPION, 3)]


def test_a_miss_and_a_replaced_list():
    memory = LiveMemory()
    served(memory, T0, "x")
    served(memory, T0 + 1, "y")  # the shopper was shown the newer list: the first is no opportunity
    observe(memory, view(T0 + 2, "z"))
    assert settled(memory, T0 + 2) == [RecommendationOutcome("nextitem", "v2", CHAMPION, 0)]
    assert memory.ledger == {("recommendation", CHAMPION, "opportunities"): 1}


def test_a_list_waits_for_an_interaction_that_arrives_after_the_next_list_was_served():
    memory = LiveMemory()
    served(memory, T0, "x", "z")
    served(memory, T0 + 10, "y")
    observe(memory, view(T0 + 5, "z"))  # between the two lists in event time: resolves the first
    observe(memory, view(T0 + 11, "y"))
    assert sorted(o.rank for o in settled(memory, T0 + 11)) == [1, 2]


def test_a_replaced_list_is_dropped_once_no_interaction_can_come_before_the_next():
    memory = LiveMemory()
    served(memory, T0, "x")
    served(memory, T0 + 10, "y")
    assert memory.expire(T0 + 10, CONFIG) == [] and len(memory.lists[CHAMPION]) == 2  # one at T0 + 10 can come
    assert memory.expire(T0 + 11, CONFIG) == [] and [s.items for s in memory.lists[CHAMPION]] == [
        memory.lists[CHAMPION][0].items
    ]
    assert len(memory.lists[CHAMPION]) == 1


def test_a_list_is_placed_after_the_latest_prediction_before_it():
    memory = LiveMemory()
    memory.next_seq(T0 + 100)  # e.g. a silent-shopper sweep at wall clock
    served(memory, T0 + 50, "a")  # offline it comes after every event up to T0 + 100
    observe(memory, view(T0 + 60, "a"))
    assert settled(memory, T0 + 60) == []
    observe(memory, view(T0 + 101, "b"))
    assert settled(memory, T0 + 101) == [RecommendationOutcome("nextitem", "v2", CHAMPION, 0)]


def test_the_list_cap_drops_the_oldest_waiting_list_and_counts_it():
    config = EvalConfig(max_lists=2)
    memory = LiveMemory()
    assert served(memory, T0, "a", config=config) == served(memory, T0 + 1, "b", config=config) == []
    assert served(memory, T0 + 2, "c", config=config) == [PendingDropped(RECOMMENDATION)]
    assert [s.placed_ms for s in memory.lists[CHAMPION]] == [T0 + 1, T0 + 2]
    assert memory.ledger[("dropped", RECOMMENDATION)] == 1


def test_the_buffer_cap_folds_early_and_a_later_arrival_behind_it_is_counted_out_of_order():
    config = EvalConfig(max_buffered=2)
    memory = LiveMemory()
    served(memory, T0, "a", "b", config=config)
    for ts, item in ((T0 + 3, "a"), (T0 + 4, "c")):
        assert memory.observe(view(ts, item), T0 + 4, config) == []
    assert memory.observe(view(T0 + 5, "d"), T0 + 5, config) == [RecommendationOutcome("nextitem", "v2", CHAMPION, 1)]
    assert memory.observe(view(T0 + 2, "b"), T0 + 5, config) == [OutOfOrder()]  # behind the early fold
    assert memory.ledger[("out_of_order",)] == 1


def test_an_order_of_the_cart_upgrades_its_entries_and_a_new_ordered_item_is_the_next_interaction():
    memory = LiveMemory()
    observe(memory, view(T0, "a"), view(T0 + 1, "b", kind=KIND_CART_ADD))
    served(memory, T0 + 1, "c", "d")
    observe(memory, order(T0 + 2, "a", "b"))  # both since the last order: upgrades
    assert settled(memory, T0 + 2) == []
    # after that order the cart is empty: an order of "a" again is a new interaction, "b" (the tail) is not
    observe(memory, order(T0 + 3, "b", "d", "a"))
    assert settled(memory, T0 + 3) == [RecommendationOutcome("nextitem", "v2", CHAMPION, 2)]


def test_each_variant_keeps_its_own_list():
    memory = LiveMemory()
    served(memory, T0, "a", variant=CHAMPION)
    served(memory, T0, "b", "a", variant=CHALLENGER)
    observe(memory, view(T0 + 1, "a"))
    out = settled(memory, T0 + 1)
    assert sorted(o.rank for o in out if isinstance(o, RecommendationOutcome)) == [1, 2]


def test_gains_and_deciles():
    assert gain(1) == 1.0 and gain(3) == 0.5 and gain(0) == 0.0 and gain(11) == 0.0
    assert [decile(p) for p in (0.0, 0.099999, 0.1, 0.95, 1.0)] == [0, 0, 1, 9, 9]


# ------------------------------------------------------------------ alert returns
def test_alerted_and_held_out_shoppers_return_or_lapse():
    memory = LiveMemory()
    memory.record_alert(ALERTED, T0)
    memory.record_alert(HOLDOUT, T0 + CONFIG.churn_horizon_ms)
    out = observe(memory, view(T0 + CONFIG.churn_horizon_ms + 10, "a"))
    assert AlertOutcome(ALERTED, False) not in out and AlertOutcome(HOLDOUT, True) in out
    assert memory.alerts == [(ALERTED, T0)]
    assert memory.expire(T0 + CONFIG.churn_horizon_ms + CONFIG.grace_ms + 1, CONFIG) == [AlertOutcome(ALERTED, False)]


# ------------------------------------------------------------------ bytes
def full_memory() -> LiveMemory:
    memory = LiveMemory()
    observe(memory, view(T0, "a"), view(T0 + 1, "b"))
    memory.next_seq(T0 + 1)
    served(memory, T0 + 1, *[f"i{n}" for n in range(10)])
    served(memory, T0 + 1, "z", variant=CHALLENGER)
    scored(memory, T0 + 1)
    scored(memory, T0 + 1, variant=CHALLENGER)
    memory.record_alert(HOLDOUT, T0 + 1)
    observe(memory, view(T0 + 2, "i3"))
    memory.ledger[("dropped", CHURN)] = 300  # a multi-byte count
    return memory


def test_round_trip():
    memory = full_memory()
    data = memory.encode()
    assert LiveMemory.decode(data) == memory
    assert LiveMemory.decode(None) == LiveMemory()
    assert LiveMemory.decode(data).encode() == data


def test_corrupt_or_cut_bytes_raise_value_error():
    data = full_memory().encode()
    for cut in range(1, len(data)):
        with pytest.raises(ValueError):
            LiveMemory.decode(data[:cut])
    with pytest.raises(ValueError):
        LiveMemory.decode(b"\x09" + data[1:])  # another format
    with pytest.raises(ValueError):
        LiveMemory.decode(data + b"\x00")


def test_a_format_1_value_of_the_previous_release_still_reads():
    """Bytes the previous release wrote (a served list, a pending score, a ledger count): the list waits
    at its serving time, the sequence tail and the ledger carry over."""
    data = bytes.fromhex(
        "010100c02cc89901000040f89e395b66422f0140f89e395b66422f04086e6578746974656d02763203636c6602763101000001"
        "00c02cc8990100000240f89e395b66422f8472c2e34d854f750100020300c02cc899010000000000000000e03f00010003"
    )
    memory = LiveMemory.decode(data)
    assert (memory.score_seq, memory.scored_ms, memory.placed_ms) == (1, T0, T0)
    assert memory.tail_item == item_hash("a") and memory.buffer == []
    assert [(s.placed_ms, s.items) for s in memory.lists[CHAMPION]] == [(T0, (item_hash("a"), item_hash("b")))]
    assert [(p.score, p.t_ms, p.probability) for p in memory.pending] == [(CHURN, T0, 0.5)]
    assert memory.ledger == {("recommendation", CHAMPION, "opportunities"): 3}
    assert LiveMemory.decode(memory.encode()) == memory  # written back in the current format


def test_a_format_2_value_reads_its_last_scorings_alert_as_format_2_assumed():
    """Format 2 did not store which scoring raised an alert: a pending alert at the last scoring's
    time is taken as its own (the next scoring writes format 3, which says)."""
    data = bytes.fromhex(
        "020200c02cc899010000000000000000000000000000000000000000000000000000000000000000010100c02cc899010000011e01"
    )
    memory = LiveMemory.decode(data)
    assert (memory.score_seq, memory.scored_ms, memory.alerts) == (2, T0, [(HOLDOUT, T0)])
    assert memory.scored_alert == HOLDOUT and memory.ledger == {("alert", ALERTED, "returned"): 1}
    memory.next_seq(T0)
    assert LiveMemory.decode(memory.encode()).scored_alert is None


def test_every_ledger_key_fits_a_byte():
    assert len(LEDGER_KEYS) <= 256 and len(set(LEDGER_KEYS)) == len(LEDGER_KEYS)


# ------------------------------------------------------------------ against models/labels.py
SPREAD_STEPS_MS = (1, 60_000, HOUR_MS, 5 * HOUR_MS, DAY_MS, 3 * DAY_MS, 15 * DAY_MS)
#: Many events within one grace period (1 h) of each other.
DENSE_STEPS_MS = (1, 1000, 60_000, 10 * 60_000, 40 * 60_000, 2 * HOUR_MS)


def random_log(
    rng: random.Random, users: int, events_per_user: int, steps_ms: tuple[int, ...] = SPREAD_STEPS_MS, n_items: int = 6
) -> list[Event]:
    """Random views, cart changes and orders, in canonical order (time, then event-id hash)."""
    events = []
    for u in range(users):
        user, ts = f"u{u}", T0
        for _ in range(events_per_user):
            ts += rng.choice(steps_ms)
            item = f"i{rng.randrange(n_items)}"
            roll = rng.random()
            if roll < 0.55:
                events.append(view(ts, item, user))
            elif roll < 0.75:
                events.append(view(ts, item, user, kind=KIND_CART_ADD))
            elif roll < 0.8:
                events.append(view(ts, item, user, kind=KIND_CART_REMOVE))
            else:
                lines = rng.sample([f"i{k}" for k in range(n_items)], rng.randrange(1, 4))
                events.append(order(ts, *lines, user=user))
    return sorted(events, key=lambda e: (e.ts_ms, event_id_hash(e.event_id)))


def test_outcomes_equal_the_offline_labels_and_next_item_targets():
    """Score every shopper after some of its events; the recount's outcomes must be the labels of
    models/labels.py at those moments (where not censored) and the next entry of item_sequences."""
    rng = random.Random(7)
    events = random_log(rng, users=40, events_per_user=30)
    predictions: list[ServedPrediction] = []
    seq: dict[str, int] = {}
    for event in events:
        if rng.random() < 0.5:
            seq[event.user_id] = seq.get(event.user_id, 0) + 1
            predictions.append(
                ServedPrediction(
                    event.user_id,
                    seq[event.user_id],
                    event.ts_ms,
                    classifier=CLF,
                    scores={CHURN: round(rng.random(), 6), PURCHASE: round(rng.random(), 6)},
                    recommender=("nextitem", "v2"),
                    items=tuple(rng.sample([f"i{k}" for k in range(6)], 3)),
                )
            )
    last_ms = {e.user_id: e.ts_ms for e in events}  # sorted: each shopper's last event time
    config = EvalConfig(max_pending=10_000)
    outcomes = recount(events, predictions, config)
    resolved = {(o.score, o.probability): o.positive for o in outcomes if isinstance(o, ScoreOutcome)}

    index = FutureIndex(events)
    users = [p.user_id for p in predictions]
    times = np.array([p.t_ms for p in predictions])
    for score, label in ((CHURN, churn_labels), (PURCHASE, purchase_labels)):
        horizon = config.horizon_ms(score)
        checked = 0
        for p, y in zip(predictions, label(index, users, times, horizon, 2**62), strict=True):
            key = (score, p.scores[score])
            if p.t_ms + horizon < last_ms[p.user_id] - config.grace_ms:  # the shopper's watermark decided it
                assert key in resolved, f"{score} at {p.t_ms} of {p.user_id} should have resolved"
            if key in resolved:
                assert resolved[key] == bool(y), f"{score} at {p.t_ms} of {p.user_id}"
                checked += 1
        assert checked > 100
    expected = expected_recommendation_ranks(events, predictions, last_ms, config.grace_ms)
    got = sorted(o.rank for o in outcomes if isinstance(o, RecommendationOutcome))
    assert got == sorted(expected) and len(got) > 50


def expected_recommendation_ranks(
    events: list[Event], predictions: list[ServedPrediction], last_ms: dict[str, int], grace_ms: int
) -> list[int]:
    """Per served list: the first item_sequences entry after it, if it comes before the next list
    and behind the shopper's last watermark minus the grace period (only then is it decided)."""
    sequences = item_sequences(events)
    ranks = []
    by_user: dict[str, list[ServedPrediction]] = {}
    for p in predictions:
        by_user.setdefault(p.user_id, []).append(p)
    for user, served_lists in by_user.items():
        seq = sequences.get(user)
        for i, p in enumerate(served_lists):
            until = served_lists[i + 1].t_ms if i + 1 < len(served_lists) else float("inf")
            nxt = next((j for j, ts in enumerate(seq.ts) if ts > p.t_ms), None) if seq else None
            if nxt is not None and seq is not None and seq.ts[nxt] <= until and seq.ts[nxt] < last_ms[user] - grace_ms:
                item = seq.items[nxt]
                ranks.append(p.items.index(item) + 1 if item in p.items else 0)
    return ranks


def test_tally_counts_as_the_ledger_does():
    memory = full_memory()
    before = dict(memory.ledger)
    out = observe(memory, order(T0 + 3, "q"))
    assert tally(out) == {("score", CHAMPION, PURCHASE, "positive"): 1, ("score", CHALLENGER, PURCHASE, "positive"): 1}
    assert {key: n - before.get(key, 0) for key, n in memory.ledger.items() if n != before.get(key, 0)} == tally(out)


# ------------------------------------------------------------------ arrival order
def serving_points(rng: random.Random, events: list[Event]) -> dict[str, ServedPrediction]:
    """Event id -> the prediction served once that event is applied, as of its time; more than a grace
    period apart per shopper, so their order (and score_seq) is the same in every arrival order."""
    points: dict[str, ServedPrediction] = {}
    last: dict[str, int] = {}
    seq: dict[str, int] = {}
    for event in events:
        if event.ts_ms > last.get(event.user_id, 0) + CONFIG.grace_ms and rng.random() < 0.6:
            last[event.user_id] = event.ts_ms
            seq[event.user_id] = seq.get(event.user_id, 0) + 1
            points[event.event_id] = ServedPrediction(
                event.user_id,
                seq[event.user_id],
                event.ts_ms,
                variant=rng.choice([CHAMPION, CHALLENGER]),
                classifier=CLF,
                scores={CHURN: round(rng.random(), 6), PURCHASE: round(rng.random(), 6)},
                recommender=("nextitem", "v2"),
                items=tuple(rng.sample([f"i{k}" for k in range(5)], 3)),
                recommendation_variant=rng.choice([CHAMPION, CHALLENGER]),
            )
    return points


def live_outcomes(arrival: list[Event], points: dict[str, ServedPrediction], config: EvalConfig) -> list:
    """The worker's path: each arriving event through the shopper's state, the applied ones through
    its memory, and the prediction of a serving point recorded right after its event."""
    states: dict[str, ShopperState] = {}
    memories: dict[str, LiveMemory] = {}
    state_config = StateConfig(grace_ms=config.grace_ms)
    outcomes: list = []
    for event in arrival:
        state = states.setdefault(event.user_id, ShopperState.new(event.user_id))
        memory = memories.setdefault(event.user_id, LiveMemory())
        assert state.update(event, state_config) == APPLIED
        outcomes += memory.observe(event, state.last_event_ms, config)
        if event.event_id in points:
            outcomes += replay_prediction(memory, points[event.event_id], config)
    return outcomes


@pytest.mark.parametrize("seed", range(12))
def test_any_arrival_order_within_grace_gives_the_outcomes_of_the_recount(seed):
    """Shuffle arrival within the grace period (an event arrives after every event more than a grace
    period older): the live outcomes are the same multiset in every order, and equal the recount's."""
    rng = random.Random(seed)
    events = random_log(rng, users=6, events_per_user=40, steps_ms=DENSE_STEPS_MS, n_items=5)
    points = serving_points(rng, events)
    config = EvalConfig(max_pending=10_000)
    expected = sorted(map(repr, recount(events, points.values(), config)))
    assert sum(r.startswith("RecommendationOutcome") for r in expected) > 20
    moved = 0
    for _ in range(4):
        # a serving point arrives undelayed: the worker scores as of its watermark, so no later event
        # is applied before it (an earlier one may well come after it)
        jitter = {e.event_id: 0 if e.event_id in points else rng.randrange(config.grace_ms) for e in events}
        arrival = sorted(events, key=lambda e: e.ts_ms + jitter[e.event_id])
        moved += sum(a is not b for a, b in zip(arrival, events, strict=True))
        assert sorted(map(repr, live_outcomes(arrival, points, config))) == expected
    assert moved > len(events)  # the orders did differ from event-time order
