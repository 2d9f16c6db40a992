"""Full-ranking next-item metrics: HR@K, NDCG@K and catalogue coverage.

Protocol (SASRec / S3-Rec / ICLRec): each user has one held-out target item; the model scores
**all** items, items already in the user's history are excluded (score ``-inf``), and the rank
of the target among the remaining items decides the metrics:

* ``HR@K``   = 1 if rank < K else 0 (rank 0 = top)
* ``NDCG@K`` = 1 / log2(rank + 2) if rank < K else 0 (one relevant item, so IDCG = 1)

Ties: scores equal to the target's are broken uniformly at random *in expectation*: with ``g``
items scored above the target and ``e`` other items scored equal to it, the rank is uniform on
``g .. g+e`` and we report the exact expected HR / NDCG. This is what an arbitrary tie-break
gives on average, and it does not flatter tie-heavy scorers such as popularity (counting only
strictly greater items would). For a model with float scores ``e`` is almost always 0.

A target that is itself in the history is excluded like every history item, so it is a miss;
:func:`evaluate_full_ranking` reports how often that happened (``target_in_history``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain

import numpy as np
import torch

DEFAULT_KS: tuple[int, ...] = (5, 10, 20)

ScoreFn = Callable[[Sequence[Sequence[int]]], torch.Tensor]


def hit_rate_at_k(ranks: Sequence[int] | torch.Tensor, k: int) -> float:
    """Mean HR@K for 0-based integer ranks of the target."""
    r = torch.as_tensor(ranks, dtype=torch.float64)
    if r.numel() == 0:
        return 0.0
    return float((r < k).double().mean())


def ndcg_at_k(ranks: Sequence[int] | torch.Tensor, k: int) -> float:
    """Mean NDCG@K (single relevant item) for 0-based integer ranks of the target."""
    r = torch.as_tensor(ranks, dtype=torch.float64)
    if r.numel() == 0:
        return 0.0
    gain = torch.where(r < k, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))
    return float(gain.mean())


def catalogue_coverage(recommended: Iterable[Iterable[int]], num_items: int) -> float:
    """Share of the catalogue (``num_items`` items) that appears in at least one list."""
    if num_items <= 0:
        return 0.0
    seen: set[int] = set()
    for lst in recommended:
        seen.update(int(i) for i in lst)
    return len(seen) / num_items


def mask_scores(
    scores: torch.Tensor,
    histories: Sequence[Sequence[int]] | None,
    exclude_history: bool = True,
) -> torch.Tensor:
    """Set the padding column 0 and (optionally) each row's history items to ``-inf``, in place.

    ``scores`` is ``[B, n_items + 1]`` (column ``i`` = item index ``i``).
    """
    scores[:, 0] = float("-inf")
    if exclude_history and histories is not None:
        lengths = np.fromiter(map(len, histories), dtype=np.int64, count=len(histories))
        if lengths.any():
            rows = np.repeat(np.arange(len(histories)), lengths)
            cols = np.fromiter(chain.from_iterable(histories), dtype=np.int64, count=int(lengths.sum()))
            dev = scores.device
            scores[torch.from_numpy(rows).to(dev), torch.from_numpy(cols).to(dev)] = float("-inf")
    return scores


def rank_counts(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (#items scored strictly above the target, #other items scored equal to it)."""
    t = scores.gather(1, targets.view(-1, 1))
    greater = (scores > t).sum(1)
    equal = (scores == t).sum(1) - 1
    return greater, equal


def _discount_prefix(max_k: int, device: torch.device) -> torch.Tensor:
    # D[n] = sum_{r < n} 1 / log2(r + 2), n = 0..max_k
    r = torch.arange(max_k, dtype=torch.float64, device=device)
    return torch.cat([torch.zeros(1, dtype=torch.float64, device=device), torch.cumsum(1.0 / torch.log2(r + 2.0), 0)])


def expected_hr_ndcg(greater: torch.Tensor, equal: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected per-row HR@K and NDCG@K when the rank is uniform on ``greater .. greater+equal``."""
    g = greater.to(torch.float64)
    n = equal.to(torch.float64) + 1.0  # number of equally likely ranks
    hr = ((k - g) / n).clamp(0.0, 1.0)
    disc = _discount_prefix(k, greater.device)
    lo = greater.clamp(max=k).long()
    hi = (greater + equal + 1).clamp(max=k).long()
    ndcg = (disc[hi] - disc[lo]) / n
    return hr, ndcg


class RankingAccumulator:
    """Accumulates full-ranking metrics over batches of already masked score rows."""

    def __init__(self, num_items: int, ks: Sequence[int] = DEFAULT_KS) -> None:
        self.num_items = int(num_items)
        self.ks = tuple(sorted(int(k) for k in ks))
        self.users = 0
        self.target_in_history = 0
        self._hr = {k: 0.0 for k in self.ks}
        self._ndcg = {k: 0.0 for k in self.ks}
        self._seen = {k: torch.zeros(self.num_items + 1, dtype=torch.bool) for k in self.ks}

    def add(self, masked_scores: torch.Tensor, targets: torch.Tensor) -> None:
        targets = targets.to(masked_scores.device)
        greater, equal = rank_counts(masked_scores, targets)
        tgt_scores = masked_scores.gather(1, targets.view(-1, 1)).squeeze(1)
        excluded = torch.isneginf(tgt_scores)  # target was a history item: always a miss
        self.target_in_history += int(excluded.sum())
        for k in self.ks:
            hr, nd = expected_hr_ndcg(greater, equal, k)
            self._hr[k] += float(hr.masked_fill(excluded, 0.0).sum())
            self._ndcg[k] += float(nd.masked_fill(excluded, 0.0).sum())
        kmax = min(self.ks[-1], self.num_items)
        top = torch.topk(masked_scores, kmax, dim=1)
        for k in self.ks:
            idx = top.indices[:, :k]
            finite = torch.isfinite(top.values[:, :k])
            self._seen[k][idx[finite].cpu()] = True
        self.users += int(targets.numel())

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {}
        n = max(self.users, 1)
        for k in self.ks:
            out[f"HR@{k}"] = self._hr[k] / n
            out[f"NDCG@{k}"] = self._ndcg[k] / n
        for k in self.ks:
            out[f"coverage@{k}"] = int(self._seen[k][1:].sum()) / max(self.num_items, 1)
        out["users"] = float(self.users)
        out["target_in_history"] = float(self.target_in_history)
        return out


def evaluate_full_ranking(
    score_fn: ScoreFn,
    histories: Sequence[Sequence[int]],
    targets: Sequence[int],
    num_items: int,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
    exclude_history: bool = True,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """Score every item for each history with ``score_fn`` and rank each target against all.

    ``score_fn(histories_batch)`` returns raw ``[B, num_items + 1]`` scores (any device);
    padding and (by default) history items are excluded here.
    """
    if len(histories) != len(targets):
        raise ValueError(f"{len(histories)} histories but {len(targets)} targets")
    acc = RankingAccumulator(num_items, ks)
    starts: Iterable[int] = range(0, len(histories), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, leave=False)
    for s in starts:
        hb = histories[s : s + batch_size]
        scores = score_fn(hb).float()
        if scores.shape != (len(hb), num_items + 1):
            raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected ({len(hb)}, {num_items + 1})")
        mask_scores(scores, hb, exclude_history)
        acc.add(scores, torch.as_tensor(list(targets[s : s + batch_size]), dtype=torch.long))
    return acc.result()


def format_table(rows: Mapping[str, Mapping[str, float | None]], ks: Sequence[int] = DEFAULT_KS) -> str:
    """Plain-text table: one row per method, columns HR@K / NDCG@K."""
    cols = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks]
    name_w = max([len("method")] + [len(n) for n in rows])
    head = "method".ljust(name_w) + "  " + "  ".join(c.rjust(8) for c in cols)
    lines = [head, "-" * len(head)]
    for name, vals in rows.items():
        cells = []
        for c in cols:
            v = vals.get(c)
            cells.append(("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}").rjust(8))
        lines.append(name.ljust(name_w) + "  " + "  ".join(cells))
    return "\n".join(lines)


def top_k_items(
    scores: torch.Tensor,
    histories: Sequence[Sequence[int]] | None,
    k: int,
    exclude_history: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` item indices and scores per row of raw ``[B, n_items + 1]`` scores.

    Padding and (optionally) history items are excluded first, in place: pass scores that
    are not needed afterwards (every caller computes them for this call; a copy of a
    micro-batch's ``[B, n_items + 1]`` scores cost as much as the top-k itself).
    ``k`` is capped at the number of items. Rows where fewer than ``k`` items remain are
    filled with index 0 / score ``-inf``.
    """
    scores = mask_scores(scores, histories, exclude_history)
    k = max(0, min(int(k), scores.shape[1] - 1))
    top = torch.topk(scores, k, dim=1)
    idx = torch.where(torch.isfinite(top.values), top.indices, torch.zeros_like(top.indices))
    return idx, top.values
