"""``shoppulse models migrate``: registries written by the torch.save code convert in place to
safetensors, keep their versions and current pointers, and serve exactly the same scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from features.spec import DEFAULT_FEATURE_SPEC
from models.artifacts import WEIGHTS_FILE, ArtifactError, load_artifact, sha256_file
from models.classifiers import ClassifierConfig, MultiTaskMLP, ShopperClassifier
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from models.nextitem import NextItemRecommender
from models.registry import ModelRegistry, RegistryError
from models.scoring import BatchScorer
from models.train_cli import models_main
from models.training import models_ready

from .test_artifacts import VOCAB, Evil, make_rec

torch.set_num_threads(1)
LEGACY_WEIGHTS = "weights.pt"


def to_legacy(path: Path) -> Path:
    """Rewrite a saved artifact into the layout the torch.save code wrote (format version 1):
    ``weights.pt`` from ``torch.save(state_dict)`` and metadata naming it, without a format field."""
    meta = json.loads((path / "metadata.json").read_text())
    state = load_artifact(path).state_dict
    (path / WEIGHTS_FILE).unlink()
    torch.save(state, path / LEGACY_WEIGHTS)
    meta["format_version"] = 1
    meta["weights"] = {
        "file": LEGACY_WEIGHTS,
        "sha256": sha256_file(path / LEGACY_WEIGHTS),
        "bytes": (path / LEGACY_WEIGHTS).stat().st_size,
        "tensors": len(state),
    }
    (path / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def make_classifier(seed: int) -> ShopperClassifier:
    torch.manual_seed(seed)
    model = MultiTaskMLP(ClassifierConfig(input_dim=DEFAULT_FEATURE_SPEC.dim, hidden=(8,)))
    model.feat_std.uniform_(0.5, 2.0)
    model.calib_a.fill_(0.7)
    model.calib_b.fill_(-0.2)
    return ShopperClassifier(model, DEFAULT_FEATURE_SPEC.hash)


def loaded_classifier(scorer: BatchScorer) -> ShopperClassifier:
    """The scorer's classifier, which the caller expects loaded (typed afresh after earlier narrowing)."""
    assert scorer.classifier is not None
    return scorer.classifier


def write_pointer(reg: ModelRegistry, model: str, version: str, previous: list[str]) -> None:
    """A ``current`` pointer as the registry writes it (promotion now refuses legacy versions)."""
    pointer = {"version": version, "promoted_at": "2026-11-01T00:00:00+00:00", "previous": previous}
    (reg.model_dir(model) / "current").write_text(json.dumps(pointer, indent=2) + "\n")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes but the registry's (empty) lock files."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"
    }


@pytest.fixture
def legacy_registry(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    models = {}
    for seed, version in enumerate(("20261101T000000Z", "20261102T000000Z")):
        classifier, rec = make_classifier(seed), make_rec(seed)
        to_legacy(classifier.save(reg.version_dir(CLASSIFIER_MODEL, version), version, metrics={"auc": 0.7}))
        to_legacy(rec.save(reg.version_dir(NEXTITEM_MODEL, version), version))
        models[version] = (classifier, rec)
    for model in (CLASSIFIER_MODEL, NEXTITEM_MODEL):
        write_pointer(reg, model, "20261102T000000Z", ["20261101T000000Z"])
    return reg, models


def test_migrate_converts_in_place_keeping_versions_pointers_and_scores(legacy_registry, capsys):
    reg, models = legacy_registry
    root = str(reg.root)
    for model in (CLASSIFIER_MODEL, NEXTITEM_MODEL):
        with pytest.raises(ArtifactError, match="shoppulse models migrate"):
            load_artifact(reg.current_dir(model))
    assert not models_ready(reg.root)
    assert models_main(["--registry", root, "list"]) == 0
    assert capsys.readouterr().out.count("run `shoppulse models migrate`") == 4

    before = snapshot(reg.root)
    assert models_main(["--registry", root, "migrate", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count(": would convert: ") == 4 and "dry run: nothing written" in out
    assert snapshot(reg.root) == before

    old_meta = {(m, v): reg.describe(m, v) for m in (CLASSIFIER_MODEL, NEXTITEM_MODEL) for v in models}
    assert models_main(["--registry", root, "migrate"]) == 0
    out = capsys.readouterr().out
    assert out.count(": converted: weights.pt -> weights.safetensors") == 4
    assert "current pointers unchanged" in out
    after = snapshot(reg.root)
    for model in (CLASSIFIER_MODEL, NEXTITEM_MODEL):
        assert after[f"{model}/current"] == before[f"{model}/current"]
        assert reg.versions(model) == sorted(models)
    assert not [name for name in after if name.endswith(LEGACY_WEIGHTS) or "/." in name]
    for (model, version), meta in old_meta.items():
        new = reg.describe(model, version)
        assert new["format_version"] == 2 and new["migrated"]["from_weights"] == meta["weights"]
        assert {k: v for k, v in new.items() if k not in ("format_version", "weights", "migrated")} == {
            k: v for k, v in meta.items() if k not in ("format_version", "weights")
        }

    x = np.random.default_rng(0).normal(size=(16, DEFAULT_FEATURE_SPEC.dim)).astype(np.float32)
    histories = [["sku1", "sku2"], [], ["sku7", "sku3"]]
    for version, (classifier, rec) in models.items():
        loaded = ShopperClassifier.load(reg.version_dir(CLASSIFIER_MODEL, version), DEFAULT_FEATURE_SPEC.hash)
        for task, p in loaded.predict_proba(x).items():
            assert np.array_equal(p, classifier.predict_proba(x)[task])
        recommender = NextItemRecommender.load(
            reg.version_dir(NEXTITEM_MODEL, version), expected_vocab_sha256=VOCAB.sha256()
        )
        assert recommender.recommend(histories, k=4) == rec.recommend(histories, k=4)
    assert models_ready(reg.root)
    assert reg.rollback(CLASSIFIER_MODEL).current == "20261101T000000Z"  # verified and allowed now

    assert models_main(["--registry", root, "migrate"]) == 0
    assert capsys.readouterr().out.count("already safetensors: nothing to do") == 4


def test_promotion_refuses_a_legacy_version(legacy_registry):
    reg, _ = legacy_registry
    with pytest.raises(RegistryError, match="models migrate"):
        reg.promote(CLASSIFIER_MODEL, "20261101T000000Z")
    assert reg.current(CLASSIFIER_MODEL) == "20261102T000000Z"


def test_tampered_or_malicious_legacy_weights_are_not_converted(legacy_registry, tmp_path, capsys):
    reg, _ = legacy_registry
    tampered = reg.version_dir(CLASSIFIER_MODEL, "20261101T000000Z") / LEGACY_WEIGHTS
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    malicious = reg.version_dir(NEXTITEM_MODEL, "20261101T000000Z")
    marker = tmp_path / "pwned"
    torch.save({"w": Evil(marker)}, malicious / LEGACY_WEIGHTS)  # with a checksum that matches it
    meta = json.loads((malicious / "metadata.json").read_text())
    meta["weights"].update(
        sha256=sha256_file(malicious / LEGACY_WEIGHTS), bytes=(malicious / LEGACY_WEIGHTS).stat().st_size
    )
    (malicious / "metadata.json").write_text(json.dumps(meta))
    untouched = {p: p.read_bytes() for d in (tampered.parent, malicious) for p in d.iterdir()}

    assert models_main(["--registry", str(reg.root), "migrate"]) == 1
    out = capsys.readouterr().out
    assert f"{CLASSIFIER_MODEL}/20261101T000000Z: failed: " in out and "sha256 of weights.pt" in out
    assert f"{NEXTITEM_MODEL}/20261101T000000Z: failed: " in out and "could not be read" in out
    assert out.count(": converted: ") == 2, "the healthy versions are converted all the same"
    assert not marker.exists(), "the pickle's code never ran"
    assert {p: p.read_bytes() for d in (tampered.parent, malicious) for p in d.iterdir()} == untouched


def test_a_crash_on_either_side_of_the_commit_point_is_finished_by_a_rerun(legacy_registry, capsys):
    reg, models = legacy_registry
    root = str(reg.root)
    before_commit = reg.version_dir(CLASSIFIER_MODEL, "20261101T000000Z")
    (before_commit / WEIGHTS_FILE).write_bytes(b"half-written")  # crash while writing the new weights
    with pytest.raises(ArtifactError, match="shoppulse models migrate"):
        load_artifact(before_commit)  # still a complete version-1 artifact
    assert models_main(["--registry", root, "migrate"]) == 0
    capsys.readouterr()
    after_commit = reg.version_dir(NEXTITEM_MODEL, "20261102T000000Z")
    (after_commit / LEGACY_WEIGHTS).write_bytes(b"left behind by a crash before the old file was removed")
    assert models_main(["--registry", root, "migrate", "--dry-run"]) == 0
    assert "would remove the leftover weights.pt" in capsys.readouterr().out
    assert models_main(["--registry", root, "migrate"]) == 0
    assert "removed the leftover weights.pt" in capsys.readouterr().out
    assert not (after_commit / LEGACY_WEIGHTS).exists()
    classifier = ShopperClassifier.load(before_commit, DEFAULT_FEATURE_SPEC.hash)
    x = np.ones((2, DEFAULT_FEATURE_SPEC.dim), dtype=np.float32)
    assert np.array_equal(classifier.predict_proba(x)["churn"], models["20261101T000000Z"][0].predict_proba(x)["churn"])


def test_a_running_scorer_picks_up_the_migrated_current_versions(legacy_registry):
    reg, models = legacy_registry
    scorer = BatchScorer(DEFAULT_FEATURE_SPEC, reg.root, device="cpu", reload_interval_s=0.0)
    assert scorer.classifier is None and scorer.load_errors == 2, "legacy artifacts are refused, the heuristic serves"
    scorer.refresh()
    assert scorer.load_errors == 2, "an unchanged version is not tried again"
    assert models_main(["--registry", str(reg.root), "migrate"]) == 0
    assert scorer.refresh()
    assert scorer.served == {CLASSIFIER_MODEL: "20261102T000000Z", NEXTITEM_MODEL: "20261102T000000Z"}
    x = np.zeros((3, DEFAULT_FEATURE_SPEC.dim), dtype=np.float32)
    assert np.array_equal(
        loaded_classifier(scorer).predict_proba(x)["churn"], models["20261102T000000Z"][0].predict_proba(x)["churn"]
    )
