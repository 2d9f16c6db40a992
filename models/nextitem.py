"""SASRec-family next-item model trained with full-softmax cross-entropy.

Architecture (:class:`SASRec`):

* item embedding ``E`` (``n_items + 1`` rows, row 0 = padding) + learned positional embedding,
  dropout; sequences are **left**-padded so the most recent item always sits at the last
  position;
* ``layers`` pre-LayerNorm transformer blocks with causal multi-head self-attention
  (``torch.nn.functional.scaled_dot_product_attention``; position ``i`` sees items ``<= i``,
  never padding), GELU feed-forward, residual dropout; a final LayerNorm;
* output layer tied to ``E``: ``logits = h @ E.T`` scores the whole catalogue in one matrix
  product. Training minimises cross-entropy over *all* items at every position
  (next item of each prefix), not BCE against sampled negatives.

Inference: :meth:`SASRec.score` gives raw scores for all items from each history's last
position; :meth:`SASRec.recommend` masks padding and (optionally) history items and takes the
top-K. A history with no known items (cold start) falls back to item popularity counted on the
training data (stored in the model as the ``popularity`` buffer, so it travels in artifacts).

:func:`train_nextitem` trains with AdamW, shuffles with a seeded generator, shows tqdm progress,
evaluates full-ranking validation metrics every epoch and stops early when the monitored metric
(default ``NDCG@10``) has not improved for ``patience`` epochs, restoring the best weights.
Deterministic for a given seed on CPU (same thread count); CUDA is used when available unless
``device="cpu"``.

:class:`NextItemRecommender` binds a model to its :class:`~models.sequences.ItemVocab` for the
streaming path (item id strings in, item id strings out) and saves / loads versioned artifacts;
its base :class:`VocabRecommender` is what every served recommender kind shares (the others,
co-occurrence and a blend, are in :mod:`models.recommenders`).
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import DEFAULT_KS, evaluate_full_ranking, top_k_items
from .sequences import ItemVocab, length_buckets, pad_left, training_windows

MODEL_KIND = "nextitem-sasrec-ce"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` / ``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu or auto")
    return dev


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a host-to-GPU copy goes through pinned memory without blocking the host."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class NextItemConfig:
    """Model shape. ``num_items`` excludes the padding row."""

    num_items: int
    max_len: int = 50
    dim: int = 64
    layers: int = 2
    heads: int = 2
    ffn_mult: int = 4
    dropout: float = 0.5
    attn_dropout: float = 0.2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NextItemConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown NextItemConfig fields {sorted(unknown)}")
        return cls(**dict(d))


@dataclass
class TrainConfig:
    """Training hyper-parameters."""

    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    patience: int = 20
    monitor: str = "NDCG@10"
    seed: int = 42
    device: str = "auto"
    eval_batch_size: int = 1024
    grad_clip: float = 5.0
    label_smoothing: float = 0.1
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainReport:
    best_epoch: int = 0
    best_metric: float = float("-inf")
    monitor: str = "NDCG@10"
    epochs_run: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    device: str = "cpu"
    history: list[dict[str, float]] = field(default_factory=list)
    best_valid: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Fewest histories per forward pass in :meth:`SASRec.score` (see :func:`length_buckets`). A pass
#: has a fixed cost of about half a millisecond on a CPU however few rows it holds: a 121-shopper
#: micro-batch took 4.4 ms in six length groups and 1.4 ms padded into one (2-core VM, served model).
MIN_ROWS_PER_PASS = 256


class _Block(nn.Module):
    """Pre-LN transformer block with causal multi-head self-attention."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """Every position's output ``[B, L, dim]`` (``attend``: ``[B, 1, L, L]``)."""
        return self._attend_and_feed(x, x, attend)

    def forward_last(self, x: torch.Tensor, attend_last: torch.Tensor) -> torch.Tensor:
        """Only the last position's output ``[B, 1, dim]``, all positions as keys (``attend_last``: ``[B, 1, 1, L]``).

        Serving needs nothing else from the final block, and this skips L-1 of its queries and feed-forwards.
        """
        return self._attend_and_feed(x, x[:, -1:], attend_last)

    def _attend_and_feed(self, x: torch.Tensor, queries_x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        n_q, head_dim = queries_x.shape[1], d // self.heads
        w_q, w_kv = self.qkv.weight.split([d, 2 * d])
        b_q, b_kv = self.qkv.bias.split([d, 2 * d])
        normed = self.ln1(x)
        q = F.linear(normed[:, -n_q:], w_q, b_q).view(b, n_q, self.heads, head_dim).transpose(1, 2)
        k, v = F.linear(normed, w_kv, b_kv).view(b, length, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attend, dropout_p=self.attn_dropout if self.training else 0.0
        )
        out = queries_x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n_q, d)))
        return out + self.drop(self.ff(self.ln2(out)))


class SASRec(nn.Module):
    """Causal self-attention next-item model with tied input/output item embeddings."""

    popularity: torch.Tensor  # buffer registered in __init__

    def __init__(self, cfg: NextItemConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.num_items + 1
        self.item_emb = nn.Embedding(n, cfg.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            _Block(cfg.dim, cfg.heads, cfg.ffn_mult * cfg.dim, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.layers)
        )
        self.final_ln = nn.LayerNorm(cfg.dim)
        self.register_buffer("popularity", torch.zeros(n))
        self.apply(self._init)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def device(self) -> torch.device:
        return self.item_emb.weight.device

    def encode(self, seqs: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Hidden states ``[B, L, dim]`` for left-padded item indices ``[B, L]`` (``L <= max_len``).

        ``last_only``: just the last position's, ``[B, 1, dim]``, the same values for less work.
        """
        b, length = seqs.shape
        if length > self.cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.cfg.max_len}")
        pad = seqs == 0
        pos = torch.arange(self.cfg.max_len - length, self.cfg.max_len, device=seqs.device)
        x = self.item_emb(seqs) + self.pos_emb(pos).unsqueeze(0)
        x = self.emb_drop(x) * (~pad).unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool, device=seqs.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=seqs.device)
        # attend to earlier non-padding positions; every position may attend to itself so that
        # all-padding rows never produce NaN (their output is ignored anyway)
        attend = (causal & ~pad.unsqueeze(1)) | eye
        attend = attend.unsqueeze(1)  # [B, 1, L, L], broadcast over heads
        blocks = list(self.blocks)
        if last_only:
            for blk in blocks[:-1]:
                x = blk(x, attend)
            last = blocks[-1]
            assert isinstance(last, _Block)
            return self.final_ln(last.forward_last(x, attend[:, :, -1:]))
        for blk in blocks:
            x = blk(x, attend)
        return self.final_ln(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the whole catalogue (column 0 = padding) from hidden states."""
        return hidden @ self.item_emb.weight.T

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Full-softmax cross-entropy of the next item at every non-padding position."""
        h = self.encode(inputs)
        valid = targets != 0
        # logits over real items only (padding row left out): class j <-> item index j + 1
        logits = h[valid] @ self.item_emb.weight[1:].T
        return F.cross_entropy(logits, targets[valid] - 1, label_smoothing=label_smoothing)

    @torch.no_grad()
    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Raw scores ``[B, n_items + 1]`` (on the model's device) for each history's next item.

        Empty histories get the popularity buffer (cold-start fallback).
        """
        was_training = self.training
        self.eval()
        try:
            hidden = torch.zeros(len(histories), self.cfg.dim, device=self.device)
            for rows, seqs in length_buckets(histories, self.cfg.max_len, MIN_ROWS_PER_PASS):
                hidden[to_device(rows, self.device)] = self.encode(to_device(seqs, self.device), last_only=True)[:, 0]
            scores = self.logits(hidden)
            empty = torch.tensor([len(h) == 0 for h in histories], device=self.device)
            if bool(empty.any()):
                scores[empty] = self.popularity.to(scores.dtype)
            return scores
        finally:
            self.train(was_training)

    @torch.no_grad()
    def recommend(
        self, histories: Sequence[Sequence[int]], k: int = 10, exclude_history: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` item indices and scores per history (CPU tensors; index 0 = no item left)."""
        idx, val = top_k_items(self.score(histories), histories, k, exclude_history)
        return idx.cpu(), val.cpu()


def popularity_counts(sequences: Sequence[Sequence[int]], num_items: int) -> torch.Tensor:
    """Interactions per item index (``float32 [num_items + 1]``, padding 0 counts nothing): SASRec's
    cold-start fallback and the popularity baseline, counted the same way."""
    counts = np.zeros(num_items + 1, dtype=np.float32)
    for seq in sequences:
        if len(seq):
            np.add.at(counts, np.asarray(seq, dtype=np.int64), 1.0)
    counts[0] = 0.0
    return torch.from_numpy(counts)


def train_nextitem(
    train_sequences: Sequence[Sequence[int]],
    model_cfg: NextItemConfig,
    train_cfg: TrainConfig | None = None,
    valid_inputs: Sequence[Sequence[int]] | None = None,
    valid_targets: Sequence[int] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> tuple[SASRec, TrainReport]:
    """Train a :class:`SASRec` on index sequences (each in chronological order).

    Every (prefix, next item) pair of ``train_sequences`` is a training example. With
    ``valid_inputs`` / ``valid_targets`` the model is evaluated after each epoch (full ranking,
    history excluded); training stops when ``train_cfg.monitor`` has not improved for
    ``train_cfg.patience`` epochs and the best weights are restored. Without validation data
    it trains for ``train_cfg.epochs`` epochs.
    """
    tc = train_cfg or TrainConfig()
    seed_everything(tc.seed)
    device = resolve_device(tc.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = SASRec(model_cfg)
    model.popularity.copy_(popularity_counts(train_sequences, model_cfg.num_items))
    model.to(device)

    windows = training_windows(train_sequences, model_cfg.max_len)
    if not windows:
        raise ValueError("no training sequence has 2 or more items; nothing to learn from")
    data = pad_left(windows, model_cfg.max_len + 1)
    data = data.to(device)  # small: keep the whole training set on the device
    inputs_all, targets_all = data[:, :-1], data[:, 1:]

    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        (no_decay if p.ndim < 2 else decay).append(p)  # no decay on biases and LayerNorm gains
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr
    )
    gen = torch.Generator().manual_seed(tc.seed)
    report = TrainReport(monitor=tc.monitor, device=str(device))
    use_valid = valid_inputs is not None and valid_targets is not None and len(valid_targets) > 0
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs = 0
    t0 = time.perf_counter()

    from tqdm.auto import tqdm

    epoch_bar = tqdm(range(1, tc.epochs + 1), desc="epochs", disable=not tc.progress, dynamic_ncols=True)
    for epoch in epoch_bar:
        model.train()
        perm = torch.randperm(len(data), generator=gen)
        total, steps = 0.0, 0
        batches = range(0, len(perm), tc.batch_size)
        for s in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not tc.progress, dynamic_ncols=True):
            idx = perm[s : s + tc.batch_size].to(device)
            x, y = inputs_all[idx], targets_all[idx]
            loss = model.loss(x, y, tc.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip and tc.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            with torch.no_grad():
                model.item_emb.weight[0].zero_()
            total += float(loss.detach())
            steps += 1
        row: dict[str, float] = {"epoch": float(epoch), "loss": total / max(steps, 1)}
        report.epochs_run = epoch
        if use_valid:
            model.eval()
            assert valid_inputs is not None and valid_targets is not None  # use_valid says so
            metrics = evaluate_full_ranking(
                model.score, valid_inputs, valid_targets, model_cfg.num_items, DEFAULT_KS, tc.eval_batch_size
            )
            row.update({k: v for k, v in metrics.items() if k.startswith(("HR@", "NDCG@"))})
            current = metrics[tc.monitor]
            if current > report.best_metric:
                report.best_metric, report.best_epoch = current, epoch
                report.best_valid = dict(metrics)
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                bad_epochs = 0
            else:
                bad_epochs += 1
        report.history.append(row)
        if tc.progress:
            postfix = {"loss": f"{row['loss']:.4f}"}
            if use_valid:
                postfix[tc.monitor] = f"{row[tc.monitor]:.4f}"
                postfix["best"] = f"{report.best_metric:.4f}@{report.best_epoch}"
            # sorted: the order tqdm gave these when they were passed as keyword arguments
            epoch_bar.set_postfix(dict(sorted(postfix.items())))
        if on_epoch is not None:
            on_epoch(row)
        if use_valid and bad_epochs >= tc.patience:
            report.stopped_early = True
            break
    epoch_bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    elif not use_valid:
        report.best_epoch = report.epochs_run
    report.train_seconds = time.perf_counter() - t0
    model.eval()
    return model, report


class VocabRecommender(ABC):
    """What every served next-item recommender shares: item id strings in and out around an
    index-level scorer, and versioned artifacts (kind and config in the metadata, weights as
    safetensors, the vocabulary beside them). Serving only calls :meth:`recommend`, so the
    registry may hold any subclass (:func:`models.recommenders.load_recommender` picks by kind)."""

    kind = ""

    def __init__(self, vocab: ItemVocab, num_items: int, version: str | None = None) -> None:
        """``num_items``: the catalogue size the model was built or fitted for; it must be the vocabulary's."""
        if len(vocab) != num_items:
            raise ValueError(f"vocabulary has {len(vocab)} items but the model was built for {num_items}")
        self.vocab = vocab
        self.version = version
        self._id_of_index = ["", *vocab.items]  # item index -> item id (0: padding, no item)

    @abstractmethod
    def to(self, device: str | torch.device | None) -> VocabRecommender:
        """Move the model(s) to ``device``."""

    @abstractmethod
    def _top_k(self, histories: list[list[int]], k: int, exclude_history: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` item indices and scores per index history (CPU tensors; ``0`` = no item left)."""

    @abstractmethod
    def _weights(self) -> dict[str, torch.Tensor]:
        """The artifact's tensors (CPU)."""

    @abstractmethod
    def _config(self) -> dict[str, Any]:
        """The artifact's ``config`` (what :meth:`load` rebuilds the model from)."""

    def encode(self, histories: Sequence[Sequence[str]]) -> list[list[int]]:
        """Item id strings -> indices, dropping items unknown to the model."""
        return [self.vocab.encode(h) for h in histories]

    def recommend(
        self, histories: Sequence[Sequence[str]], k: int = 10, exclude_history: bool = True
    ) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(item_id, score)`` per history, one batched pass.

        Items unknown to the model are ignored; a history with no known item gets the
        popularity fallback. ``exclude_history`` removes items the shopper already had.
        """
        enc = self.encode(histories)
        if not enc:
            return []
        idx, val = self._top_k(enc, k, exclude_history)
        id_of = self._id_of_index
        return [
            [(id_of[i], v) for i, v in zip(irow, vrow, strict=False) if i]
            for irow, vrow in zip(idx.tolist(), val.tolist(), strict=False)
        ]

    def save(
        self,
        directory: str | Path,
        version: str,
        metrics: Mapping[str, Any] | None = None,
        training_data: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a versioned artifact directory (see :mod:`models.artifacts`)."""
        from .artifacts import save_artifact

        self.version = version
        return save_artifact(
            directory,
            self._weights(),
            kind=self.kind,
            version=version,
            config=self._config(),
            vocab=self.vocab.items,
            feature_spec_hash=None,
            metrics=dict(metrics or {}),
            training_data=dict(training_data or {}),
            extra=dict(extra or {}),
        )


class NextItemRecommender(VocabRecommender):
    """A trained :class:`SASRec` plus its item vocabulary."""

    kind = MODEL_KIND

    def __init__(self, model: SASRec, vocab: ItemVocab, version: str | None = None) -> None:
        super().__init__(vocab, model.cfg.num_items, version)
        self.model = model.eval()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: str | torch.device | None) -> NextItemRecommender:
        self.model.to(resolve_device(device))
        return self

    def _top_k(self, histories: list[list[int]], k: int, exclude_history: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.recommend(histories, k, exclude_history)

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def _config(self) -> dict[str, Any]:
        return self.model.cfg.to_dict()

    @classmethod
    def load(
        cls,
        directory: str | Path,
        device: str | torch.device | None = "cpu",
        expected_vocab_sha256: str | None = None,
    ) -> NextItemRecommender:
        """Load and verify an artifact written by :meth:`save`; raises ``ArtifactError``."""
        from .artifacts import ArtifactError, load_artifact

        art = load_artifact(directory, expected_kind=MODEL_KIND, expected_vocab_sha256=expected_vocab_sha256)
        try:
            cfg = NextItemConfig.from_dict(art.metadata["config"])
            model = SASRec(cfg)
            model.load_state_dict(art.state_dict, strict=True)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ArtifactError(
                f"artifact {directory} does not match the {MODEL_KIND} model code ({exc}); "
                "retrain the model or load it with the code version that wrote it"
            ) from exc
        assert art.vocab is not None
        rec = cls(model, ItemVocab(art.vocab), version=art.metadata.get("version"))
        return rec.to(device)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
