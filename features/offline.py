"""Offline replay: training rows and online/offline parity from the same update code.

:func:`replay` folds a finite event log through :meth:`ShopperState.update
<features.state.ShopperState.update>` exactly as the worker does, in event-time order, and
yields the *point-in-time* feature row after each event: the row only knows events with an
earlier event time (or an equal one that sorts first by event-id hash), so training on it leaks nothing from the
future.

Online and offline agree exactly when the worker saw each shopper's events within
``grace_ms`` of order (its LATE events are the difference: replay sorts them into place).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from features.events import Event
from features.spec import DEFAULT_FEATURE_SPEC, FeatureSpec
from features.state import ShopperState, StateConfig, event_id_hash


def _by_event_time(events: Iterable[Event]) -> list[Event]:
    """The canonical order the state itself keeps: event time, ties by event-id hash."""
    return sorted(events, key=lambda event: (event.ts_ms, event_id_hash(event.event_id)))


def _fold(events: Iterable[Event], config: StateConfig) -> Iterator[tuple[Event, str, ShopperState]]:
    states: dict[str, ShopperState] = {}
    for event in _by_event_time(events):
        state = states.get(event.user_id)
        if state is None:
            state = states[event.user_id] = ShopperState.new(event.user_id)
        yield event, state.update(event, config), state


def replay(
    events: Iterable[Event], config: StateConfig = StateConfig(), spec: FeatureSpec = DEFAULT_FEATURE_SPEC
) -> Iterator[tuple[Event, str, np.ndarray]]:
    """Yield ``(event, outcome, row)`` for every event, in event-time order (ties by event-id hash).

    ``outcome`` is what ``update`` returned (APPLIED or DUPLICATE; nothing is LATE after
    sorting). ``row`` is ``spec.row(state, now_ms=event.ts_ms)`` of the event's shopper right
    after the update, a float32 vector; for a DUPLICATE it is the unchanged state's row. Keep
    ``outcome == APPLIED`` rows for training.
    """
    for event, outcome, state in _fold(events, config):
        yield event, outcome, spec.row(state, event.ts_ms)


def final_states(events: Iterable[Event], config: StateConfig = StateConfig()) -> dict[str, ShopperState]:
    """Every shopper's state after all events, folded in event-time order: user_id -> state."""
    return {state.user_id: state for _, _, state in _fold(events, config)}
