"""models.drift: quantile bins from training rows, PSI, and the sliding window."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.drift import PSI_EPSILON, FeatureDistribution, PsiWindow, population_stability_index

NAMES = ("views_24h", "cart_items_now", "active_days_30d")


def _rows(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Three features shaped like the real ones: a log-count, a count that is mostly 0, a ratio."""
    return np.column_stack(
        [
            np.log1p(rng.poisson(4.0, n)) + shift,
            np.log1p(rng.poisson(0.3, n)),
            rng.integers(0, 31, n) / 30.0,
        ]
    ).astype(np.float32)


def test_fit_merges_duplicate_edges_and_shares_sum_to_one():
    rng = np.random.default_rng(0)
    x = _rows(rng, 20_000)
    dist = FeatureDistribution.fit(x, NAMES)
    mostly_zero = dist.edges[1]
    assert np.all(np.diff(mostly_zero) > 0)
    assert len(mostly_zero) < 9  # poisson(0.3): ~74 % zeros, so most deciles coincide
    assert mostly_zero[0] == 0.0
    assert dist.shares[1, 0] == pytest.approx(np.mean(x[:, 1] == 0))  # the first bin holds exactly the zeros
    np.testing.assert_allclose(dist.shares.sum(axis=1), 1.0)
    np.testing.assert_array_equal(dist.bin_counts(x) / len(x), dist.shares)


def test_constant_feature_gets_one_edge():
    x = np.column_stack([np.zeros(100), np.arange(100.0)]).astype(np.float32)
    dist = FeatureDistribution.fit(x, ("always_zero", "ramp"))
    assert list(dist.edges[0]) == [0.0]
    assert list(dist.shares[0, :2]) == [1.0, 0.0]
    assert len(dist.edges[1]) == 9


def test_same_distribution_psi_near_zero_and_shift_flags_only_that_feature():
    rng = np.random.default_rng(1)
    dist = FeatureDistribution.fit(_rows(rng, 50_000), NAMES)
    same = population_stability_index(dist.shares, dist.bin_counts(_rows(rng, 5_000)))
    assert np.all(same < 0.02), same
    shifted = population_stability_index(dist.shares, dist.bin_counts(_rows(rng, 5_000, shift=0.7)))
    assert shifted[0] > 0.2, shifted
    assert np.all(shifted[1:] < 0.02), shifted


def test_psi_formula_with_epsilon_for_empty_bins():
    expected = np.array([[0.5, 0.5, 0.0]])
    counts = np.array([[2, 1, 1]])
    a = np.array([0.5, 0.25, 0.25])
    e = np.array([0.5, 0.5, PSI_EPSILON])
    assert population_stability_index(expected, counts)[0] == pytest.approx(float(((a - e) * np.log(a / e)).sum()))
    assert np.isnan(population_stability_index(expected, np.zeros((1, 3))))[0]


def test_json_round_trip_is_exact_and_malformed_entries_are_refused():
    rng = np.random.default_rng(2)
    dist = FeatureDistribution.fit(_rows(rng, 3_000), NAMES)
    back = FeatureDistribution.from_dict(json.loads(json.dumps(dist.to_dict())))
    assert back.names == dist.names and back.rows == dist.rows
    np.testing.assert_array_equal(back.shares, dist.shares)
    for a, b in zip(back.edges, dist.edges, strict=True):
        np.testing.assert_array_equal(a, b)
    broken = dist.to_dict()
    broken["features"][0]["shares"] = broken["features"][0]["shares"][:-1]
    with pytest.raises(ValueError, match="one share more"):
        FeatureDistribution.from_dict(broken)
    with pytest.raises(ValueError, match="malformed"):
        FeatureDistribution.from_dict({"rows": 1})


def test_window_forgets_old_rows():
    rng = np.random.default_rng(3)
    dist = FeatureDistribution.fit(_rows(rng, 20_000), NAMES)
    window = PsiWindow(dist, window_s=600.0, buckets=12)  # 50 s buckets
    for t in range(0, 600, 10):  # ten minutes of shifted traffic
        window.add(_rows(rng, 100, shift=0.7), now_s=float(t))
    assert window.rows(599.0) == 6_000
    assert window.psi(599.0)[0] > 0.2
    for t in range(600, 1200, 10):  # then ten minutes like training
        window.add(_rows(rng, 100), now_s=float(t))
    assert window.rows(1199.0) == 6_000  # the shifted rows aged out bucket by bucket
    assert np.all(window.psi(1199.0) < 0.02)
    assert window.rows(1199.0 + 600.0) == 0  # nothing new for a whole window: empty
    assert np.all(np.isnan(window.psi(1199.0 + 600.0)))


def test_window_counts_equal_a_recount_of_the_rows_inside_it():
    rng = np.random.default_rng(4)
    dist = FeatureDistribution.fit(_rows(rng, 5_000), NAMES)
    window = PsiWindow(dist, window_s=120.0, buckets=12)  # 10 s buckets
    batches = [(float(t), _rows(rng, int(rng.integers(0, 50)))) for t in np.sort(rng.uniform(0, 400, 80))]
    for t, x in batches:
        window.add(x, t)
    now = batches[-1][0]
    first_bucket = (int(now // 10.0) - 11) * 10.0
    inside = np.concatenate([x for t, x in batches if t >= first_bucket])
    np.testing.assert_array_equal(window.counts(now), dist.bin_counts(inside))
