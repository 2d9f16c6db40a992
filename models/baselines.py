"""Next-item baselines: popularity and item-to-item co-occurrence.

Both work on item indices of an :class:`models.sequences.ItemVocab` (1..n, 0 = padding) and
share the scorer interface of :class:`models.nextitem.SASRec`: ``score(histories)`` returns raw
``[B, n + 1]`` scores, ``recommend(histories, k, exclude_history)`` the top-K.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .metrics import top_k_items
from .nextitem import popularity_counts


class PopularityRecommender:
    """Recommends the items with the most training interactions, the same list for everyone."""

    def __init__(self) -> None:
        self.num_items = 0
        self.counts = torch.zeros(1)

    def fit(self, sequences: Sequence[Sequence[int]], num_items: int) -> "PopularityRecommender":
        self.num_items = int(num_items)
        self.counts = popularity_counts(sequences, num_items)
        return self

    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        return self.counts.unsqueeze(0).expand(len(histories), -1).clone()

    def recommend(self, histories: Sequence[Sequence[int]], k: int = 10, exclude_history: bool = True):
        return top_k_items(self.score(histories), histories, k, exclude_history)


class CooccurrenceRecommender:
    """Item-to-item "people who had X next had Y" baseline.

    ``C[a, b]`` sums ``1 / d`` over every training sequence where ``b`` follows ``a`` at a
    distance ``d <= window`` (directed, so it models what comes *next*). A history is scored as
    ``sum_j decay**j * C[h_{-1-j}, :]`` over its last ``history_len`` items, plus a tiny
    popularity term that only breaks ties (and serves users whose items have no neighbours).
    """

    def __init__(self, window: int = 3, history_len: int = 3, decay: float = 0.5, pop_weight: float = 1e-6) -> None:
        self.window = int(window)
        self.history_len = int(history_len)
        self.decay = float(decay)
        self.pop_weight = float(pop_weight)
        self.num_items = 0
        self._ct: torch.Tensor | None = None  # C transposed, sparse COO [n+1, n+1]
        self._pop = torch.zeros(1)

    def fit(self, sequences: Sequence[Sequence[int]], num_items: int) -> "CooccurrenceRecommender":
        n = int(num_items) + 1
        src: list[np.ndarray] = []
        dst: list[np.ndarray] = []
        wts: list[np.ndarray] = []
        for seq in sequences:
            a = np.asarray(seq, dtype=np.int64)
            for d in range(1, min(self.window, len(a) - 1) + 1):
                src.append(a[:-d])
                dst.append(a[d:])
                wts.append(np.full(len(a) - d, 1.0 / d, dtype=np.float32))
        if src:
            s, t, w = np.concatenate(src), np.concatenate(dst), np.concatenate(wts)
        else:
            s = t = np.zeros(0, dtype=np.int64)
            w = np.zeros(0, dtype=np.float32)
        # store the transpose so that scores^T = C^T @ H^T is a sparse @ dense product
        self._ct = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([t, s])), torch.from_numpy(w), (n, n), check_invariants=False
        ).coalesce()
        pop = PopularityRecommender().fit(sequences, num_items).counts
        self._pop = pop / max(float(pop.max()), 1.0)
        self.num_items = int(num_items)
        return self

    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        if self._ct is None:
            raise RuntimeError("CooccurrenceRecommender.fit() must be called before score()")
        n = self.num_items + 1
        h = torch.zeros(n, len(histories))
        for col, hist in enumerate(histories):
            tail = list(hist[-self.history_len:])[::-1]
            for j, item in enumerate(tail):
                h[item, col] += self.decay ** j
        scores = torch.sparse.mm(self._ct, h).T.contiguous()
        return scores + self.pop_weight * self._pop.unsqueeze(0)

    def recommend(self, histories: Sequence[Sequence[int]], k: int = 10, exclude_history: bool = True):
        return top_k_items(self.score(histories), histories, k, exclude_history)
