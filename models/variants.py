"""Which shoppers a challenger model, or a churn-alert holdout, applies to.

A shopper's group must be the same on every worker, after every restart and for every event,
or one shopper's outcomes would be split across groups. So it is a pure function of the user id
and a salt: the first 8 bytes of ``blake2b(salt + user id)`` as a number in ``[0, 1)``, compared
with the share. A new salt reshuffles the shoppers (a new experiment); different salts make the
challenger split and the alert holdout independent of each other.
"""

from __future__ import annotations

import hashlib

#: The served model (the registry's ``current`` pointer) and the one on trial.
CHAMPION = "champion"
CHALLENGER = "challenger"
VARIANTS: tuple[str, ...] = (CHAMPION, CHALLENGER)

_SCALE = float(1 << 64)


def unit_hash(user_id: str, salt: str) -> float:
    """The shopper's stable position in ``[0, 1)`` under ``salt``."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8, key=salt.encode()[:64]).digest()
    return int.from_bytes(digest, "little") / _SCALE


def in_share(user_id: str, salt: str, share: float) -> bool:
    """Whether the shopper falls in the first ``share`` (0..1) of shoppers under ``salt``."""
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    return unit_hash(user_id, salt) < share
