"""FeatureSpec: stable hash, vectorised matrix equal to per-state rows, documented normalisation."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import numpy as np
import pytest

from features.events import KIND_CART_ADD, KIND_ORDER, KIND_VIEW, Event, OrderLine
from features.spec import DEFAULT_FEATURE_SPEC, Feature, FeatureSpec
from features.state import DAY_MS, HOUR_MS, MINUTE_MS, RAW_FEATURE_NAMES, ShopperState, StateConfig

T = 1_704_067_200_000
DOCS = Path(__file__).resolve().parents[3] / "docs" / "features.md"

#: The default spec's hash when version 1 was written. Models record it; if this test fails,
#: the vector changed: bump DEFAULT_FEATURE_SPEC.version (and retrain) rather than edit this.
DEFAULT_HASH_V1 = "3889754ae974e526"


def random_states(n: int, seed: int = 0) -> list[ShopperState]:
    rng = random.Random(seed)
    config = StateConfig()
    states = [ShopperState.new("never-seen")]
    for u in range(n):
        state = ShopperState.new(f"u{u}")
        ts = T + rng.randint(0, 20 * DAY_MS)
        for i in range(rng.randint(1, 80)):
            ts += rng.choice((rng.randint(1, 3 * MINUTE_MS), rng.randint(1, 2 * DAY_MS)))
            kind = rng.choice((KIND_VIEW, KIND_VIEW, KIND_CART_ADD, KIND_ORDER))
            if kind == KIND_ORDER:
                state.update(
                    Event(
                        kind,
                        f"{u}-{i}",
                        f"u{u}",
                        ts,
                        order_id=f"o{i}",
                        order_lines=(OrderLine("x", 1, 20.0),),
                        total=rng.uniform(1, 5000),
                    ),
                    config,
                )
            else:
                state.update(
                    Event(
                        kind,
                        f"{u}-{i}",
                        f"u{u}",
                        ts,
                        item_id=f"i{rng.randint(0, 30)}",
                        category=rng.choice("abcdefg"),
                        price=rng.uniform(1, 100),
                        quantity=1,
                    ),
                    config,
                )
        states.append(state)
    return states


def test_default_spec_hash_is_pinned():
    assert DEFAULT_FEATURE_SPEC.hash == DEFAULT_HASH_V1
    rebuilt = FeatureSpec(DEFAULT_FEATURE_SPEC.version, tuple(DEFAULT_FEATURE_SPEC.features))
    assert rebuilt.hash == DEFAULT_FEATURE_SPEC.hash and rebuilt == DEFAULT_FEATURE_SPEC


def test_hash_changes_with_version_order_and_normalisation():
    spec = DEFAULT_FEATURE_SPEC
    features = list(spec.features)
    variants = [
        FeatureSpec(spec.version + 1, spec.features),
        FeatureSpec(spec.version, tuple(reversed(features))),
        FeatureSpec(spec.version, tuple(features[:-1])),
        FeatureSpec(spec.version, (dataclasses.replace(features[0], transform="linear"), *features[1:])),
        FeatureSpec(spec.version, (dataclasses.replace(features[16], high=721.0), *features[:16], *features[17:])),
        FeatureSpec(
            spec.version, (dataclasses.replace(features[20], divisor=3_600_000.0), *features[:20], *features[21:])
        ),
    ]
    hashes = {spec.hash, *(variant.hash for variant in variants)}
    assert len(hashes) == len(variants) + 1
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in hashes)
    described = FeatureSpec(spec.version, (dataclasses.replace(features[0], description="reworded"), *features[1:]))
    assert described.hash == spec.hash  # wording is not part of the vector


def test_matrix_equals_stacked_rows():
    states = random_states(40)
    now = T + 40 * DAY_MS
    matrix = DEFAULT_FEATURE_SPEC.matrix(states, now)
    assert matrix.dtype == np.float32 and matrix.shape == (len(states), DEFAULT_FEATURE_SPEC.dim)
    rows = np.stack([DEFAULT_FEATURE_SPEC.row(state, now) for state in states])
    np.testing.assert_array_equal(matrix, rows)
    assert np.isfinite(matrix).all()


def test_matrix_takes_one_now_per_state():
    states = random_states(20, seed=1)
    nows = np.array([state.last_event_ms for state in states], dtype=np.int64)
    matrix = DEFAULT_FEATURE_SPEC.matrix(states, nows)
    rows = np.stack([DEFAULT_FEATURE_SPEC.row(state, int(now)) for state, now in zip(states, nows, strict=True)])
    np.testing.assert_array_equal(matrix, rows)
    with pytest.raises(ValueError, match="now_ms has"):
        DEFAULT_FEATURE_SPEC.matrix(states, nows[:-1])
    assert DEFAULT_FEATURE_SPEC.matrix([], T).shape == (0, DEFAULT_FEATURE_SPEC.dim)


def test_normalisation_of_a_known_state():
    config = StateConfig()
    state = ShopperState.new("u1")
    state.update(Event(KIND_VIEW, "v1", "u1", T, item_id="a", category="toys", price=10.0, quantity=1), config)
    state.update(
        Event(KIND_CART_ADD, "c1", "u1", T + MINUTE_MS, item_id="a", category="toys", price=10.0, quantity=3), config
    )
    spec = DEFAULT_FEATURE_SPEC
    row = spec.row(state, T + 2 * HOUR_MS)
    value = dict(zip(spec.names, row.tolist(), strict=True))
    assert value["views_1h"] == 0.0 and value["views_24h"] == pytest.approx(math.log1p(1))
    assert value["cart_items_now"] == pytest.approx(math.log1p(3))
    assert value["cart_value_now"] == pytest.approx(math.log1p(30.0))
    assert value["ms_since_last_view"] == pytest.approx(math.log1p(2.0), rel=1e-6)
    assert value["ms_since_last_order"] == pytest.approx(math.log1p(720))  # never ordered: the cap
    assert value["session_length_ms"] == pytest.approx(math.log1p(1.0))  # one minute
    assert value["view_to_cart_30d"] == 1.0 and value["cart_to_order_30d"] == 0.0
    assert value["active_days_30d"] == pytest.approx(1 / 30)
    assert value["category_top_share"] == 1.0
    assert value["trend_7d"] == 1.0
    before = spec.row(state, T - HOUR_MS)  # a time before the events: nothing counted, no negative ages
    assert dict(zip(spec.names, before.tolist(), strict=True))["views_24h"] == 0.0 and (before[16:20] >= 0).all()


def test_every_feature_is_documented_and_known():
    spec = DEFAULT_FEATURE_SPEC
    assert spec.dim == len(spec.names) == len(set(spec.names)) == 38
    assert set(spec.names) <= set(RAW_FEATURE_NAMES)
    assert all(feature.description and feature.unit for feature in spec.features)
    assert spec.index("cart_value_now") == spec.names.index("cart_value_now")
    with pytest.raises(KeyError):
        spec.index("nope")


def test_docs_table_matches_the_spec():
    assert DEFAULT_FEATURE_SPEC.markdown_table() in DOCS.read_text(), (
        "docs/features.md is out of date: paste DEFAULT_FEATURE_SPEC.markdown_table() into it"
    )


@pytest.mark.parametrize(
    "features, message",
    [
        ((), "at least one"),
        ((Feature("nope", "count", "log1p", 1.0, 0.0, math.inf, "x"),), "not a raw feature"),
        ((Feature("views_1h", "count", "sqrt", 1.0, 0.0, math.inf, "x"),), "transform"),
        ((Feature("views_1h", "count", "log1p", 0.0, 0.0, math.inf, "x"),), "divisor"),
        ((Feature("views_1h", "count", "log1p", 1.0, 0.0, 1.0, "x"),) * 2, "repeat"),
    ],
)
def test_invalid_specs_are_refused(features, message):
    with pytest.raises(ValueError, match=message):
        FeatureSpec(1, features)
