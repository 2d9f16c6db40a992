"""The model-input vector: which features, in which order, normalised how.

A :class:`FeatureSpec` turns shopper states into ``float32`` rows. Training (through
:mod:`features.offline`) and serving (the worker) use the same spec object, and every model
artifact records :attr:`FeatureSpec.hash` so a model is never fed a vector it was not trained
on.

Each feature reads one raw value from :meth:`ShopperState.raw_features
<features.state.ShopperState.raw_features>` (natural units: counts, ms, currency units) and
normalises it as ``y = clip(raw / divisor, low, high)``, then ``log1p(y)`` when its transform
is ``"log1p"``. Durations that never happened are ``inf`` raw, so they clip to ``high``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from features.state import FEATURE_LOGIC_VERSION, HOUR_MS, RAW_FEATURE_NAMES, ShopperState

TRANSFORM_LOG1P = "log1p"
TRANSFORM_LINEAR = "linear"
_TRANSFORMS = (TRANSFORM_LOG1P, TRANSFORM_LINEAR)

_RAW_INDEX = {name: index for index, name in enumerate(RAW_FEATURE_NAMES)}


@dataclass(frozen=True, slots=True)
class Feature:
    """One input of the model vector.

    Attributes:
        name: the raw feature it reads (one of :data:`features.state.RAW_FEATURE_NAMES`).
        unit: unit of the raw value.
        transform: ``"log1p"`` or ``"linear"``, applied after dividing and clipping.
        divisor: the raw value is divided by this first (a unit change, e.g. ms -> hours).
        low: lower clip bound, after dividing.
        high: upper clip bound, after dividing (``inf`` for none).
        description: what it means.
    """

    name: str
    unit: str
    transform: str
    divisor: float
    low: float
    high: float
    description: str

    def normalisation(self) -> str:
        """The normalisation as a formula of the raw value ``x``, e.g. ``log1p(clip(x / 3600000, 0, 720))``."""
        inner = f"x / {_number(self.divisor)}" if self.divisor != 1 else "x"
        if math.isinf(self.high):
            inner = f"max({inner}, {_number(self.low)})"
        else:
            inner = f"clip({inner}, {_number(self.low)}, {_number(self.high)})"
        return f"log1p({inner})" if self.transform == TRANSFORM_LOG1P else inner


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """An ordered, versioned list of :class:`Feature`; rows are ``float32`` of length :attr:`dim`.

    Attributes:
        version: bump when the list or a normalisation changes (it is part of :attr:`hash`).
        features: the features, in vector order.
        hash: 16 hex digits of sha256 over version, feature logic version, names and
            normalisations; equal specs have equal hashes in every process.
    """

    version: int
    features: tuple[Feature, ...]
    hash: str = field(init=False)
    _columns: np.ndarray = field(init=False, repr=False, compare=False)
    _divisor: np.ndarray = field(init=False, repr=False, compare=False)
    _low: np.ndarray = field(init=False, repr=False, compare=False)
    _high: np.ndarray = field(init=False, repr=False, compare=False)
    _log_columns: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [feature.name for feature in self.features]
        if not names:
            raise ValueError("a FeatureSpec needs at least one feature")
        if len(set(names)) != len(names):
            raise ValueError(f"feature names repeat in {names}")
        for feature in self.features:
            if feature.name not in _RAW_INDEX:
                raise ValueError(
                    f"feature {feature.name!r} is not a raw feature of ShopperState; choose from {RAW_FEATURE_NAMES}"
                )
            if feature.transform not in _TRANSFORMS:
                raise ValueError(
                    f"feature {feature.name!r} has transform {feature.transform!r}; use one of {_TRANSFORMS}"
                )
            if not feature.divisor > 0 or not feature.low <= feature.high:
                raise ValueError(f"feature {feature.name!r} needs divisor > 0 and low <= high")
        definition = {
            "version": self.version,
            "logic": FEATURE_LOGIC_VERSION,
            "features": [[f.name, f.transform, f.divisor, f.low, repr(f.high)] for f in self.features],
        }
        digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]
        object.__setattr__(self, "hash", digest)
        object.__setattr__(self, "_columns", np.array([_RAW_INDEX[name] for name in names], dtype=np.intp))
        object.__setattr__(self, "_divisor", np.array([f.divisor for f in self.features], dtype=np.float64))
        object.__setattr__(self, "_low", np.array([f.low for f in self.features], dtype=np.float64))
        object.__setattr__(self, "_high", np.array([f.high for f in self.features], dtype=np.float64))
        object.__setattr__(
            self,
            "_log_columns",
            np.array([i for i, f in enumerate(self.features) if f.transform == TRANSFORM_LOG1P], dtype=np.intp),
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Feature names in vector order."""
        return tuple(feature.name for feature in self.features)

    @property
    def dim(self) -> int:
        """Length of a row."""
        return len(self.features)

    #: Row and matrix dtype.
    dtype = np.float32

    def index(self, name: str) -> int:
        """Column of a feature in a row."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"feature {name!r} is not in this spec ({self.hash})") from None

    def matrix(self, states: Sequence[ShopperState], now_ms: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows for many states at once: ``(len(states), dim)`` float32.

        ``now_ms`` is one time for all states or one per state (epoch ms); windows and
        recencies are as of that time. Raw values are gathered once per state, then all
        normalisation is vectorised.
        """
        if np.ndim(now_ms) == 0:
            now = int(np.asarray(now_ms))
            raw_rows = [state.raw_features(now) for state in states]
        else:
            nows = np.asarray(now_ms, dtype=np.int64).tolist()
            if len(nows) != len(states):
                raise ValueError(f"now_ms has {len(nows)} times for {len(states)} states")
            raw_rows = [state.raw_features(now) for state, now in zip(states, nows, strict=True)]
        if not raw_rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        raw = np.array(raw_rows, dtype=np.float64)[:, self._columns]
        raw /= self._divisor
        np.clip(raw, self._low, self._high, out=raw)
        if self._log_columns.size:
            raw[:, self._log_columns] = np.log1p(raw[:, self._log_columns])
        return raw.astype(self.dtype)

    def row(self, state: ShopperState, now_ms: int) -> np.ndarray:
        """One state's row as of ``now_ms`` (epoch ms): ``(dim,)`` float32, same as :meth:`matrix`."""
        return self.matrix((state,), now_ms)[0]

    def markdown_table(self) -> str:
        """The features as a Markdown table (name, meaning, raw unit, normalisation)."""
        lines = ["| # | feature | meaning | raw unit | normalisation |", "|---|---|---|---|---|"]
        for i, f in enumerate(self.features):
            lines.append(f"| {i} | `{f.name}` | {f.description} | {f.unit} | `{f.normalisation()}` |")
        return "\n".join(lines)


def _count(name: str, description: str) -> Feature:
    return Feature(name, "count", TRANSFORM_LOG1P, 1.0, 0.0, math.inf, description)


def _money(name: str, description: str) -> Feature:
    return Feature(name, "currency units", TRANSFORM_LOG1P, 1.0, 0.0, math.inf, description)


def _hours_since(name: str, description: str) -> Feature:
    return Feature(
        name,
        "ms",
        TRANSFORM_LOG1P,
        float(HOUR_MS),
        0.0,
        720.0,
        description + " (in hours, capped at 30 d; never = the cap)",
    )


def _ratio(name: str, description: str, low: float = 0.0) -> Feature:
    return Feature(name, "ratio", TRANSFORM_LINEAR, 1.0, low, 1.0, description)


_WINDOWS = (
    ("1h", "last hour (5 min buckets)"),
    ("24h", "last 24 h (1 h buckets)"),
    ("7d", "last 7 days (6 h buckets)"),
    ("30d", "last 30 days (6 h buckets)"),
)
_KINDS = (("views", "page views"), ("cart_adds", "cart adds"), ("cart_removes", "cart removes"), ("orders", "orders"))

#: The vector every ShopPulse model reads (version 1, 38 features).
DEFAULT_FEATURE_SPEC = FeatureSpec(
    version=1,
    features=(
        *(
            _count(f"{kind}_{window}", f"{words} in the {window_words}")
            for window, window_words in _WINDOWS
            for kind, words in _KINDS
        ),
        _hours_since("ms_since_last_event", "time since the shopper's latest event"),
        _hours_since("ms_since_last_view", "time since the latest page view"),
        _hours_since("ms_since_last_cart_add", "time since the latest cart add"),
        _hours_since("ms_since_last_order", "time since the latest order"),
        Feature(
            "ms_since_first_event",
            "ms",
            TRANSFORM_LOG1P,
            86_400_000.0,
            0.0,
            3650.0,
            "tenure: time since the first event kept (in days, capped at 10 years)",
        ),
        _count("orders_lifetime", "orders ever"),
        _money("revenue_30d", "order totals in the last 30 days"),
        _money("revenue_lifetime", "order totals ever"),
        _money("avg_order_value", "revenue_lifetime / orders_lifetime (0 without orders)"),
        _count("session_events", "events in the session holding the latest event (sessions split at gaps > 30 min)"),
        _count("session_distinct_items", "distinct items viewed or carted in that session"),
        Feature(
            "session_length_ms",
            "ms",
            TRANSFORM_LOG1P,
            60_000.0,
            0.0,
            1440.0,
            "that session's first to latest event (in minutes, capped at 24 h)",
        ),
        _count("sessions_7d", "sessions that started in the last 7 days"),
        _count("cart_items_now", "units in the cart now (adds minus removes per item since the last order)"),
        _money("cart_value_now", "value of the cart now (units x latest price per item)"),
        _count("cart_adds_since_order", "cart adds since the last order (abandonment)"),
        Feature(
            "active_days_30d",
            "days",
            TRANSFORM_LINEAR,
            30.0,
            0.0,
            1.0,
            "distinct UTC days with an event in the last 30 days",
        ),
        _ratio("trend_7d", "(events last 7 d - events 7 d before) / their sum; 0 when both are 0", low=-1.0),
        _ratio("view_to_cart_30d", "cart adds / views over 30 d, capped at 1; 0 without views"),
        _ratio("cart_to_order_30d", "orders / cart adds over 30 d, capped at 1; 0 without adds"),
        _ratio("category_top_share", "strongest category's share of the tracked affinity (top 5, half-life 7 d)"),
        Feature(
            "category_affinity_total",
            "weighted interactions",
            TRANSFORM_LOG1P,
            1.0,
            0.0,
            math.inf,
            "decayed category interest: views 1, cart adds 3, halving every 7 days, summed over the top 5",
        ),
    ),
)
