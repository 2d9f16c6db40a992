"""Churn alerts: hysteresis, cooldown and a state that survives a round trip."""

from __future__ import annotations

import pytest

from streams.worker.alerts import AlertPolicy, AlertState

DAY_MS = 86_400_000
POLICY = AlertPolicy(high=0.7, low=0.5, cooldown_ms=7 * DAY_MS)


def run(risks_at: list[tuple[float, int]], state: AlertState = AlertState()) -> list[int]:
    fired = []
    for risk, now in risks_at:
        state, fire = state.step(risk, now, POLICY)
        state = AlertState.decode(state.encode())  # as the table stores it between batches
        if fire:
            fired.append(now)
    return fired


def test_fires_once_on_an_upward_crossing_and_not_while_hovering():
    assert run([(0.2, 0), (0.75, 1), (0.69, 2), (0.72, 3), (0.8, 4)]) == [1]


def test_rearms_only_below_the_low_threshold_and_after_the_cooldown():
    risks = [
        (0.9, 0),
        (0.6, DAY_MS),
        (0.9, 2 * DAY_MS),  # no re-arm at 0.6
        (0.4, 3 * DAY_MS),
        (0.9, 4 * DAY_MS),  # re-armed, but cooling down
        (0.9, 8 * DAY_MS),
    ]  # cooldown over, still armed
    assert run(risks) == [0, 8 * DAY_MS]


def test_policy_and_state_validation():
    with pytest.raises(ValueError, match="low < high"):
        AlertPolicy(high=0.5, low=0.6)
    with pytest.raises(ValueError, match="will be reset"):
        AlertState.decode(b"\x09garbage")
    assert AlertState.decode(None) == AlertState()
