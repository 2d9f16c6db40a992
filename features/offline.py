"""Offline replay: training rows and online/offline parity from the same update code.

:func:`replay` folds a finite event log through :meth:`ShopperState.update
<features.state.ShopperState.update>` exactly as the worker does, in event-time order, and
yields the *point-in-time* feature row after each event: the row only knows events with an
earlier (or equal, earlier-in-the-log) event time, so training on it leaks nothing from the
future.

Online and offline agree exactly when the worker saw each shopper's events within
``grace_ms`` of order (its LATE events are the difference: replay sorts them into place).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from features.events import Event
from features.spec import DEFAULT_FEATURE_SPEC, FeatureSpec
from features.state import ShopperState, StateConfig


def _by_event_time(events: Iterable[Event]) -> list[Event]:
    return sorted(events, key=lambda event: event.ts_ms)  # stable: ties keep log order


def replay(events: Iterable[Event], config: StateConfig = StateConfig(),
           spec: FeatureSpec = DEFAULT_FEATURE_SPEC) -> Iterator[tuple[Event, str, np.ndarray]]:
    """Yield ``(event, outcome, row)`` for every event, in event-time order (stable sort).

    ``outcome`` is what ``update`` returned (APPLIED or DUPLICATE; nothing is LATE after
    sorting). ``row`` is ``spec.row(state, now_ms=event.ts_ms)`` of the event's shopper right
    after the update, a float32 vector; for a DUPLICATE it is the unchanged state's row. Keep
    ``outcome == APPLIED`` rows for training.
    """
    states: dict[str, ShopperState] = {}
    for event in _by_event_time(events):
        state = states.get(event.user_id)
        if state is None:
            state = states[event.user_id] = ShopperState.new(event.user_id)
        outcome = state.update(event, config)
        yield event, outcome, spec.row(state, event.ts_ms)


def final_states(events: Iterable[Event], config: StateConfig = StateConfig()) -> dict[str, ShopperState]:
    """Every shopper's state after all events, folded in event-time order: user_id -> state."""
    states: dict[str, ShopperState] = {}
    for event in _by_event_time(events):
        state = states.get(event.user_id)
        if state is None:
            state = states[event.user_id] = ShopperState.new(event.user_id)
        state.update(event, config)
    return states
