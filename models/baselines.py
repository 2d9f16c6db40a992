"""Next-item baselines: popularity and item-to-item co-occurrence.

Co-occurrence can also be served, so it lives in :mod:`models.recommenders` (serving never
imports this module) and is re-exported here. Both work on item indices of an
:class:`models.sequences.ItemVocab` (1..n, 0 = padding) and share the scorer interface of
:class:`models.nextitem.SASRec`: ``score(histories)`` returns raw ``[B, n + 1]`` scores,
``recommend(histories, k, exclude_history)`` the top-K.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .metrics import top_k_items
from .nextitem import popularity_counts
from .recommenders import CooccurrenceRecommender

__all__ = ("PopularityRecommender", "CooccurrenceRecommender")


class PopularityRecommender:
    """Recommends the items with the most training interactions, the same list for everyone."""

    def __init__(self) -> None:
        self.num_items = 0
        self.counts = torch.zeros(1)

    def fit(self, sequences: Sequence[Sequence[int]], num_items: int) -> PopularityRecommender:
        self.num_items = int(num_items)
        self.counts = popularity_counts(sequences, num_items)
        return self

    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        return self.counts.unsqueeze(0).expand(len(histories), -1).clone()

    def recommend(self, histories: Sequence[Sequence[int]], k: int = 10, exclude_history: bool = True):
        return top_k_items(self.score(histories), histories, k, exclude_history)
