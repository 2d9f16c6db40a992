"""The time split: one split time for every task, so no training label sees the evaluation period."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from features.state import DAY_MS


@dataclass(frozen=True)
class TimeSplit:
    """One split time ``split_ms`` for every task; windows per task (inclusive ms bounds).

    For a task with horizon ``h``: fit ``[start + warmup, valid_from)``, valid
    ``[valid_from, split - h]`` (so every training label ends by ``split``), eval
    ``[split, end - h]`` (later moments are censored).
    """

    start_ms: int
    end_ms: int
    split_ms: int
    warmup_ms: int
    horizons: dict[str, int]
    valid_fraction: float

    def valid_from(self, task: str) -> int:
        train_end = self.split_ms - self.horizons[task]
        lo = self.start_ms + self.warmup_ms
        return int(train_end - self.valid_fraction * (train_end - lo))

    def windows(self, task: str) -> dict[str, tuple[int, int]]:
        h = self.horizons[task]
        v = self.valid_from(task)
        return {
            "fit": (self.start_ms + self.warmup_ms, v - 1),
            "valid": (v, self.split_ms - h),
            "eval": (self.split_ms, self.end_ms - h),
        }

    def masks(self, ts: np.ndarray, task: str) -> dict[str, np.ndarray]:
        out = {}
        for name, (lo, hi) in self.windows(task).items():
            out[name] = (ts >= lo) & (ts <= hi)
        return out

    def to_dict(self) -> dict[str, Any]:
        def iso(ms: int) -> str:
            return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="minutes")

        return {
            "start": iso(self.start_ms),
            "split": iso(self.split_ms),
            "end": iso(self.end_ms),
            "start_ms": self.start_ms,
            "split_ms": self.split_ms,
            "end_ms": self.end_ms,
            "warmup_ms": self.warmup_ms,
            "valid_fraction": self.valid_fraction,
            "horizons_ms": dict(self.horizons),
            "windows": {
                task: {name: [iso(lo), iso(hi)] for name, (lo, hi) in self.windows(task).items()}
                for task in self.horizons
            },
        }


def make_time_split(
    start_ms: int,
    end_ms: int,
    horizons: Mapping[str, int],
    eval_fraction: float = 0.25,
    valid_fraction: float = 0.2,
    warmup_ms: int = 0,
) -> TimeSplit:
    """Place the split so the longest-horizon task's evaluation window is ``eval_fraction`` of its
    usable time; raises ``ValueError`` when the log is too short for the horizons."""
    if not 0 < eval_fraction < 1 or not 0 < valid_fraction < 1:
        raise ValueError("eval_fraction and valid_fraction must be in (0, 1)")
    h_max = max(horizons.values())
    span = end_ms - start_ms
    usable = span - warmup_ms - 2 * h_max
    if usable <= 0:
        raise ValueError(
            f"the log spans {span / DAY_MS:.1f} days but the longest label horizon is {h_max / DAY_MS:.1f} days: "
            f"a leakage-free time split needs more than {(2 * h_max + warmup_ms) / DAY_MS:.1f} days (a training "
            "window whose labels end before the split, then an evaluation window whose labels end before the "
            "log does). Use a longer log or a shorter horizon (e.g. --churn-horizon-days 7)."
        )
    split = int(end_ms - h_max - eval_fraction * usable)
    return TimeSplit(int(start_ms), int(end_ms), split, int(warmup_ms), dict(horizons), float(valid_fraction))
