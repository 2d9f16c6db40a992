"""Churn / purchase MLP: learns, calibrates, metrics by hand, artifact with feature-spec hash."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.artifacts import ArtifactError
from models.binary_metrics import expected_calibration_error, roc_auc
from models.classifiers import (
    ClassifierConfig,
    ClassifierTrainConfig,
    ShopperClassifier,
    fit_platt,
    fit_temperature,
    train_classifier,
)
from models.drift import FeatureDistribution

torch.set_num_threads(1)


def synthetic(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 6)) * [1, 2, 0.5, 1, 3, 1] + [0, 5, -1, 0, 10, 0]).astype(np.float32)
    z = (x - [0, 5, -1, 0, 10, 0]) / [1, 2, 0.5, 1, 3, 1]
    churn = 2.0 * z[:, 0] - 1.5 * z[:, 1]
    purchase = 2.0 * z[:, 2] + 1.5 * z[:, 3] * z[:, 0]
    y = (rng.random((n, 2)) < 1 / (1 + np.exp(-np.stack([churn, purchase], 1)))).astype(np.float32)
    y[rng.random(n) < 0.2, 1] = np.nan  # some rows have no purchase label
    return x, y


def test_learns_both_tasks_and_is_calibrated():
    xt, yt = synthetic(3000, 0)
    xv, yv = synthetic(1500, 1)
    tc = ClassifierTrainConfig(epochs=25, batch_size=128, lr=3e-3, patience=5, device="cpu", progress=False)
    model, rep = train_classifier(xt, yt, xv, yv, ClassifierConfig(input_dim=6, hidden=(32, 16)), tc)
    clf = ShopperClassifier(model, feature_spec_hash="spec1")
    xs, ys = synthetic(2000, 2)
    p = clf.predict_proba(xs)
    assert set(p) == {"churn", "purchase"} and p["churn"].dtype == np.float32
    assert roc_auc(p["churn"], ys[:, 0]) > 0.85
    assert roc_auc(p["purchase"], ys[:, 1]) > 0.75
    assert expected_calibration_error(p["churn"], ys[:, 0]) < 0.06
    assert rep.valid_metrics["purchase"]["rows"] < 1500  # NaN labels were masked
    assert rep.best_epoch >= 1


def test_metrics_by_hand():
    assert expected_calibration_error([0.1, 0.9], [0, 1], n_bins=10) == pytest.approx(0.1)
    assert expected_calibration_error([0.5, 0.5], [0, 1], n_bins=10) == pytest.approx(0.0)
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_temperature_and_platt_recover_known_parameters():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, generator=g) * 3
    y = (torch.rand(20000, generator=g) < torch.sigmoid(z / 2.0)).double()
    assert fit_temperature(z, y) == pytest.approx(2.0, rel=0.1)
    y2 = (torch.rand(20000, generator=g) < torch.sigmoid(0.5 * z + 1.0)).double()
    a, b = fit_platt(z, y2)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(1.0, abs=0.1)


def test_artifact_round_trip_and_feature_spec_mismatch(tmp_path):
    xt, yt = synthetic(400, 0)
    tc = ClassifierTrainConfig(epochs=2, device="cpu", progress=False)
    model, _ = train_classifier(xt, yt, xt[:100], yt[:100], ClassifierConfig(input_dim=6), tc)
    clf = ShopperClassifier(model, feature_spec_hash="abc123")
    path = clf.save(tmp_path / "v1", "v1", metrics={"auc": 0.9})
    back = ShopperClassifier.load(path, expected_feature_spec_hash="abc123")
    np.testing.assert_array_equal(back.predict_proba(xt)["churn"], clf.predict_proba(xt)["churn"])
    with pytest.raises(ArtifactError, match="feature spec"):
        ShopperClassifier.load(path, expected_feature_spec_hash="other")
    with pytest.raises(ValueError, match="feature matrix"):
        back.predict_proba(np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        train_classifier(np.full((4, 6), np.nan), yt[:4], xt[:2], yt[:2], tcfg=tc)


def test_artifact_keeps_the_training_distribution_and_old_artifacts_load_without_it(tmp_path, caplog):
    xt, yt = synthetic(400, 0)
    tc = ClassifierTrainConfig(epochs=1, device="cpu", progress=False)
    model, _ = train_classifier(xt, yt, xt[:100], yt[:100], ClassifierConfig(input_dim=6), tc)
    names = tuple(f"f{j}" for j in range(6))
    dist = FeatureDistribution.fit(xt, names)
    path = ShopperClassifier(model, "abc123", training_distribution=dist).save(tmp_path / "v1", "v1")
    back = ShopperClassifier.load(path, expected_feature_spec_hash="abc123").training_distribution
    assert back is not None and back.names == names
    np.testing.assert_array_equal(back.bin_counts(xt), dist.bin_counts(xt))

    old = ShopperClassifier(model, "abc123").save(tmp_path / "v0", "v0")  # as written before drift existed
    with caplog.at_level("INFO", logger="models.classifiers"):
        loaded = ShopperClassifier.load(old, expected_feature_spec_hash="abc123")
    assert loaded.training_distribution is None
    assert "v0 stores no training distribution" in caplog.text
    np.testing.assert_array_equal(loaded.predict_proba(xt)["churn"], model.predict_proba(torch.as_tensor(xt))[:, 0])
