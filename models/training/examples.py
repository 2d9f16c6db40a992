"""Point-in-time rows: replay the log, take rows at scoring moments, label them (:func:`build_examples`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from features.events import Event
from features.offline import replay, split_late
from features.spec import DEFAULT_FEATURE_SPEC, FeatureSpec
from features.state import APPLIED, ShopperState, StateConfig

from ..labels import (
    MOMENT_EVENT,
    MOMENT_SWEEP,
    FutureIndex,
    LabelConfig,
    MomentSampler,
    label_moments,
    label_summary,
    sweep_times,
)

#: At most this many event rows are kept for the drift reference: a row costs ~0.6 ms (spec.row), and
#: 20,000 rows put every decile share within about 0.005.
EVENT_ROWS_KEPT = 20_000


class _StateTap:
    """Stands in for the FeatureSpec inside :func:`features.offline.replay`.

    ``replay`` calls ``spec.row(state, event.ts_ms)`` right after ``state.update(event)``; the tap
    remembers that live state (so sweeps can read every shopper's state between events) and
    returns no row: rows are computed only for the moments that become examples, with the real
    spec, from the same state at the same time, so they equal replay's rows (tested).
    """

    _EMPTY = np.zeros(0, dtype=np.float32)

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.states: dict[str, ShopperState] = {}
        self.last: ShopperState | None = None

    def row(self, state: ShopperState, now_ms: int) -> np.ndarray:
        self.states[state.user_id] = state
        self.last = state
        return self._EMPTY

    def __getattr__(self, name: str) -> Any:
        return getattr(self.spec, name)


@dataclass
class ExampleSet:
    """Labelled point-in-time rows.

    Attributes:
        x: ``float32 [M, spec.dim]`` feature rows; y: ``float32 [M, 2]`` labels (:data:`TASKS`,
        NaN = censored); ts: moment times; users: shopper ids; moment: 0 event / 1 sweep.
        applied: the applied events in replay order (for next-item sequences).
        event_rows, event_ts: the row right after every ``k``-th applied event and its time, ``k``
        keeping at most :data:`EVENT_ROWS_KEPT`: the rows the worker scores after events (every
        event, not the moments' one an hour, no sweeps), the reference of its drift gauge.
    """

    x: np.ndarray
    y: np.ndarray
    ts: np.ndarray
    users: list[str]
    moment: np.ndarray
    applied: list[Event]
    observed_from_ms: int
    observed_until_ms: int
    counts: dict[str, Any]
    event_rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    event_ts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def build_examples(
    events: Iterable[Event],
    labels: LabelConfig = LabelConfig(),
    state_config: StateConfig = StateConfig(),
    spec: FeatureSpec = DEFAULT_FEATURE_SPEC,
    observed_until_ms: int | None = None,
    progress: bool = False,
) -> ExampleSet:
    """Replay the log (in arrival order: the worker's late-event rule drops what serving never saw,
    :func:`features.offline.split_late`), take rows at scoring moments, label them (see :mod:`models.labels`)."""
    events, late = split_late(events, state_config)
    if not events:
        raise ValueError("no events to train on")
    ts_sorted = np.sort(np.fromiter((e.ts_ms for e in events), dtype=np.int64, count=len(events)))
    first_ms = int(ts_sorted[0])
    until = int(observed_until_ms) if observed_until_ms is not None else int(ts_sorted[-1])
    sweeps = [t for t in sweep_times(first_ms, until, labels.sweep_every_ms)]
    max_idle = labels.max_idle_ms
    tap = _StateTap(spec)
    sampler = MomentSampler(labels.example_gap_ms)
    rows: list[np.ndarray] = []
    users: list[str] = []
    times: list[int] = []
    kinds: list[int] = []
    applied: list[Event] = []
    event_rows: list[np.ndarray] = []
    event_ts: list[int] = []
    every = max(1, math.ceil(len(events) / EVENT_ROWS_KEPT))
    duplicates = 0
    j = 0
    n = len(events)
    from tqdm.auto import tqdm

    # duck-typed spec (see _StateTap): replay's parameter is typed FeatureSpec, not a protocol of row()
    stream = replay(events, state_config, tap)  # type: ignore[arg-type]
    for k, (event, outcome, _) in enumerate(
        tqdm(stream, total=n, desc="replay", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    ):
        state = tap.last
        if state is None or state.user_id != event.user_id:
            raise RuntimeError(
                "features.offline.replay no longer calls spec.row(state, ts) after each update; "
                "models.training._StateTap must follow it"
            )
        tap.last = None
        if outcome == APPLIED:
            applied.append(event)
            if len(applied) % every == 0:
                event_rows.append(spec.row(state, event.ts_ms))
                event_ts.append(event.ts_ms)
            if sampler.accept(event.user_id, event.ts_ms):
                rows.append(spec.row(state, event.ts_ms))
                users.append(event.user_id)
                times.append(event.ts_ms)
                kinds.append(MOMENT_EVENT)
        else:
            duplicates += 1
        nxt = int(ts_sorted[k + 1]) if k + 1 < n else None
        while j < len(sweeps) and (nxt is None or sweeps[j] < nxt):
            t = sweeps[j]
            j += 1
            if t > until:
                continue
            live = [s for s in tap.states.values() if t - s.last_event_ms <= max_idle]
            if live:
                rows.append(spec.matrix(live, t))
                users.extend(s.user_id for s in live)
                times.extend([t] * len(live))
                kinds.extend([MOMENT_SWEEP] * len(live))
    x = (
        np.vstack([r.reshape(-1, spec.dim) for r in rows]).astype(np.float32)
        if rows
        else np.zeros((0, spec.dim), np.float32)
    )
    ts = np.asarray(times, dtype=np.int64)
    index = FutureIndex(applied)
    y = label_moments(index, users, ts, labels, until)
    keep = ~np.isnan(y).all(axis=1)
    moment = np.asarray(kinds, dtype=np.int8)
    counts = {
        "events": n + len(late),
        "late_events": len(late),
        "applied_events": len(applied),
        "duplicates": duplicates,
        "shoppers": len(tap.states),
        "moments": {"event": int((moment == MOMENT_EVENT).sum()), "sweep": int((moment == MOMENT_SWEEP).sum())},
        "dropped_all_censored": int((~keep).sum()),
        "labels": label_summary(y),
    }
    users_kept = [u for u, kk in zip(users, keep, strict=False) if kk]
    return ExampleSet(
        x[keep],
        y[keep],
        ts[keep],
        users_kept,
        moment[keep],
        applied,
        first_ms,
        until,
        counts,
        np.asarray(event_rows, dtype=np.float32).reshape(-1, spec.dim),
        np.asarray(event_ts, dtype=np.int64),
    )
