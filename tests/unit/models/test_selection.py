"""Never serve a loser: the registered models are chosen on validation, and only on validation.

streams.sim.generator is imported here (tests only); models/ itself never imports streams/.
"""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from features.events import KIND_VIEW, Event, encode_event, topic_kind_of
from features.offline import final_states
from features.spec import DEFAULT_FEATURE_SPEC
from features.state import DAY_MS, HOUR_MS
from models.artifacts import ArtifactError, load_artifact, save_artifact
from models.labels import TASKS
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from models.nextitem import NextItemConfig, NextItemRecommender, SASRec
from models.recommenders import (
    BLEND_KIND,
    COOCCURRENCE_KIND,
    BlendItemRecommender,
    BlendScorer,
    CooccurrenceItemRecommender,
    CooccurrenceRecommender,
    load_recommender,
)
from models.registry import ModelRegistry
from models.scoring import BatchScorer
from models.sequences import ItemVocab
from models.training import TrainingConfig, build_examples, fit_and_evaluate_classifiers, make_time_split, train_all
from models.training.fit_nextitem import fit_and_evaluate_nextitem
from models.training.select import select_classifier, select_recommender
from streams.sim.generator import GeneratorConfig, ShopSimulator

torch.set_num_threads(1)
T = 1_704_067_200_000


def _probabilities(rng: np.random.Generator, y: np.ndarray, sharpness: float) -> np.ndarray:
    """Calibrated-looking probabilities whose quality grows with ``sharpness``."""
    logit = sharpness * (2 * y - 1) + rng.normal(0, 1.5, len(y))
    return 1 / (1 + np.exp(-logit))


def _choose(sharp_mlp: float, sharp_lr: float, shoppers: int) -> dict:
    rng = np.random.default_rng(0)
    y = {t: (rng.random(4 * shoppers) < 0.3).astype(float) for t in TASKS}
    users = {t: np.repeat(np.arange(shoppers), 4) for t in TASKS}
    p = {
        "mlp": {t: _probabilities(rng, y[t], sharp_mlp) for t in TASKS},
        "logistic_regression": {t: _probabilities(rng, y[t], sharp_lr) for t in TASKS},
    }
    return select_classifier("mlp", "logistic_regression", p, y, users, 200, seed=0)


def test_classifier_rule_serves_the_mlp_only_when_it_is_clearly_better():
    clear = _choose(2.0, 1.0, shoppers=2000)
    assert clear["served"] == "mlp" and clear["delta_log_loss"] < 0 and clear["ci95"][1] < 0
    worse = _choose(1.0, 2.0, shoppers=2000)
    assert worse["served"] == "logistic_regression" and worse["delta_log_loss"] > 0
    # a small edge that is not sure: better for half the shoppers, worse for the other half
    users = np.repeat(np.arange(40), 4)
    y = np.tile([0.0, 1.0], 80)
    towards_truth = np.where(users % 2 == 0, 0.65, 0.4)  # probability the MLP gives the true label
    p_mlp = np.where(y == 1, towards_truth, 1 - towards_truth)
    p = {"mlp": {t: p_mlp for t in TASKS}, "logistic_regression": {t: np.full(160, 0.5) for t in TASKS}}
    noisy = select_classifier(
        "mlp", "logistic_regression", p, {t: y for t in TASKS}, {t: users for t in TASKS}, 200, seed=0
    )
    assert noisy["delta_log_loss"] < 0 and noisy["ci95"][0] < 0 < noisy["ci95"][1]
    assert noisy["served"] == "logistic_regression" and "does not exclude zero" in noisy["reason"]
    # without a bootstrap the point estimate decides
    assert (
        select_classifier("mlp", "logistic_regression", p, {t: y for t in TASKS}, {t: users for t in TASKS}, 0, seed=0)[
            "served"
        ]
        == "mlp"
    )


def test_recommender_rule_picks_the_best_validation_ndcg_and_the_simpler_on_a_tie():
    valid = {
        "sasrec": {"HR@10": 0.30, "NDCG@10": 0.20},
        "cooccurrence": {"HR@10": 0.35, "NDCG@10": 0.18},
        "popularity": {"HR@10": 0.9, "NDCG@10": 0.9},
    }
    chosen = select_recommender(valid, ("cooccurrence", "sasrec"))
    assert chosen["served"] == "sasrec" and set(chosen["valid"]) == set(valid)  # popularity reported, not servable
    valid["cooccurrence"]["NDCG@10"] = 0.25
    assert select_recommender(valid, ("cooccurrence", "sasrec"))["served"] == "cooccurrence"
    valid["sasrec"] = dict(valid["cooccurrence"])
    assert select_recommender(valid, ("cooccurrence", "sasrec"))["served"] == "cooccurrence"


@pytest.fixture(scope="module")
def simulated():
    events = list(ShopSimulator(GeneratorConfig(seed=11, n_shoppers=700, n_items=300, duration_days=28)).events())
    cfg = TrainingConfig.quick(device="cpu", progress=False, bootstrap=50, epochs=6, nextitem_epochs=1)
    ex = build_examples(events, cfg.labels, cfg.state)
    split = make_time_split(
        ex.observed_from_ms,
        ex.observed_until_ms,
        cfg.labels.horizons(),
        cfg.eval_fraction,
        cfg.valid_fraction,
        cfg.warmup_ms,
    )
    return events, cfg, ex, split


def test_an_untrained_mlp_loses_to_logistic_regression_which_is_registered_and_served(simulated, tmp_path):
    events, cfg, _, _ = simulated
    result = train_all(events, tmp_path, dataclasses.replace(cfg, epochs=0, version="v1"))
    selection = result.report["classifiers"]["selection"]
    assert selection["served"] == "logistic_regression" and selection["delta_log_loss"] > 0
    assert result.served[CLASSIFIER_MODEL] == "logistic_regression"
    meta = load_artifact(ModelRegistry(tmp_path).current_dir(CLASSIFIER_MODEL)).metadata
    assert meta["config"]["hidden"] == [] and meta["extra"]["served"] == "logistic_regression"
    assert meta["feature_spec_hash"] == DEFAULT_FEATURE_SPEC.hash
    assert "SERVED (churn + purchase): logistic regression" in _report_text(result.report)

    scorer = BatchScorer(DEFAULT_FEATURE_SPEC, tmp_path, device="cpu")
    assert scorer.classifier is not None and scorer.classifier.model.cfg.hidden == ()
    states = list(final_states(events).values())[:50]
    features = DEFAULT_FEATURE_SPEC.matrix(states, np.array([s.last_event_ms for s in states], dtype=np.int64))
    served = scorer.score(states, features)
    expected = result.classifier.predict_proba(features)
    np.testing.assert_allclose([r.scores["churn_risk"] for r in served], expected["churn"], rtol=1e-6)
    assert not np.allclose(expected["churn"], expected["churn"][0])  # a real model, not a constant
    # the churn-alert reasons compare with the logistic regression's own training mean
    np.testing.assert_array_equal(scorer.classifier.reference_features, result.classifier.reference_features)
    assert len(scorer.churn_reasons(features[:5])) == 5


def _report_text(report: dict) -> str:
    from models.report import render_text

    return render_text(report)


def test_the_classifier_choice_never_reads_the_evaluation_period(simulated):
    _, cfg, ex, split = simulated
    _, before = fit_and_evaluate_classifiers(ex, split, cfg, DEFAULT_FEATURE_SPEC)
    flipped = dataclasses.replace(ex, y=ex.y.copy())
    later = ex.ts >= split.split_ms
    flipped.y[later] = 1 - flipped.y[later]  # an evaluation period where every label is the other way
    _, after = fit_and_evaluate_classifiers(flipped, split, cfg, DEFAULT_FEATURE_SPEC)
    assert after["selection"] == before["selection"]
    for task in TASKS:
        assert after["metrics"][task]["mlp"]["roc_auc"] == pytest.approx(1 - before["metrics"][task]["mlp"]["roc_auc"])


def ring_events(post_split_step: int, shoppers: int = 120, items: int = 30) -> tuple[list[Event], int]:
    """Shoppers walking a ring of items (item i, then i + 1, ...) for about 5 days; after day 3
    (the split) they step by ``post_split_step`` instead, so the test targets follow another rule."""
    rng = random.Random(3)
    split_ms = T + 3 * DAY_MS
    events = []
    for u in range(shoppers):
        ts, item = T + rng.randint(0, DAY_MS), rng.randrange(items)
        for i in range(16):
            events.append(
                Event(
                    KIND_VIEW,
                    f"u{u}-{i}",
                    f"u{u}",
                    ts,
                    session_id=f"s{u}",
                    item_id=f"i{item}",
                    category="c",
                    price=1.0,
                    quantity=1,
                )
            )
            ts += rng.randint(HOUR_MS, 14 * HOUR_MS)
            item = (item + (1 if ts < split_ms else post_split_step)) % items
    return sorted(events, key=lambda e: e.ts_ms), split_ms


def test_the_recommender_choice_is_the_validation_winner_and_never_reads_the_test_targets(tmp_path):
    cfg = TrainingConfig.quick(device="cpu", progress=False, nextitem_epochs=1)
    events, split_ms = ring_events(post_split_step=1)
    served, info = fit_and_evaluate_nextitem(events, split_ms, cfg)
    sel = info["selection"]
    assert info["data"]["next"]["eval_shoppers"] > 100 and info["data"]["valid_shoppers"] > 100
    assert sel["served"] == "cooccurrence" and isinstance(served, CooccurrenceItemRecommender)
    assert sel["valid"]["cooccurrence"]["NDCG@10"] == pytest.approx(1.0)
    assert sel["valid"]["sasrec"]["NDCG@10"] < 1.0
    assert served.recommend([["i4"]], k=1)[0][0][0] == "i5"

    other, other_info = fit_and_evaluate_nextitem(ring_events(post_split_step=7)[0], split_ms, cfg)
    assert other_info["selection"] == sel  # the test targets changed, the choice did not
    assert other_info["metrics"]["next"]["cooccurrence"]["HR@10"] < info["metrics"]["next"]["cooccurrence"]["HR@10"]

    # the served co-occurrence round-trips through the registry and the scorer serves it
    registry = ModelRegistry(tmp_path)
    served.save(registry.version_dir(NEXTITEM_MODEL, "v1"), "v1")
    registry.promote(NEXTITEM_MODEL, "v1")
    loaded = load_recommender(registry.current_dir(NEXTITEM_MODEL))
    assert loaded.kind == COOCCURRENCE_KIND and loaded.version == "v1"
    histories = [["i4"], ["i10", "i11"], [], ["unknown"]]
    assert loaded.recommend(histories, k=5) == served.recommend(histories, k=5)
    assert not isinstance(loaded, NextItemRecommender)
    scorer_rec = BatchScorer(DEFAULT_FEATURE_SPEC, tmp_path, device="cpu").recommender
    assert scorer_rec is not None and scorer_rec.kind == COOCCURRENCE_KIND


def test_a_blend_of_sasrec_and_cooccurrence_round_trips_and_ranks_by_both(tmp_path):
    sequences = [[1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 1], [5, 1, 2, 3]]
    torch.manual_seed(0)
    sasrec = SASRec(NextItemConfig(num_items=5, max_len=8, dim=8, layers=1, heads=1)).eval()
    sasrec.popularity.copy_(torch.tensor([0.0, 4, 3, 3, 3, 2]))
    cooc = CooccurrenceRecommender().fit(sequences, 5)
    vocab = ItemVocab(["a", "b", "c", "d", "e"])
    histories = [[1, 2], [3], []]
    only_cooc = BlendScorer(sasrec, cooc, 0.0).score(histories)
    assert torch.equal(
        only_cooc.argsort(dim=1, descending=True)[:, :2], (cooc.score(histories)).argsort(dim=1, descending=True)[:, :2]
    )
    mixed = BlendScorer(sasrec, cooc, 0.5).score(histories)
    np.testing.assert_allclose(mixed[:, 1:].sum(dim=1).numpy(), 1.0, rtol=1e-5)  # a mix of two distributions
    rec = BlendItemRecommender(BlendScorer(sasrec, cooc, 0.5), vocab)
    path = rec.save(tmp_path / "blend", "v1")
    loaded = load_recommender(path)
    assert loaded.kind == BLEND_KIND and isinstance(loaded, BlendItemRecommender) and loaded.blend.weight == 0.5
    ids = [["a", "b"], ["c"], [], ["unknown"]]
    assert loaded.recommend(ids, k=3) == rec.recommend(ids, k=3)
    assert [item for item, _ in loaded.recommend([[]], k=1)[0]] == ["a"]  # cold start: the most popular


def test_the_selection_benchmark_reports_every_candidate_and_marks_the_served_one(tmp_path, capsys):
    from models.bench_selection import SECTION, main

    events, _ = ring_events(post_split_step=1)
    path = tmp_path / "ring.jsonl"
    path.write_text(
        "".join(
            json.dumps({"topic_kind": topic_kind_of(e), "key": e.user_id, "value": encode_event(e).decode()}) + "\n"
            for e in events
        )
    )
    bench = tmp_path / "BENCHMARKS.md"
    argv = ["--events", str(path), "--name", "ring", "--quick", "--nextitem-epochs", "1", "--benchmarks", str(bench)]
    assert main(argv) == 0
    assert "served: cooccurrence" in capsys.readouterr().out
    text = bench.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "| ring |" in line]
    assert SECTION in text and len(rows) == 4  # SASRec, co-occurrence, popularity, blend
    assert [r.split(" | ")[4] for r in rows if "**yes**" in r] == ["cooccurrence"]
    assert main(["--events", str(path), "--split-fraction", "1.5"]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")
def test_cooccurrence_and_blend_recommend_the_same_on_cuda_as_on_the_cpu(tmp_path):
    events, split_ms = ring_events(post_split_step=1)
    cfg = TrainingConfig.quick(device="cpu", progress=False, nextitem_epochs=1)
    served, _ = fit_and_evaluate_nextitem(events, split_ms, cfg)
    sasrec = SASRec(NextItemConfig(num_items=len(served.vocab), max_len=20, dim=16, layers=1, heads=1)).eval()
    assert isinstance(served, CooccurrenceItemRecommender)
    blend = BlendItemRecommender(BlendScorer(sasrec, served.model, 0.5), served.vocab)
    histories = [[f"i{i}", f"i{i + 1}"] for i in range(20)] + [[]]
    for rec, name in ((served, "cooc"), (blend, "blend")):
        path = rec.save(tmp_path / name, "v1")
        on_cpu = load_recommender(path, device="cpu").recommend(histories, k=5)
        on_gpu = load_recommender(path, device="cuda").recommend(histories, k=5)
        for cpu_row, gpu_row in zip(on_cpu, on_gpu, strict=True):
            assert len(set(i for i, _ in cpu_row) & set(i for i, _ in gpu_row)) >= 4  # near-ties may swap
            np.testing.assert_allclose([s for _, s in gpu_row], [s for _, s in cpu_row], rtol=1e-4, atol=1e-6)


def test_a_cooccurrence_artifact_with_indices_outside_its_catalogue_is_refused(tmp_path):
    cooc = CooccurrenceRecommender().fit([[1, 2, 3], [2, 3, 1]], 3)
    tensors = cooc.tensors()
    tensors["ct_indices"] = tensors["ct_indices"].clone()
    tensors["ct_indices"][0, 0] = 99  # consistent checksums, impossible content
    path = save_artifact(
        tmp_path / "bad", tensors, kind=COOCCURRENCE_KIND, version="v1", config=cooc.config(), vocab=["a", "b", "c"]
    )
    with pytest.raises(ArtifactError, match="does not match the nextitem-cooccurrence model code"):
        load_recommender(path)
    with pytest.raises(ArtifactError, match="not a next-item recommender"):
        load_recommender(save_artifact(tmp_path / "other", {}, kind="something-else", version="v1"))
