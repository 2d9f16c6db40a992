"""Shopper groups: stable, independent per salt, and of the asked share."""

from __future__ import annotations

from models.variants import in_share, unit_hash


def test_group_is_a_pure_function_of_id_and_salt() -> None:
    assert unit_hash("u-1", "exp-a") == unit_hash("u-1", "exp-a")
    assert unit_hash("u-1", "exp-a") != unit_hash("u-1", "exp-b")
    assert 0.0 <= unit_hash("u-1", "exp-a") < 1.0


def test_share_is_close_to_asked_and_salts_are_independent() -> None:
    users = [f"user-{i}" for i in range(20_000)]
    a = {u for u in users if in_share(u, "split", 0.3)}
    b = {u for u in users if in_share(u, "holdout", 0.5)}
    assert abs(len(a) / len(users) - 0.3) < 0.02
    # Independent salts: the holdout's share inside the split group is still about a half.
    assert abs(len(a & b) / len(a) - 0.5) < 0.03


def test_edges() -> None:
    assert not in_share("u", "s", 0.0)
    assert in_share("u", "s", 1.0)
    assert {u for u in map(str, range(1000)) if in_share(u, "s", 0.2)} <= {
        u for u in map(str, range(1000)) if in_share(u, "s", 0.6)
    }
