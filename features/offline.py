"""Offline replay: training rows and online/offline parity from the same update code.

:func:`replay` takes a finite event log in ARRIVAL order (the order the worker would read each
shopper's events: a file's order, a partition's offsets), first applies the worker's late-event
rule to it (:func:`split_late`: an event older than the shopper's newest accepted event time minus
``grace_ms`` is LATE and never reaches the state, online or here), then folds the rest through
:meth:`ShopperState.update <features.state.ShopperState.update>` exactly as the worker does, in
event-time order, and yields the *point-in-time* feature row after each event: the row only knows
events with an earlier event time (or an equal one that sorts first by event-id hash), so
training on it leaks nothing from the future, and sees no event serving never saw.

Online and offline then agree exactly, LATE events included, with one approximation: the worker
sorts each shopper's events within one micro-batch by event time before the rule sees them, so
two events of one shopper that arrive in the same batch more than ``grace_ms`` out of order are
both applied there and the older one is LATE here. Shopper eviction after ``retention_ms`` of
silence (which forgets the watermark) is not modelled either.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from features.events import Event
from features.spec import DEFAULT_FEATURE_SPEC, FeatureSpec
from features.state import ShopperState, StateConfig, event_id_hash


def split_late(events: Iterable[Event], config: StateConfig = StateConfig()) -> tuple[list[Event], list[Event]]:
    """The worker's late-event rule over a log in arrival order: ``(kept, late)``, each in arrival order.

    An event is LATE when its time is before the newest event time kept for its shopper so far
    minus ``config.grace_ms`` (``ShopperState.update`` checks it first, so a late repeat is LATE
    too); kept events raise that newest time. Applying it again to ``kept`` keeps everything.
    """
    newest: dict[str, int] = {}
    kept: list[Event] = []
    late: list[Event] = []
    for event in events:
        last = newest.get(event.user_id)
        if last is not None and event.ts_ms < last - config.grace_ms:
            late.append(event)
            continue
        kept.append(event)
        if last is None or event.ts_ms > last:
            newest[event.user_id] = event.ts_ms
    return kept, late


def _by_event_time(events: Iterable[Event]) -> list[Event]:
    """The canonical order the state itself keeps: event time, ties by event-id hash."""
    return sorted(events, key=lambda event: (event.ts_ms, event_id_hash(event.event_id)))


def _fold(events: Iterable[Event], config: StateConfig) -> Iterator[tuple[Event, str, ShopperState]]:
    states: dict[str, ShopperState] = {}
    for event in _by_event_time(split_late(events, config)[0]):
        state = states.get(event.user_id)
        if state is None:
            state = states[event.user_id] = ShopperState.new(event.user_id)
        yield event, state.update(event, config), state


def replay(
    events: Iterable[Event], config: StateConfig = StateConfig(), spec: FeatureSpec = DEFAULT_FEATURE_SPEC
) -> Iterator[tuple[Event, str, np.ndarray]]:
    """Yield ``(event, outcome, row)`` for every event the worker would not reject as LATE
    (:func:`split_late` over ``events`` in arrival order), in event-time order (ties by event-id hash).

    ``outcome`` is what ``update`` returned (APPLIED or DUPLICATE; nothing is LATE after the
    rule and the sort). ``row`` is ``spec.row(state, now_ms=event.ts_ms)`` of the event's shopper right
    after the update, a float32 vector; for a DUPLICATE it is the unchanged state's row. Keep
    ``outcome == APPLIED`` rows for training.
    """
    for event, outcome, state in _fold(events, config):
        yield event, outcome, spec.row(state, event.ts_ms)


def final_states(events: Iterable[Event], config: StateConfig = StateConfig()) -> dict[str, ShopperState]:
    """Every shopper's state after all events (``events`` in arrival order; the LATE ones left out as the
    worker leaves them out), folded in event-time order: user_id -> state."""
    return {state.user_id: state for _, _, state in _fold(events, config)}
