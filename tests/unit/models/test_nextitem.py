"""SASRec-CE next-item model: learns a predictable pattern, determinism, cold start, exclusion."""

from __future__ import annotations

import random

import pytest
import torch

from models.baselines import PopularityRecommender
from models.metrics import evaluate_full_ranking
from models.nextitem import NextItemConfig, NextItemRecommender, SASRec, TrainConfig, train_nextitem
from models.sequences import ItemVocab, leave_one_out, length_buckets, pad_left, training_windows

torch.set_num_threads(1)

N_ITEMS = 20


def cyclic_sequences(n_users: int, length: int, seed: int) -> list[list[int]]:
    """Each user walks the cycle 1 -> 2 -> ... -> 20 -> 1 from a random start."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_users):
        start = rng.randrange(N_ITEMS)
        out.append([(start + i) % N_ITEMS + 1 for i in range(length)])
    return out


SMALL = NextItemConfig(
    num_items=N_ITEMS, max_len=6, dim=16, layers=1, heads=2, ffn_mult=2, dropout=0.1, attn_dropout=0.0
)


def fast_train(seed: int = 0, epochs: int = 12, **kw):
    seqs = cyclic_sequences(120, 7, seed=1)
    split = leave_one_out([str(i) for i in range(len(seqs))], seqs)
    tc = TrainConfig(
        epochs=epochs,
        batch_size=32,
        lr=1e-2,
        weight_decay=0.0,
        patience=50,
        seed=seed,
        device="cpu",
        progress=False,
        label_smoothing=0.0,
        **kw,
    )
    model, report = train_nextitem(split.train, SMALL, tc, split.valid_input, split.valid_target)
    return model, report, split


def test_learns_predictable_pattern_far_above_popularity():
    model, report, split = fast_train()
    ours = evaluate_full_ranking(model.score, split.test_input, split.test_target, N_ITEMS, ks=(1, 5))
    pop = PopularityRecommender().fit(split.train, N_ITEMS)
    base = evaluate_full_ranking(pop.score, split.test_input, split.test_target, N_ITEMS, ks=(1, 5))
    assert ours["HR@1"] > 0.9, ours
    assert ours["HR@1"] > base["HR@1"] + 0.5
    assert report.best_epoch >= 1 and report.epochs_run == 12
    assert report.history[-1]["loss"] < report.history[0]["loss"]


def test_best_weights_are_restored_after_early_stopping():
    model, report, split = fast_train(epochs=8)
    again = evaluate_full_ranking(model.score, split.valid_input, split.valid_target, N_ITEMS)
    assert again["NDCG@10"] == pytest.approx(report.best_metric)
    assert report.best_valid["NDCG@10"] == pytest.approx(report.best_metric)


def test_early_stopping_stops():
    seqs = [[1, 2, 3, 4]] * 4
    split = leave_one_out(list("abcd"), seqs)
    tc = TrainConfig(epochs=50, patience=2, lr=0.0, device="cpu", progress=False)
    _, report = train_nextitem(
        split.train, NextItemConfig(num_items=4, max_len=4, dim=8, layers=1), tc, split.valid_input, split.valid_target
    )
    assert report.stopped_early and report.epochs_run == 3 and report.best_epoch == 1


def test_deterministic_with_seed():
    m1, r1, _ = fast_train(seed=3, epochs=2)
    m2, r2, _ = fast_train(seed=3, epochs=2)
    m3, _, _ = fast_train(seed=4, epochs=2)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert [h["loss"] for h in r1.history] == [h["loss"] for h in r2.history]
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_history_exclusion_and_cold_start():
    model = SASRec(NextItemConfig(num_items=6, max_len=4, dim=8, layers=1))
    model.popularity.copy_(torch.tensor([0.0, 1, 9, 3, 7, 5, 2]))
    idx, val = model.recommend([[], [2, 4]], k=6)
    assert idx[0, :3].tolist() == [2, 4, 5]  # cold start: popularity order
    assert 0 not in idx[0].tolist()
    assert not ({2, 4} & set(idx[1, :4].tolist())) and idx[1, 4:].tolist() == [0, 0]
    idx, _ = model.recommend([[2, 4]], k=6, exclude_history=False)
    assert sorted(idx[0].tolist()) == [1, 2, 3, 4, 5, 6]


def test_padding_does_not_change_the_prediction():
    torch.manual_seed(0)
    model = SASRec(NextItemConfig(num_items=9, max_len=8, dim=8, layers=2)).eval()
    short = model.encode(pad_left([[3, 5, 7]], 3))[:, -1]
    long = model.encode(pad_left([[3, 5, 7]], 8))[:, -1]
    # positional embeddings are aligned to the right end, so left padding is invisible
    assert torch.allclose(short, long, atol=1e-5)
    assert torch.isfinite(model.score([[1], [2, 3]])).all()


def test_training_windows_keep_every_transition():
    wins = training_windows([[1, 2, 3, 4, 5, 6, 7], [1], [8, 9]], max_len=3)
    pairs = {(w[i], w[i + 1]) for w in wins for i in range(len(w) - 1)}
    assert pairs == {(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (8, 9)}
    assert all(len(w) <= 4 for w in wins)


def test_recommender_speaks_item_ids():
    vocab = ItemVocab([f"sku{i}" for i in range(1, N_ITEMS + 1)])
    model, _, _ = fast_train()
    rec = NextItemRecommender(model, vocab)
    out = rec.recommend([["sku3", "sku4", "unknown"], []], k=3)
    assert out[0][0][0] == "sku5"
    assert len(out[1]) == 3 and all(isinstance(s, float) for _, s in out[1])
    with pytest.raises(ValueError):
        NextItemRecommender(model, ItemVocab(["a"]))


def test_vocab_roundtrip():
    v = ItemVocab.from_sequences([["10", "2"], ["2", "33"]])
    assert v.items == ["2", "10", "33"]
    assert v.encode(["33", "x", "2"]) == [3, 1]
    assert v.decode([1, 3]) == ["2", "33"]
    assert ItemVocab.from_json(v.to_json()) == v and ItemVocab.from_json(v.to_json()).sha256() == v.sha256()
    with pytest.raises(IndexError):
        v.decode([0])


def test_serving_path_matches_the_full_forward_pass():
    """score() pads per length group and computes only the last position: same scores as the full pass."""
    torch.manual_seed(0)
    rng = random.Random(0)
    model = SASRec(NextItemConfig(num_items=300)).eval()
    histories = [[rng.randint(1, 300) for _ in range(rng.choice([0, 1, 2, 5, 9, 17, 40, 50, 70]))] for _ in range(200)]
    with torch.no_grad():
        served = model.score(histories)
        padded = pad_left(histories, model.cfg.max_len)
        full = model.logits(model.encode(padded)[:, -1])
        full[padded[:, -1] == 0] = model.popularity
    assert torch.allclose(served, full, atol=1e-5), f"max difference {(served - full).abs().max():.2e}"


def test_length_buckets_cover_every_row_once_padded_to_their_own_longest():
    histories = [[1] * n for n in (0, 1, 3, 4, 5, 8, 9, 60)]
    buckets = length_buckets(histories, max_len=50)
    rows = sorted(int(r) for rows, _ in buckets for r in rows)
    assert rows == list(range(len(histories)))
    widths = {tuple(int(r) for r in rows): seqs.shape[1] for rows, seqs in buckets}
    assert widths == {(0, 1): 1, (2, 3): 4, (4, 5): 8, (6,): 9, (7,): 50}


def test_length_buckets_join_small_groups_into_the_next_longer_ones():
    histories = [[1] * n for n in (0, 1, 3, 4, 5, 8, 9, 60)]
    buckets = length_buckets(histories, max_len=50, min_rows=3)
    widths = {tuple(sorted(int(r) for r in rows)): seqs.shape[1] for rows, seqs in buckets}
    assert widths == {(0, 1, 2, 3): 4, (4, 5, 6): 9, (7,): 50}  # the last group may stay small
    ((rows, seqs),) = length_buckets(histories, max_len=50, min_rows=len(histories))
    assert sorted(int(r) for r in rows) == list(range(len(histories))) and seqs.shape == (len(histories), 50)
    assert seqs[0].tolist() == [0] * 50 and seqs[2].tolist() == [0] * 47 + [1] * 3
