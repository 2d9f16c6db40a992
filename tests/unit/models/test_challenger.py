"""Champion and challenger: the registry's second pointer, its CLI, and the scorer that serves both."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from features.spec import DEFAULT_FEATURE_SPEC
from features.state import ShopperState, StateConfig
from models.artifacts import WEIGHTS_FILE
from models.classifiers import ClassifierConfig, MultiTaskMLP, ShopperClassifier
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from models.nextitem import NextItemConfig, NextItemRecommender, SASRec
from models.registry import CHALLENGER_FILE, SHADOW, SPLIT, Challenger, ModelRegistry, RegistryError
from models.scoring import CHURN, PURCHASE, BatchScorer
from models.sequences import ItemVocab
from models.train_cli import models_main
from models.variants import in_share
from streams.sim.generator import GeneratorConfig, ShopSimulator

torch.set_num_threads(1)


def save_classifier(registry: ModelRegistry, version: str, seed: int) -> None:
    torch.manual_seed(seed)
    mlp = MultiTaskMLP(ClassifierConfig(input_dim=DEFAULT_FEATURE_SPEC.dim))
    ShopperClassifier(mlp, DEFAULT_FEATURE_SPEC.hash).save(registry.version_dir(CLASSIFIER_MODEL, version), version)


def save_recommender(registry: ModelRegistry, version: str, seed: int, items: list[str]) -> None:
    torch.manual_seed(seed)
    model = SASRec(NextItemConfig(num_items=len(items), max_len=10, dim=8, layers=1, heads=2))
    NextItemRecommender(model, ItemVocab(items)).save(registry.version_dir(NEXTITEM_MODEL, version), version)


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    reg = ModelRegistry(tmp_path / "registry")
    for version, seed in (("v1", 1), ("v2", 2), ("v3", 3)):
        save_classifier(reg, version, seed)
    reg.promote(CLASSIFIER_MODEL, "v1")
    return reg


@pytest.fixture(scope="module")
def shoppers() -> tuple[list[ShopperState], np.ndarray, list[str]]:
    """Simulated shoppers with histories, their feature rows and the items they saw."""
    states: dict[str, ShopperState] = {}
    for event in ShopSimulator(GeneratorConfig(seed=11, n_shoppers=40, n_items=60)).events(limit=600):
        states.setdefault(event.user_id, ShopperState.new(event.user_id)).update(event, StateConfig())
    rows = list(states.values())
    features = DEFAULT_FEATURE_SPEC.matrix(rows, np.array([s.last_event_ms for s in rows], dtype=np.int64))
    items = sorted({item for state in rows for item, _, _ in state.recent_items()})
    return rows, features, items


# ------------------------------------------------------------------------------ registry
def test_set_challenger_writes_a_verified_pointer_and_reads_it_back(registry):
    split = registry.set_challenger(CLASSIFIER_MODEL, "v2", SPLIT, 0.25, salt="exp-1")
    assert split == Challenger(CLASSIFIER_MODEL, "v2", SPLIT, 0.25, "exp-1")
    assert registry.challenger(CLASSIFIER_MODEL) == split
    pointer = json.loads((registry.model_dir(CLASSIFIER_MODEL) / CHALLENGER_FILE).read_text())
    assert {k: pointer[k] for k in ("version", "mode", "share", "salt")} == {
        "version": "v2",
        "mode": SPLIT,
        "share": 0.25,
        "salt": "exp-1",
    }
    assert "promoted_at" in pointer
    assert registry.current(CLASSIFIER_MODEL) == "v1"  # the champion is untouched
    shadow = registry.set_challenger(CLASSIFIER_MODEL, "v3", SHADOW)
    assert shadow.version == "v3" and shadow.mode == SHADOW and shadow.share == 1.0
    another = registry.set_challenger(CLASSIFIER_MODEL, "v3", SHADOW)
    assert len({shadow.salt, another.salt, "exp-1"}) == 3  # each experiment reshuffles the shoppers
    assert registry.versions(CLASSIFIER_MODEL) == ["v1", "v2", "v3"]  # the pointer file is no version
    assert not [p for p in registry.model_dir(CLASSIFIER_MODEL).iterdir() if p.name.startswith(".challenger")]
    info = registry.list_models()[0]
    assert info.current == "v1" and info.challenger == another


def test_set_challenger_refuses_what_cannot_be_tried(registry):
    with pytest.raises(RegistryError, match="mode"):
        registry.set_challenger(CLASSIFIER_MODEL, "v2", "canary", 0.5)
    for share in (0.0, -0.1, 1.5):
        with pytest.raises(RegistryError, match="share"):
            registry.set_challenger(CLASSIFIER_MODEL, "v2", SPLIT, share)
    with pytest.raises(RegistryError, match="no version 'v9'"):
        registry.set_challenger(CLASSIFIER_MODEL, "v9", SHADOW)
    with pytest.raises(RegistryError, match="champion already"):
        registry.set_challenger(CLASSIFIER_MODEL, "v1", SHADOW)
    (registry.version_dir(CLASSIFIER_MODEL, "v3") / WEIGHTS_FILE).write_bytes(b"broken")
    with pytest.raises(RegistryError, match="refusing"):
        registry.set_challenger(CLASSIFIER_MODEL, "v3", SHADOW)
    save_classifier(registry, "x1", 4)
    registry.register(NEXTITEM_MODEL, registry.version_dir(CLASSIFIER_MODEL, "x1"))
    with pytest.raises(RegistryError, match="no champion to challenge"):
        registry.set_challenger(NEXTITEM_MODEL, "x1", SHADOW)
    with pytest.raises(RegistryError, match="pointer file"):
        registry.version_dir(CLASSIFIER_MODEL, CHALLENGER_FILE)
    assert registry.challenger(CLASSIFIER_MODEL) is None and registry.challenger(NEXTITEM_MODEL) is None


def test_clear_and_malformed_challenger_pointers(registry):
    registry.set_challenger(CLASSIFIER_MODEL, "v2", SHADOW)
    assert registry.clear_challenger(CLASSIFIER_MODEL).version == "v2"
    assert registry.challenger(CLASSIFIER_MODEL) is None
    assert registry.clear_challenger(CLASSIFIER_MODEL) is None
    pointer = registry.model_dir(CLASSIFIER_MODEL) / CHALLENGER_FILE
    pointer.write_text(json.dumps({"version": "v2", "mode": SPLIT, "share": 3, "salt": "s"}))
    with pytest.raises(RegistryError, match="clear-challenger"):
        registry.challenger(CLASSIFIER_MODEL)
    assert registry.clear_challenger(CLASSIFIER_MODEL) is None and not pointer.exists()


def test_promote_challenger_makes_it_champion_and_keeps_the_old_one_for_rollback(registry):
    with pytest.raises(RegistryError, match="no challenger to promote"):
        registry.promote_challenger(CLASSIFIER_MODEL)
    registry.set_challenger(CLASSIFIER_MODEL, "v2", SPLIT, 0.5)
    info = registry.promote_challenger(CLASSIFIER_MODEL)
    assert info.current == "v2" and info.previous == ["v1"] and info.challenger is None
    assert not (registry.model_dir(CLASSIFIER_MODEL) / CHALLENGER_FILE).exists()
    assert registry.rollback(CLASSIFIER_MODEL).current == "v1"


def test_a_challenger_pointer_naming_the_champion_is_stale(registry):
    """What a crash between promote_challenger's two writes, or a plain promote, leaves behind."""
    registry.set_challenger(CLASSIFIER_MODEL, "v2", SHADOW)
    registry.promote(CLASSIFIER_MODEL, "v2")
    assert (registry.model_dir(CLASSIFIER_MODEL) / CHALLENGER_FILE).exists()
    assert registry.challenger(CLASSIFIER_MODEL) is None


def test_a_split_serves_the_salted_share_and_a_shadow_serves_nobody():
    users = [f"u{i}" for i in range(4000)]
    split = Challenger(CLASSIFIER_MODEL, "v2", SPLIT, 0.3, "salt-a")
    served = [u for u in users if split.serves(u)]
    assert served == [u for u in users if in_share(u, "salt-a", 0.3)]
    assert abs(len(served) / len(users) - 0.3) < 0.03
    assert not any(Challenger(CLASSIFIER_MODEL, "v2", SHADOW, 1.0, "salt-a").serves(u) for u in users)


def test_cli_promotes_lists_and_clears_a_challenger(registry, capsys):
    root = str(registry.root)
    argv = ["--registry", root, "promote", CLASSIFIER_MODEL, "v2", "--as", "challenger"]
    assert models_main([*argv, "--mode", "split", "--share", "0.25", "--salt", "abc"]) == 0
    assert registry.challenger(CLASSIFIER_MODEL) == Challenger(CLASSIFIER_MODEL, "v2", SPLIT, 0.25, "abc")
    assert "25% of shoppers" in capsys.readouterr().out
    assert models_main(["--registry", root, "list"]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith(CLASSIFIER_MODEL)}
    assert "champion" in rows["v1"] and "challenger (split 25%)" in rows["v2"] and "champion" not in rows["v3"]
    for bad in (
        [*argv, "--mode", "split"],  # a split needs its share
        [*argv, "--mode", "shadow", "--share", "0.5"],
        [*argv, "--mode", "split", "--share", "2"],
        ["--registry", root, "promote", CLASSIFIER_MODEL, "v3", "--share", "0.5"],
        ["--registry", root, "promote", CLASSIFIER_MODEL, "v3", "--mode", "split"],  # a champion has no mode
    ):
        with pytest.raises(SystemExit) as exc:
            models_main(bad)
        assert exc.value.code == 2, bad
    assert models_main([*argv[:-3], "v1", "--as", "challenger"]) == 1  # the champion cannot challenge itself
    assert models_main(["--registry", root, "promote", CLASSIFIER_MODEL, "v3", "--as", "challenger"]) == 0
    shadow = registry.challenger(CLASSIFIER_MODEL)
    assert shadow is not None and (shadow.version, shadow.mode, shadow.share) == ("v3", SHADOW, 1.0)
    assert models_main(["--registry", root, "clear-challenger", CLASSIFIER_MODEL]) == 0
    assert "challenger v3 cleared" in capsys.readouterr().out
    assert registry.challenger(CLASSIFIER_MODEL) is None and registry.current(CLASSIFIER_MODEL) == "v1"


# ------------------------------------------------------------------------------ scorer
def test_scorer_serves_champion_and_challenger_side_by_side(registry, shoppers):
    states, features, items = shoppers
    for version, seed in (("r1", 5), ("r2", 6)):
        save_recommender(registry, version, seed, items)
    registry.promote(NEXTITEM_MODEL, "r1")
    registry.set_challenger(CLASSIFIER_MODEL, "v2", SPLIT, 0.5, salt="s")
    scorer = BatchScorer(DEFAULT_FEATURE_SPEC, registry.root, device="cpu")
    assert scorer.champion_versions == {CLASSIFIER_MODEL: "v1", NEXTITEM_MODEL: "r1"}
    assert scorer.challengers == {CLASSIFIER_MODEL: Challenger(CLASSIFIER_MODEL, "v2", SPLIT, 0.5, "s")}

    champion = scorer.score(states, features)
    challenger = scorer.score_challenger(CLASSIFIER_MODEL, states, features)
    assert len(challenger) == len(states)
    assert all(set(row.scores) == {CHURN, PURCHASE} and row.recommendations == [] for row in challenger)
    expected = ShopperClassifier.load(
        registry.version_dir(CLASSIFIER_MODEL, "v2"), DEFAULT_FEATURE_SPEC.hash
    ).predict_proba(features)
    np.testing.assert_allclose([row.scores[CHURN] for row in challenger], expected["churn"], rtol=1e-6)
    np.testing.assert_allclose([row.scores[PURCHASE] for row in challenger], expected["purchase"], rtol=1e-6)
    assert any(abs(a.scores[CHURN] - b.scores[CHURN]) > 1e-4 for a, b in zip(champion, challenger, strict=True))
    assert scorer.timings.challenger_classifier_s > 0
    with pytest.raises(LookupError, match="no challenger loaded for 'nextitem'"):
        scorer.score_challenger(NEXTITEM_MODEL, states, features)

    registry.set_challenger(NEXTITEM_MODEL, "r2", SHADOW)
    assert scorer.refresh(force=True) is True  # hot reload picks up a new challenger
    recommended = scorer.score_challenger(NEXTITEM_MODEL, states, features)
    rec = NextItemRecommender.load(registry.version_dir(NEXTITEM_MODEL, "r2"))
    assert [row.recommendations for row in recommended] == rec.recommend(
        [s.history_item_ids() for s in states], k=scorer.top_k
    )
    assert all(row.scores == {} for row in recommended)
    assert [row.recommendations for row in recommended] != [row.recommendations for row in champion]
    assert scorer.champion_versions == {CLASSIFIER_MODEL: "v1", NEXTITEM_MODEL: "r1"}  # the champion stays


def test_challenger_hot_reload_keeps_the_last_good_one_and_unloads_a_cleared_one(registry, shoppers):
    states, features, _ = shoppers
    scorer = BatchScorer(DEFAULT_FEATURE_SPEC, registry.root, device="cpu")
    assert scorer.challengers == {} and scorer.refresh(force=True) is False
    registry.set_challenger(CLASSIFIER_MODEL, "v2", SHADOW, salt="a")
    assert scorer.refresh(force=True) is True
    before = scorer.score_challenger(CLASSIFIER_MODEL, states, features)

    # same artifact, new split: the record changes, the model is not reloaded
    registry.set_challenger(CLASSIFIER_MODEL, "v2", SPLIT, 0.1, salt="b")
    assert scorer.refresh(force=True) is True
    assert scorer.challengers[CLASSIFIER_MODEL] == Challenger(CLASSIFIER_MODEL, "v2", SPLIT, 0.1, "b")
    assert scorer.load_errors == 0

    # a challenger whose artifact broke after it was verified: refused once, the last good one serves
    registry.set_challenger(CLASSIFIER_MODEL, "v3", SHADOW, salt="c")
    (registry.version_dir(CLASSIFIER_MODEL, "v3") / WEIGHTS_FILE).write_bytes(b"broken")
    assert scorer.refresh(force=True) is False
    assert scorer.refresh(force=True) is False
    assert scorer.load_errors == 1
    assert scorer.challengers[CLASSIFIER_MODEL].version == "v2"
    after = scorer.score_challenger(CLASSIFIER_MODEL, states, features)
    assert [row.scores for row in after] == [row.scores for row in before]

    # an unreadable pointer: logged once, the loaded challenger stays
    (registry.model_dir(CLASSIFIER_MODEL) / CHALLENGER_FILE).write_text("{not json")
    assert scorer.refresh(force=True) is False and scorer.refresh(force=True) is False
    assert scorer.load_errors == 2 and scorer.challengers[CLASSIFIER_MODEL].version == "v2"

    registry.clear_challenger(CLASSIFIER_MODEL)
    assert scorer.refresh(force=True) is True
    assert scorer.challengers == {} and scorer.champion_versions == {CLASSIFIER_MODEL: "v1"}
    with pytest.raises(LookupError):
        scorer.score_challenger(CLASSIFIER_MODEL, states, features)
