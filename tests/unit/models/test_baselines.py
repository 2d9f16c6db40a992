"""Popularity and co-occurrence next-item baselines."""

from __future__ import annotations

import torch

from models.baselines import CooccurrenceRecommender, PopularityRecommender

torch.set_num_threads(1)


def test_popularity_ranks_by_count_and_skips_history():
    pop = PopularityRecommender().fit([[1, 2, 2, 3], [2, 3, 4]], num_items=5)
    idx, _ = pop.recommend([[], [2]], k=3)
    assert idx[0].tolist() == [2, 3, 1] or idx[0].tolist() == [2, 3, 4]
    assert idx[0, :2].tolist() == [2, 3]
    assert 2 not in idx[1].tolist() and idx[1, 0].item() == 3


def test_cooccurrence_predicts_what_followed():
    seqs = [[1, 2, 5], [1, 2, 6], [3, 4, 5], [3, 4, 6], [7, 8, 1]]
    co = CooccurrenceRecommender(window=1, history_len=1).fit(seqs, num_items=8)
    idx, _ = co.recommend([[1], [3], [7, 8]], k=1)
    assert idx[:, 0].tolist() == [2, 4, 1]
    s = co.score([[1]])
    assert s.shape == (1, 9)
    # unseen item: falls back to the popularity tie-break
    idx, _ = co.recommend([[6]], k=1)
    assert idx[0, 0].item() in (1, 2, 3, 4, 5)


def test_cooccurrence_scores_are_the_decayed_sum_of_its_rows():
    """The scores are the model's definition, ``sum_j decay**j * C[h_{-1-j}, :]`` plus the popularity
    term, whatever the gather behind them: checked against a dense C built from the same sequences."""
    generator = torch.Generator().manual_seed(7)
    n = 40
    seqs = [torch.randint(1, n + 1, (int(length),), generator=generator).tolist() for length in range(2, 60)]
    co = CooccurrenceRecommender(window=3, history_len=3, decay=0.5).fit(seqs, num_items=n)
    dense_c = torch.zeros(n + 1, n + 1)
    for seq in seqs:
        for d in range(1, 4):
            for a, b in zip(seq, seq[d:], strict=False):
                dense_c[a, b] += 1.0 / d
    histories = [[], [5], [5, 5], [1, 2, 3, 4], [n, 1, n]]
    expected = (
        torch.stack(
            [
                sum((0.5**j * dense_c[item] for j, item in enumerate(reversed(h[-3:]))), torch.zeros(n + 1))
                for h in histories
            ]
        )
        + co.pop_weight * co.tensors()["popularity"]
    )
    assert torch.allclose(co.score(histories), expected, atol=1e-5)
    assert co.score([]).shape == (0, n + 1)
