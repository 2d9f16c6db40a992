"""Next item: SASRec, co-occurrence, popularity and a blend; the one to serve chosen on validation
(:mod:`.select`), all evaluated on the split (:func:`fit_and_evaluate_nextitem`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from features.events import Event

from ..baselines import CooccurrenceRecommender, PopularityRecommender
from ..labels import item_sequences, next_item_split
from ..metrics import DEFAULT_KS, evaluate_full_ranking
from ..nextitem import NextItemConfig, NextItemRecommender, TrainConfig, VocabRecommender, train_nextitem
from ..recommenders import BlendItemRecommender, BlendScorer, CooccurrenceItemRecommender
from ..sequences import ItemVocab
from .config import TrainingConfig
from .select import select_recommender

#: Candidates serving can load, simplest first (a tie goes to the earlier one).
SERVABLE = ("cooccurrence", "sasrec", "blend")
#: SASRec's share in the blend candidates; the best on validation is the "blend" candidate.
BLEND_WEIGHTS = (0.25, 0.5, 0.75)


def _grouped_eval(
    score_fn: Any, hist: list[list[int]], tgt: list[int], kinds: list[str], weights: list[float], num_items: int
) -> dict[str, Any]:
    overall: dict[str, Any] = evaluate_full_ranking(score_fn, hist, tgt, num_items, DEFAULT_KS)
    by_kind: dict[str, Any] = {}
    num = {f"{m}@{k}": 0.0 for m in ("HR", "NDCG") for k in DEFAULT_KS}
    den = 0.0
    for kind in sorted(set(kinds)):
        idx = [i for i, kk in enumerate(kinds) if kk == kind]
        r = evaluate_full_ranking(score_fn, [hist[i] for i in idx], [tgt[i] for i in idx], num_items, DEFAULT_KS)
        w = weights[idx[0]]
        by_kind[kind] = {"users": len(idx), "weight": w, **{k: r[k] for k in num}}
        for k in num:
            num[k] += w * len(idx) * r[k]
        den += w * len(idx)
    overall["weighted"] = {k: v / den for k, v in num.items()} if den else {}
    overall["by_target_kind"] = by_kind
    return overall


def fit_and_evaluate_nextitem(
    applied: Sequence[Event],
    split_ms: int,
    cfg: TrainingConfig,
) -> tuple[VocabRecommender, dict[str, Any]]:
    """SASRec, co-occurrence, popularity and a SASRec/co-occurrence blend on every shopper's items
    before ``split_ms``.

    Validation: each shopper's last item before the split, predicted from the items before it,
    with every candidate fitted without those targets. The winner there (:data:`SERVABLE`,
    :func:`select_recommender`) is returned, co-occurrence (alone or in the blend) refitted on
    all items before the split; every candidate is also evaluated on the targets after the split (the test split,
    which the choice never sees).
    """
    seqs = item_sequences(applied, cfg.labels)
    nis = next_item_split(seqs, split_ms)
    vocab = ItemVocab.from_sequences(nis.train)
    if len(vocab) < 2:
        raise ValueError("fewer than 2 items before the split; cannot train a next-item model")
    train_idx = [vocab.encode(s) for s in nis.train]
    fit = [s[:-1] for s in train_idx]
    if cfg.nextitem_recent_only:  # quick mode: only each shopper's latest window (max_len transitions)
        fit = [s[-(cfg.nextitem_max_len + 1) :] for s in fit]
    val_in = [s[:-1] for s in train_idx if len(s) >= 2]
    val_tg = [s[-1] for s in train_idx if len(s) >= 2]
    mcfg = NextItemConfig(
        num_items=len(vocab),
        max_len=cfg.nextitem_max_len,
        dim=cfg.nextitem_dim,
        layers=cfg.nextitem_layers,
        heads=cfg.nextitem_heads,
        dropout=cfg.nextitem_dropout,
        attn_dropout=cfg.nextitem_attn_dropout,
    )
    tcfg = TrainConfig(
        epochs=cfg.nextitem_epochs,
        batch_size=cfg.nextitem_batch_size,
        lr=cfg.nextitem_lr,
        patience=cfg.nextitem_patience,
        seed=cfg.seed,
        device=cfg.device,
        progress=cfg.progress,
    )
    t0 = time.perf_counter()
    model, rep = train_nextitem(fit, mcfg, tcfg, val_in, val_tg)
    t_train = time.perf_counter() - t0
    model.cpu()
    held_out = [s[:-1] for s in train_idx]  # validation targets left out of the baselines' fit
    cooc_held_out = CooccurrenceRecommender().fit(held_out, len(vocab))
    blend_weight = BLEND_WEIGHTS[len(BLEND_WEIGHTS) // 2]
    valid_metrics: dict[str, Any] = {}
    if val_tg:
        valid_metrics = {
            name: evaluate_full_ranking(fn, val_in, val_tg, len(vocab), DEFAULT_KS)
            for name, fn in (
                ("sasrec", model.score),
                ("cooccurrence", cooc_held_out.score),
                ("popularity", PopularityRecommender().fit(held_out, len(vocab)).score),
            )
        }
        blends = {
            w: evaluate_full_ranking(BlendScorer(model, cooc_held_out, w).score, val_in, val_tg, len(vocab), DEFAULT_KS)
            for w in BLEND_WEIGHTS
        }
        blend_weight = max(BLEND_WEIGHTS, key=lambda w: (blends[w]["NDCG@10"], blends[w]["HR@10"]))
        valid_metrics["blend"] = blends[blend_weight] | {"sasrec_weight": blend_weight}
        selection = select_recommender(valid_metrics, SERVABLE)
    else:
        selection = {"served": "sasrec", "reason": "no shopper has two items before the split: nothing to validate on"}
    pop = PopularityRecommender().fit(train_idx, len(vocab))
    cooc = CooccurrenceRecommender().fit(train_idx, len(vocab))
    blend = BlendScorer(model, cooc, blend_weight)  # tested and served with the refitted co-occurrence
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    data: dict[str, Any] = {
        "shoppers_with_history": len(nis.train),
        "train_interactions": sum(len(s) for s in train_idx),
        "items": len(vocab),
        "valid_shoppers": len(val_tg),
    }
    for protocol, targets in (("next", nis.next), ("next_new", nis.next_new)):
        hist, tgt, kinds, wts, cold = [], [], [], [], 0
        for h, target, kind, w in zip(targets.history, targets.target, targets.kind, targets.weight, strict=False):
            ti = vocab.index(target)
            if ti == 0:
                cold += 1
                continue
            hist.append(vocab.encode(h))
            tgt.append(ti)
            kinds.append(kind)
            wts.append(w)
        data[protocol] = {
            "eval_shoppers": len(tgt),
            "cold_targets_dropped": cold,
            "target_in_history": int(sum(t in set(h) for h, t in zip(hist, tgt, strict=False))),
        }
        results[protocol] = {}
        if tgt:
            for name, fn in (
                ("sasrec", model.score),
                ("cooccurrence", cooc.score),
                ("popularity", pop.score),
                ("blend", blend.score),
            ):
                results[protocol][name] = _grouped_eval(fn, hist, tgt, kinds, wts, len(vocab))
    t_eval = time.perf_counter() - t0
    info = {
        "metrics": results,
        "protocols": {
            "next": "target = the shopper's first interaction at or after the split; history items are excluded "
            "from the ranking as when serving, so a repeat of a history item is a miss for every method",
            "next_new": "target = the shopper's first interaction at or after the split with an item not in the "
            "history (the items a history-excluding recommender can hit)",
        },
        "data": data,
        "training": {k: v for k, v in rep.to_dict().items() if k != "history"} | {"seconds": t_train},
        "eval_seconds": t_eval,
        "config": mcfg.to_dict(),
        "selection": selection,
        "cooccurrence_config": cooc.config(),
        "blend_weights": {
            "tried": list(BLEND_WEIGHTS),
            "chosen": blend_weight,
            "note": "SASRec's share; chosen on validation NDCG@10",
        },
    }
    if selection["served"] == "cooccurrence":
        return CooccurrenceItemRecommender(cooc, vocab), info
    if selection["served"] == "blend":
        return BlendItemRecommender(blend, vocab), info
    return NextItemRecommender(model, vocab), info
