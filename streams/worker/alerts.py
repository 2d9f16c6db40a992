"""The churn-alert state machine: when a shopper's churn risk should trigger a campaign.

Per shopper, a tiny state (:class:`AlertState`) decides:

* an alert **fires** when the risk crosses ``high`` upward while the shopper is *armed*, and no
  alert fired for them within ``cooldown_ms``;
* after firing the shopper is *disarmed*; it **re-arms** only once the risk falls below ``low``
  (hysteresis: a risk hovering around ``high`` fires once, not on every wobble).

The worker keeps these states in a changelog-backed table, so a restart or a rebalance neither
repeats nor loses an alert. Pure Python; no Kafka.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_LAYOUT = struct.Struct("<B?qf")  # format version, armed, last alert ms, last risk
_FORMAT_VERSION = 1
#: ``last_alert_ms`` of a shopper who never had an alert.
NEVER = -1


@dataclass(frozen=True, slots=True)
class AlertPolicy:
    """Thresholds and cooldown of churn alerts.

    Attributes:
        high: a risk at or above this fires an alert (when armed and out of cooldown).
        low: a risk below this re-arms a shopper after an alert.
        cooldown_ms: at most one alert per shopper in this long, in ms (default 7 days).
    """

    high: float = 0.7
    low: float = 0.5
    cooldown_ms: int = 7 * 24 * 3600 * 1000

    def __post_init__(self) -> None:
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError(f"churn alert thresholds need 0 <= low < high <= 1, got low={self.low}, high={self.high}")
        if self.cooldown_ms < 0:
            raise ValueError("the churn alert cooldown must not be negative")


@dataclass(frozen=True, slots=True)
class AlertState:
    """One shopper's alert state: ``armed``, when the last alert fired (epoch ms, :data:`NEVER`), the last risk."""

    armed: bool = True
    last_alert_ms: int = NEVER
    last_risk: float = 0.0

    def step(self, risk: float, now_ms: int, policy: AlertPolicy) -> tuple[AlertState, bool]:
        """The next state after observing ``risk`` at ``now_ms``, and whether an alert fires."""
        cooled_down = self.last_alert_ms == NEVER or now_ms - self.last_alert_ms >= policy.cooldown_ms
        if self.armed and risk >= policy.high and cooled_down:
            return AlertState(False, now_ms, risk), True
        armed = self.armed or risk < policy.low
        return AlertState(armed, self.last_alert_ms, risk), False

    def encode(self) -> bytes:
        return _LAYOUT.pack(_FORMAT_VERSION, self.armed, self.last_alert_ms, self.last_risk)

    @classmethod
    def decode(cls, data: bytes | None) -> AlertState:
        """The stored state, or a fresh armed one for None; ValueError on bytes of another layout."""
        if data is None:
            return cls()
        if len(data) != _LAYOUT.size or data[0] != _FORMAT_VERSION:
            raise ValueError(
                f"alert state of {len(data)} bytes (version {data[:1].hex() or 'none'}) is not "
                f"format {_FORMAT_VERSION}; it will be reset"
            )
        _, armed, last_alert_ms, last_risk = _LAYOUT.unpack(data)
        return cls(armed, last_alert_ms, last_risk)
