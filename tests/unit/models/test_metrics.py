"""HR@K / NDCG@K / coverage against hand-computed values, history exclusion, ties."""

from __future__ import annotations

import math

import pytest
import torch

from models.metrics import (
    RankingAccumulator,
    catalogue_coverage,
    evaluate_full_ranking,
    expected_hr_ndcg,
    hit_rate_at_k,
    mask_scores,
    ndcg_at_k,
    top_k_items,
)

torch.set_num_threads(1)


def test_hr_and_ndcg_from_ranks_by_hand():
    ranks = [0, 1, 4, 10]
    assert hit_rate_at_k(ranks, 5) == pytest.approx(3 / 4)
    assert hit_rate_at_k(ranks, 1) == pytest.approx(1 / 4)
    assert ndcg_at_k(ranks, 5) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert ndcg_at_k(ranks, 20) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(12)) / 4)
    assert hit_rate_at_k([], 5) == 0.0


def test_full_ranking_excludes_history_and_padding():
    # 5 items (columns 1..5, column 0 = padding); scores decrease with the index
    base = torch.tensor([[100.0, 5, 4, 3, 2, 1]])

    def score_fn(histories):
        return base.expand(len(histories), -1).clone()

    # target item 3: items 1 and 2 score higher -> rank 2 without exclusion
    m = evaluate_full_ranking(score_fn, [[4]], [3], num_items=5, ks=(1, 3), exclude_history=False)
    assert m["HR@1"] == 0.0 and m["HR@3"] == 1.0
    assert m["NDCG@3"] == pytest.approx(1 / math.log2(4))
    # with items 1 and 2 in the history the target moves to the top (the padding column never counts)
    m = evaluate_full_ranking(score_fn, [[1, 2]], [3], num_items=5, ks=(1, 3))
    assert m["HR@1"] == 1.0 and m["NDCG@1"] == 1.0
    # two users averaged: ranks 0 and 2
    m = evaluate_full_ranking(score_fn, [[1, 2], []], [3, 3], num_items=5, ks=(1, 3))
    assert m["HR@1"] == pytest.approx(0.5)
    assert m["NDCG@3"] == pytest.approx((1 + 1 / math.log2(4)) / 2)
    assert m["users"] == 2


def test_target_in_history_is_a_counted_miss():
    def score_fn(histories):
        return torch.tensor([[0.0, 3, 2, 1]]).expand(len(histories), -1).clone()

    m = evaluate_full_ranking(score_fn, [[1]], [1], num_items=3, ks=(5,))
    assert m["HR@5"] == 0.0 and m["target_in_history"] == 1


def test_ties_are_broken_in_expectation():
    # all 4 items tie: the rank is uniform on 0..3
    hr, nd = expected_hr_ndcg(torch.tensor([0]), torch.tensor([3]), 1)
    assert float(hr) == pytest.approx(0.25) and float(nd) == pytest.approx(0.25)
    hr, nd = expected_hr_ndcg(torch.tensor([0]), torch.tensor([3]), 2)
    assert float(hr) == pytest.approx(0.5)
    assert float(nd) == pytest.approx((1 + 1 / math.log2(3)) / 4)
    # one item above, two tied with the target (ranks 1..3), K = 2 -> only rank 1 hits
    hr, nd = expected_hr_ndcg(torch.tensor([1]), torch.tensor([2]), 2)
    assert float(hr) == pytest.approx(1 / 3) and float(nd) == pytest.approx(1 / math.log2(3) / 3)
    # no ties: plain rank
    hr, nd = expected_hr_ndcg(torch.tensor([4, 7]), torch.tensor([0, 0]), 5)
    assert hr.tolist() == [1.0, 0.0]
    assert nd.tolist() == pytest.approx([1 / math.log2(6), 0.0])


def test_coverage():
    assert catalogue_coverage([[1, 2], [2, 3]], 6) == pytest.approx(0.5)
    acc = RankingAccumulator(num_items=4, ks=(1, 2))
    scores = mask_scores(torch.tensor([[0.0, 4, 3, 2, 1], [0.0, 1, 2, 3, 4]]), None)
    acc.add(scores, torch.tensor([1, 4]))
    r = acc.result()
    assert r["coverage@1"] == pytest.approx(2 / 4) and r["coverage@2"] == pytest.approx(4 / 4)
    assert r["HR@1"] == 1.0


def test_top_k_items_excludes_history_and_pads_short_rows():
    scores = torch.tensor([[9.0, 1, 2, 3], [9.0, 1, 2, 3]])
    idx, val = top_k_items(scores.clone(), [[3], [1, 2, 3]], k=2)
    assert idx.tolist() == [[2, 1], [0, 0]]
    assert torch.isneginf(val[1]).all()
    idx, _ = top_k_items(scores, [[3], []], k=2, exclude_history=False)
    assert idx.tolist() == [[3, 2], [3, 2]]
