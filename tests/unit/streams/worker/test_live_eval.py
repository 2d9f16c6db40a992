"""Live evaluation in the per-batch logic, without a broker: variants, score_seq, the churn-alert
holdout, re-sends after a replay, and counters that move only when a batch is delivered.

The scorer here is a small fake implementing the loop contract's challenger extension (the real
one is built on branch ``challenger``); the memory and the pipeline are the real ones."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from features.encoding import decode_state
from features.events import DEFAULT_LIMITS, Event, OrderLine, encode_event
from features.spec import DEFAULT_FEATURE_SPEC
from features.state import DAY_MS, HOUR_MS, ShopperState, StateConfig
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from models.outcomes import (
    ALERTED,
    CHURN,
    HOLDOUT,
    PURCHASE,
    AlertOutcome,
    LiveMemory,
    RecommendationOutcome,
    ScoreOutcome,
)
from models.registry import SHADOW, SPLIT, ModelRegistry
from models.scoring import BatchScorer, ShopperScores
from models.variants import CHALLENGER, CHAMPION, in_share
from streams.worker.alerts import AlertPolicy
from streams.worker.envelope import Stored
from streams.worker.metrics import WorkerMetrics
from streams.worker.pipeline import BatchProcessor, ChallengerScorer, InputMessage
from tests.unit.models.test_challenger import save_classifier

NOW_MS = 1_760_000_000_000
TOPICS = {"views": "page_view", "cart": "cart", "orders": "order"}
CHAMPION_SCORES = {CHURN: 0.91, PURCHASE: 0.25}
CHALLENGER_SCORES = {CHURN: 0.15, PURCHASE: 0.75}


@dataclass(frozen=True)
class Trial:
    """A loaded challenger, as models.registry.Challenger describes it."""

    model: str
    version: str
    mode: str
    share: float
    salt: str = "s1"


class FakeScorer:
    """Fixed predictions: the champion says churn, the challenger says buy; lists in opposite orders."""

    def __init__(self, trials: Sequence[Trial] = ()) -> None:
        self.trials = {trial.model: trial for trial in trials}

    @property
    def model_versions(self) -> dict[str, str]:
        return {
            CHURN: f"{CLASSIFIER_MODEL}:c1",
            PURCHASE: f"{CLASSIFIER_MODEL}:c1",
            "recommendations": f"{NEXTITEM_MODEL}:n1",
        }

    @property
    def challengers(self) -> dict[str, Trial]:
        return self.trials

    def refresh(self, force: bool = False) -> bool:
        return False

    def score(self, states: Sequence[ShopperState], features: np.ndarray) -> list[ShopperScores]:
        return [ShopperScores(dict(CHAMPION_SCORES), [("a", 0.9), ("b", 0.5)]) for _ in states]

    def score_challenger(self, model: str, states: Sequence[ShopperState], features: np.ndarray) -> list[ShopperScores]:
        if model == CLASSIFIER_MODEL:
            return [ShopperScores(dict(CHALLENGER_SCORES)) for _ in states]
        return [ShopperScores({}, [("b", 0.9), ("c", 0.5)]) for _ in states]

    def churn_reasons(self, features: np.ndarray, top: int = 3) -> list[list[tuple[str, float]]]:
        return [[("ms_since_last_event", 0.2)] for _ in range(len(features))]


def processor(trials: Sequence[Trial] = (), holdout_share: float = 0.0, metrics: WorkerMetrics | None = None):
    return BatchProcessor(
        TOPICS,
        StateConfig(),
        DEFAULT_FEATURE_SPEC,
        FakeScorer(trials),
        DEFAULT_LIMITS,
        metrics or WorkerMetrics(),
        alert_policy=AlertPolicy(high=0.5, low=0.2),
        alert_holdout_share=holdout_share,
        alert_holdout_salt="holdout-test",
    )


def view(user: str, n: int, ts: int, item: str) -> Event:
    return Event("view", f"{user}-e{n}", user, ts, session_id="s", item_id=item, category="c", price=1.0, quantity=1)


def order(user: str, n: int, ts: int, item: str) -> Event:
    lines = (OrderLine(item, 1, 1.0),)
    return Event("order", f"{user}-o{n}", user, ts, order_id=f"o{n}", order_lines=lines, total=1.0)


class Store(dict[bytes, bytes]):
    """key -> stored value, as the table holds them."""


def run(proc: BatchProcessor, events: Sequence[tuple[Event, int]], store: dict[bytes, bytes]):
    topic = {"view": "views", "order": "orders"}
    messages = [InputMessage(topic[e.kind], 0, offset, e.user_id.encode(), encode_event(e)) for e, offset in events]
    outcome = proc.process(messages, lambda partition, key: store.get(key), now_ms=NOW_MS)
    for write in outcome.writes:
        assert write.value is not None  # scoring never deletes
        store[write.key] = write.value
    return outcome


def settle(proc: BatchProcessor, store: dict[bytes, bytes], ts_ms: int, user: str = "u1"):
    """A silent-shopper sweep one grace period past ``ts_ms``: the interactions up to ``ts_ms`` are
    decided (none earlier can still be applied), so the lists they follow resolve."""
    outcome = proc.rescore_silent([(0, user.encode(), store[user.encode()])], ts_ms + HOUR_MS + 1)
    for write in outcome.writes:
        assert write.value is not None  # a sweep never deletes
        store[write.key] = write.value
    return outcome


def memory_of(store: dict[bytes, bytes], user: str = "u1") -> LiveMemory:
    return LiveMemory.decode(Stored.decode(store[user.encode()]).memory)


def test_the_fake_offers_the_contract_extension():
    assert isinstance(FakeScorer(), ChallengerScorer)


def test_champion_only_outputs_carry_variant_and_score_seq_and_the_next_event_resolves_them():
    proc, store = processor(), Store()
    first = run(proc, [(view("u1", 1, NOW_MS - 5000, "x"), 0)], store)
    doc = json.loads(first.scored[0].result)
    rec = json.loads(first.scored[0].recommendation or b"")
    assert (doc["variant"], doc["score_seq"], rec["variant"], rec["score_seq"]) == (CHAMPION, 1, CHAMPION, 1)
    assert first.live == []
    second = run(proc, [(view("u1", 2, NOW_MS - 4000, "b"), 1)], store)
    assert json.loads(second.scored[0].result)["score_seq"] == 2
    assert sorted(second.live, key=repr) == sorted(
        [
            ScoreOutcome(CLASSIFIER_MODEL, "c1", CHAMPION, CHURN, 0.91, False),
            AlertOutcome(ALERTED, True),  # the first scoring alerted (risk 0.91), and the shopper returned
        ],
        key=repr,
    )  # the list waits: an interaction before "b" could still arrive within the grace period
    third = run(proc, [(order("u1", 3, NOW_MS - 3000, "b"), 0)], store)
    purchases = [o for o in third.live if isinstance(o, ScoreOutcome) and o.score == PURCHASE]
    assert [(o.probability, o.positive) for o in purchases] == [(0.25, True), (0.25, True)]  # two scorings
    resolved = [o for o in settle(proc, store, NOW_MS - 4000).live if isinstance(o, RecommendationOutcome)]
    assert resolved == [RecommendationOutcome(NEXTITEM_MODEL, "n1", CHAMPION, 2)]


def test_shadow_measures_the_challenger_for_everyone_and_publishes_only_the_champion():
    trials = [Trial(CLASSIFIER_MODEL, "c2", "shadow", 1.0), Trial(NEXTITEM_MODEL, "n2", "shadow", 1.0)]
    proc, store = processor(trials), Store()
    out = run(proc, [(view("u1", 1, NOW_MS - 5000, "x"), 0)], store).scored[0]
    doc, rec = json.loads(out.result), json.loads(out.recommendation or b"")
    assert doc["variant"] == CHAMPION and doc["scores"] == CHAMPION_SCORES
    assert rec["variant"] == CHAMPION and [i["item_id"] for i in rec["items"]] == ["a", "b"]
    memory = memory_of(store)
    assert set(memory.lists) == {CHAMPION, CHALLENGER}
    assert sorted((p.variant, p.version) for p in memory.pending) == [
        (CHALLENGER, "c2"),
        (CHALLENGER, "c2"),
        (CHAMPION, "c1"),
        (CHAMPION, "c1"),
    ]
    run(proc, [(view("u1", 2, NOW_MS - 4000, "c"), 1)], store)
    resolved = settle(proc, store, NOW_MS - 4000).live
    ranks = {o.variant: o.rank for o in resolved if isinstance(o, RecommendationOutcome)}
    assert ranks == {CHAMPION: 0, CHALLENGER: 2}


def test_split_serves_the_challenger_to_its_share_and_measures_each_shopper_once():
    trials = [Trial(CLASSIFIER_MODEL, "c2", "split", 0.5), Trial(NEXTITEM_MODEL, "n2", "split", 0.5, salt="s2")]
    proc, store = processor(trials), Store()
    users = [f"u{n}" for n in range(40)]
    outcome = run(proc, [(view(u, 1, NOW_MS - 5000, "x"), n) for n, u in enumerate(users)], store)
    seen = set()
    for out in outcome.scored:
        doc, rec = json.loads(out.result), json.loads(out.recommendation or b"")
        classifier = CHALLENGER if in_share(out.user_id, "s1", 0.5) else CHAMPION
        nextitem = CHALLENGER if in_share(out.user_id, "s2", 0.5) else CHAMPION
        assert (doc["variant"], rec["variant"]) == (classifier, nextitem)
        assert doc["scores"] == (CHALLENGER_SCORES if classifier == CHALLENGER else CHAMPION_SCORES)
        assert doc["model_versions"][CHURN] == f"{CLASSIFIER_MODEL}:{'c2' if classifier == CHALLENGER else 'c1'}"
        assert rec["model_version"] == f"{NEXTITEM_MODEL}:{'n2' if nextitem == CHALLENGER else 'n1'}"
        memory = memory_of(store, out.user_id)
        assert {p.variant for p in memory.pending} == {classifier} and set(memory.lists) == {nextitem}
        seen.add((classifier, nextitem))
    assert len(seen) == 4  # both variants of both kinds occur


def test_a_replay_re_sends_the_last_scoring_with_its_number_and_records_nothing_twice():
    proc, store = processor(), Store()
    batch = [(view("u1", 1, NOW_MS - 5000, "x"), 0), (view("u1", 2, NOW_MS - 4000, "y"), 1)]
    first = run(proc, batch, store)
    stored_before = store[b"u1"]
    replay = run(proc, batch[:1], store)  # a replay after kill -9, cut into another batch
    first_doc, again = json.loads(first.scored[0].result), json.loads(replay.scored[0].result)
    expected = (1, NOW_MS - 4000)
    assert (again["score_seq"], again["as_of_ts"]) == (first_doc["score_seq"], first_doc["as_of_ts"]) == expected
    assert store[b"u1"] == stored_before and replay.live == []


def test_a_replay_cut_into_a_batch_with_new_events_re_sends_the_stored_scoring_before_the_new_one():
    """kill -9 after the state was stored but before the outputs were sent: the replayed batch also
    holds newer events, and the lost scoring must still reach the topics, under its own number."""
    proc, store = processor(), Store()
    first = run(proc, [(view("u1", 1, NOW_MS - 5000, "x"), 0)], store)
    batch = [(view("u1", 1, NOW_MS - 5000, "x"), 0), (view("u1", 2, NOW_MS - 4000, "y"), 1)]
    replay = run(proc, batch, store)
    docs = [json.loads(out.result) for out in replay.scored]
    lost = json.loads(first.scored[0].result)
    assert [(d["score_seq"], d["as_of_ts"], d["trigger_event_id"]) for d in docs] == [
        (1, NOW_MS - 5000, "u1-e1"),
        (2, NOW_MS - 4000, "u1-e2"),
    ]
    assert docs[0]["scores"] == lost["scores"] and docs[0]["churn_alert"] == lost["churn_alert"] == ALERTED
    assert [out.alert is None for out in replay.scored] == [True, True]  # alerted once, with the first pass
    assert len(replay.writes) == 1 and replay.writes[0].value == store[b"u1"]
    assert memory_of(store).score_seq == 2


def test_a_re_send_after_a_sweep_is_scored_as_of_the_sweep():
    """A re-send scores the stored state as of the stored scoring's moment, which a sweep may have set."""
    proc, store = processor(), Store()
    run(proc, [(view("u1", 1, NOW_MS - 5000, "x"), 0)], store)
    swept = settle(proc, store, NOW_MS - 5000)
    rows: list[np.ndarray] = []
    proc.feature_watch = rows.append  # the rows scored after events: the re-send's
    replay = run(proc, [(view("u1", 1, NOW_MS - 5000, "x"), 0)], store)
    sweep_doc, again = json.loads(swept.scored[0].result), json.loads(replay.scored[0].result)
    sweep_ms = NOW_MS - 5000 + HOUR_MS + 1
    assert (again["score_seq"], again["as_of_ts"]) == (sweep_doc["score_seq"], sweep_doc["as_of_ts"]) == (2, sweep_ms)
    raw = Stored.decode(store[b"u1"]).state
    assert raw is not None
    state = decode_state(raw)
    expected = DEFAULT_FEATURE_SPEC.matrix([state], np.array([sweep_ms], dtype=np.int64))
    np.testing.assert_array_equal(rows[0], expected)


def test_a_replayed_alerting_scoring_repeats_its_alert_decision_without_sending_the_alert_again():
    proc, store = processor(), Store()
    first = run(proc, [(view("u1", 1, NOW_MS - 5000, "x"), 0)], store)
    replay = run(proc, [(view("u1", 1, NOW_MS - 5000, "x"), 0)], store)
    assert first.scored[0].alert is not None and replay.scored[0].alert is None
    assert json.loads(replay.scored[0].result)["churn_alert"] == ALERTED
    assert memory_of(store).alerts == [(ALERTED, NOW_MS - 5000)]  # recorded once


def test_a_replayed_scoring_without_an_alert_says_so_when_an_earlier_one_at_the_same_time_alerted():
    """An event older than the shopper's newest leaves the scoring time where it was: the second
    scoring shares the first one's ``as_of_ts``, and only the first raised the (pending) alert."""
    proc, store = processor(), Store()
    run(proc, [(view("u1", 1, NOW_MS - 5000, "x"), 0)], store)
    second = run(proc, [(view("u1", 2, NOW_MS - 6000, "y"), 1)], store)
    replay = run(proc, [(view("u1", 2, NOW_MS - 6000, "y"), 1)], store)
    for out in (second, replay):
        doc = json.loads(out.scored[0].result)
        assert (doc["score_seq"], doc["as_of_ts"]) == (2, NOW_MS - 5000)
        assert "churn_alert" not in doc and out.scored[0].alert is None
    assert memory_of(store).alerts == [(ALERTED, NOW_MS - 5000)]


def test_held_out_alerts_are_recorded_and_counted_not_sent():
    proc, store = processor(holdout_share=1.0), Store()
    outcome = run(proc, [(view("u1", 1, NOW_MS - 5000, "x"), 0)], store)
    assert outcome.scored[0].alert is None and outcome.held_out_alerts == 1
    assert json.loads(outcome.scored[0].result)["churn_alert"] == HOLDOUT
    assert memory_of(store).alerts == [(HOLDOUT, NOW_MS - 5000)]
    sent = run(processor(), [(view("u1", 1, NOW_MS - 5000, "x"), 0)], {})
    alert = json.loads(sent.scored[0].alert or b"")
    assert alert["variant"] == CHAMPION and sent.held_out_alerts == 0
    assert json.loads(sent.scored[0].result)["churn_alert"] == ALERTED


@pytest.mark.parametrize("share", [0.3])
def test_the_holdout_is_the_salted_share(share):
    proc = processor(holdout_share=share)
    users = [f"u{n}" for n in range(60)]
    outcome = run(proc, [(view(u, 1, NOW_MS - 5000, "x"), n) for n, u in enumerate(users)], {})
    held = {s.user_id for s in outcome.scored if s.alert is None}
    assert held == {u for u in users if in_share(u, "holdout-test", share)} and 0 < len(held) < len(users)


def test_the_silent_sweep_resolves_what_the_horizon_closed_and_records_its_scoring():
    proc, store = processor(), Store()
    run(proc, [(view("u1", 1, NOW_MS - 5000, "x"), 0)], store)
    later = NOW_MS + 2 * DAY_MS
    outcome = proc.rescore_silent([(0, b"u1", store[b"u1"])], later)
    assert [(o.score, o.positive) for o in outcome.live if isinstance(o, ScoreOutcome)] == [(PURCHASE, False)]
    [write] = outcome.writes
    memory = LiveMemory.decode(Stored.decode(write.value).memory)
    assert memory.score_seq == 2 and {p.t_ms for p in memory.pending} == {NOW_MS - 5000, later}


def test_live_counters_move_only_when_a_batch_is_counted_as_delivered():
    metrics = WorkerMetrics()
    proc, store = processor(holdout_share=1.0, metrics=metrics), Store()
    first = run(proc, [(view("u1", 1, NOW_MS - 5000, "x"), 0)], store)
    outcome = run(proc, [(view("u1", 2, NOW_MS - 4000, "a"), 1)], store)
    sample = metrics.registry.get_sample_value
    labels = {"model": NEXTITEM_MODEL, "version": "n1", "variant": CHAMPION}
    assert sample("shoppulse_live_recommendation_opportunities_total", labels) is None
    assert sample("shoppulse_live_alerts_held_out_total") == 0
    swept = settle(proc, store, NOW_MS - 4000)
    for delivered in (first, outcome, swept):
        metrics.count_live(delivered.live, delivered.held_out_alerts)
    assert sample("shoppulse_live_recommendation_opportunities_total", labels) == 1
    assert sample("shoppulse_live_recommendation_hits_total", {**labels, "k": "5"}) == 1
    assert sample("shoppulse_live_recommendation_gain_total", labels) == 1.0  # rank 1
    churn = {"model": CLASSIFIER_MODEL, "version": "c1", "variant": CHAMPION, "score": CHURN}
    cell = {**churn, "decile": "9", "outcome": "negative"}
    assert sample("shoppulse_live_score_outcomes_total", cell) == 1
    assert sample("shoppulse_live_score_probability_sum_total", cell) == pytest.approx(0.91)
    assert sample("shoppulse_live_score_brier_sum_total", churn) == pytest.approx(0.91**2)
    assert sample("shoppulse_live_alert_returns_total", {"group": HOLDOUT, "outcome": "returned"}) == 1
    assert sample("shoppulse_live_alerts_held_out_total") == 1  # the second scoring found it disarmed


def test_the_real_scorer_split_then_shadow(tmp_path):
    """models.scoring.BatchScorer (branch challenger) with a classifier challenger: in split mode its
    share of shoppers is served and measured as the challenger; in shadow mode everyone is served
    the champion and measured under both."""
    registry = ModelRegistry(tmp_path / "registry")
    save_classifier(registry, "v1", seed=1)
    save_classifier(registry, "v2", seed=2)
    registry.promote(CLASSIFIER_MODEL, "v1")
    registry.set_challenger(CLASSIFIER_MODEL, "v2", SPLIT, 0.5, salt="exp")
    scorer = BatchScorer(DEFAULT_FEATURE_SPEC, registry.root)
    assert isinstance(scorer, ChallengerScorer)
    proc = BatchProcessor(TOPICS, StateConfig(), DEFAULT_FEATURE_SPEC, scorer, DEFAULT_LIMITS, WorkerMetrics())
    store = Store()
    users = [f"u{n}" for n in range(30)]
    outcome = run(proc, [(view(u, 1, NOW_MS - 5000, "x"), n) for n, u in enumerate(users)], store)
    variants = set()
    for out in outcome.scored:
        doc = json.loads(out.result)
        variant = CHALLENGER if in_share(out.user_id, "exp", 0.5) else CHAMPION
        version = "v2" if variant == CHALLENGER else "v1"
        assert doc["variant"] == variant and doc["model_versions"][CHURN] == f"{CLASSIFIER_MODEL}:{version}"
        assert {(p.variant, p.version) for p in memory_of(store, out.user_id).pending} == {(variant, version)}
        variants.add(variant)
    assert variants == {CHAMPION, CHALLENGER}

    registry.set_challenger(CLASSIFIER_MODEL, "v2", SHADOW)
    scorer.refresh(force=True)
    outcome = run(proc, [(view(u, 2, NOW_MS - 4000, "y"), 100 + n) for n, u in enumerate(users)], store)
    for out in outcome.scored:
        assert json.loads(out.result)["variant"] == CHAMPION
        recorded = {(p.variant, p.version, p.t_ms) for p in memory_of(store, out.user_id).pending}
        assert {(CHAMPION, "v1", NOW_MS - 4000), (CHALLENGER, "v2", NOW_MS - 4000)} <= recorded
