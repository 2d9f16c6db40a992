"""The next-item recommenders serving can load, and :func:`load_recommender`, which picks by kind.

Training registers whichever candidate won on validation under the ``nextitem`` registry name:
SASRec (:class:`models.nextitem.NextItemRecommender`), item co-occurrence
(:class:`CooccurrenceItemRecommender` around :class:`CooccurrenceRecommender`, which is also
the evaluation baseline) or a blend of the two (:class:`BlendItemRecommender`). All keep the serving interface
``recommend(histories, k)`` (item id strings in and out) and the same artifact format, so
:class:`models.scoring.BatchScorer` loads any of them through :func:`load_recommender`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifacts import ArtifactError, load_artifact, read_metadata
from .metrics import top_k_items
from .nextitem import MODEL_KIND as SASREC_KIND
from .nextitem import (
    NextItemConfig,
    NextItemRecommender,
    SASRec,
    VocabRecommender,
    popularity_counts,
    resolve_device,
    to_device,
)
from .sequences import ItemVocab

COOCCURRENCE_KIND = "nextitem-cooccurrence"
BLEND_KIND = "nextitem-blend"


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
        self._ct: torch.Tensor | None = None  # C transposed, sparse COO [n+1, n+1] (the artifact's form)
        # C by rows (compressed sparse row): where item a's row starts in the two arrays below,
        # then the items that follow a and their weights; see :meth:`score`
        self._row_starts = torch.zeros(1, dtype=torch.long)
        self._next_items = torch.zeros(0, dtype=torch.long)
        self._next_weights = torch.zeros(0)
        self._pop = torch.zeros(1)

    def fit(self, sequences: Sequence[Sequence[int]], num_items: int) -> CooccurrenceRecommender:
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
        # the artifact stores the transpose (its format since the first release)
        self._ct = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([t, s])), torch.from_numpy(w), (n, n), check_invariants=False
        ).coalesce()
        self._index_rows()
        pop = popularity_counts(sequences, num_items)
        self._pop = pop / max(float(pop.max()), 1.0)
        self.num_items = int(num_items)
        return self

    def config(self) -> dict[str, float | int]:
        """The hyper-parameters and catalogue size (an artifact's ``config``)."""
        return {
            "window": self.window,
            "history_len": self.history_len,
            "decay": self.decay,
            "pop_weight": self.pop_weight,
            "num_items": self.num_items,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fitted state as plain tensors (an artifact's weights): C^T as COO indices and values."""
        if self._ct is None:
            raise RuntimeError("CooccurrenceRecommender.fit() must be called before tensors()")
        return {
            "ct_indices": self._ct.indices().cpu(),
            "ct_values": self._ct.values().cpu(),
            "popularity": self._pop.cpu(),
        }

    @classmethod
    def from_tensors(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> CooccurrenceRecommender:
        """The inverse of :meth:`config` + :meth:`tensors` (loading an artifact)."""
        rec = cls(
            int(config["window"]), int(config["history_len"]), float(config["decay"]), float(config["pop_weight"])
        )
        rec.num_items = int(config["num_items"])
        n = rec.num_items + 1
        if tuple(tensors["popularity"].shape) != (n,):
            raise ValueError(f"popularity has shape {tuple(tensors['popularity'].shape)}, expected ({n},)")
        # checked: indices out of range in a damaged artifact would otherwise crash the process later
        rec._ct = torch.sparse_coo_tensor(
            tensors["ct_indices"], tensors["ct_values"], (n, n), check_invariants=True
        ).coalesce()
        rec._index_rows()
        rec._pop = tensors["popularity"]
        return rec

    def _index_rows(self) -> None:
        """C's rows in compressed form, from the stored transpose (on its device)."""
        assert self._ct is not None
        by_row = self._ct.t().coalesce()  # sorted by row, then column
        rows, cols = by_row.indices()
        starts = torch.zeros(by_row.shape[0] + 1, dtype=torch.long, device=rows.device)
        starts[1:] = torch.cumsum(torch.bincount(rows, minlength=by_row.shape[0]), 0)
        self._row_starts, self._next_items, self._next_weights = starts, cols, by_row.values()

    def to(self, device: torch.device) -> CooccurrenceRecommender:
        if self._ct is not None:
            self._ct = self._ct.to(device)
        self._row_starts = self._row_starts.to(device)
        self._next_items = self._next_items.to(device)
        self._next_weights = self._next_weights.to(device)
        self._pop = self._pop.to(device)
        return self

    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[B, n + 1]`` scores: per history, its last items' rows of C added up with their decay
        weights, gathered from the compressed rows (a history of 3 items touches 3 rows, where a
        product with a dense ``[n + 1, B]`` history matrix costs 10x more at a few thousand items)."""
        if self._ct is None:
            raise RuntimeError("CooccurrenceRecommender.fit() must be called before score()")
        shoppers: list[int] = []
        items: list[int] = []
        weights: list[float] = []
        for row, hist in enumerate(histories):
            for j, item in enumerate(list(hist[-self.history_len :])[::-1]):
                shoppers.append(row)
                items.append(int(item))
                weights.append(self.decay**j)
        device = self._pop.device
        # the lists become tensors on the CPU, each copied to the device once (element-wise
        # writes on a GPU would be one launch each)
        item_at = to_device(torch.tensor(items, dtype=torch.long), device)
        starts = self._row_starts[item_at]
        lengths = self._row_starts[item_at + 1] - starts
        # every (history item, next item) pair: its shopper, its weight and its place in C's rows
        shopper_of = torch.repeat_interleave(to_device(torch.tensor(shoppers, dtype=torch.long), device), lengths)
        weight_of = torch.repeat_interleave(to_device(torch.tensor(weights, dtype=torch.float32), device), lengths)
        skip = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths - starts, lengths)
        at = torch.arange(shopper_of.shape[0], device=device) - skip
        scores = torch.zeros(len(histories), self.num_items + 1, device=device)
        scores.index_put_((shopper_of, self._next_items[at]), self._next_weights[at] * weight_of, accumulate=True)
        return scores.add_(self.pop_weight * self._pop.unsqueeze(0))

    def recommend(self, histories: Sequence[Sequence[int]], k: int = 10, exclude_history: bool = True):
        return top_k_items(self.score(histories), histories, k, exclude_history)


class CooccurrenceItemRecommender(VocabRecommender):
    """A fitted :class:`models.baselines.CooccurrenceRecommender` plus its item vocabulary."""

    kind = COOCCURRENCE_KIND

    def __init__(self, model: CooccurrenceRecommender, vocab: ItemVocab, version: str | None = None) -> None:
        super().__init__(vocab, model.num_items, version)
        self.model = model

    def to(self, device: str | torch.device | None) -> CooccurrenceItemRecommender:
        self.model.to(resolve_device(device))
        return self

    def _top_k(self, histories: list[list[int]], k: int, exclude_history: bool) -> tuple[torch.Tensor, torch.Tensor]:
        idx, val = top_k_items(self.model.score(histories), histories, k, exclude_history)
        return idx.cpu(), val.cpu()

    def _weights(self) -> dict[str, torch.Tensor]:
        return self.model.tensors()

    def _config(self) -> dict[str, Any]:
        return dict(self.model.config())

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = "cpu") -> CooccurrenceItemRecommender:
        """Load and verify an artifact written by :meth:`save`; raises ``ArtifactError``."""
        art = load_artifact(directory, expected_kind=COOCCURRENCE_KIND)
        try:
            model = CooccurrenceRecommender.from_tensors(art.metadata["config"], art.state_dict)
            rec = cls(model, ItemVocab(art.vocab or []), version=art.metadata.get("version"))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ArtifactError(
                f"artifact {directory} does not match the {COOCCURRENCE_KIND} model code ({exc}); "
                "retrain the model or load it with the code version that wrote it"
            ) from exc
        return rec.to(device)


class BlendScorer:
    """``weight * P_sasrec + (1 - weight) * P_cooc``: each model's scores made a distribution over
    the items (SASRec by softmax, co-occurrence by its row sum), so neither scale dominates.
    Same ``score(histories) -> [B, n + 1]`` interface as the models it blends."""

    def __init__(self, sasrec: SASRec, cooc: CooccurrenceRecommender, weight: float) -> None:
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"blend weight must be in [0, 1], not {weight}")
        if sasrec.cfg.num_items != cooc.num_items:
            raise ValueError(f"SASRec has {sasrec.cfg.num_items} items, co-occurrence {cooc.num_items}")
        self.sasrec, self.cooc, self.weight = sasrec, cooc, float(weight)

    @torch.no_grad()
    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        s = self.sasrec.score(histories)
        c = self.cooc.score(histories).to(s.device)[:, 1:]
        out = torch.zeros_like(s)
        out[:, 1:] = self.weight * torch.softmax(s[:, 1:], dim=1) + (1.0 - self.weight) * c / c.sum(
            dim=1, keepdim=True
        ).clamp_min(1e-12)
        return out


class BlendItemRecommender(VocabRecommender):
    """A :class:`BlendScorer` plus its item vocabulary; both models travel in one artifact."""

    kind = BLEND_KIND

    def __init__(self, blend: BlendScorer, vocab: ItemVocab, version: str | None = None) -> None:
        super().__init__(vocab, blend.cooc.num_items, version)
        self.blend = blend

    def to(self, device: str | torch.device | None) -> BlendItemRecommender:
        dev = resolve_device(device)
        self.blend.sasrec.to(dev)
        self.blend.cooc.to(dev)
        return self

    def _top_k(self, histories: list[list[int]], k: int, exclude_history: bool) -> tuple[torch.Tensor, torch.Tensor]:
        idx, val = top_k_items(self.blend.score(histories), histories, k, exclude_history)
        return idx.cpu(), val.cpu()

    def _weights(self) -> dict[str, torch.Tensor]:
        sasrec = {f"sasrec.{k}": v.detach().cpu() for k, v in self.blend.sasrec.state_dict().items()}
        return sasrec | {f"cooc.{k}": v for k, v in self.blend.cooc.tensors().items()}

    def _config(self) -> dict[str, Any]:
        return {
            "sasrec": self.blend.sasrec.cfg.to_dict(),
            "cooccurrence": dict(self.blend.cooc.config()),
            "sasrec_weight": self.blend.weight,
        }

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = "cpu") -> BlendItemRecommender:
        """Load and verify an artifact written by :meth:`save`; raises ``ArtifactError``."""
        art = load_artifact(directory, expected_kind=BLEND_KIND)
        config = art.metadata["config"]
        parts: dict[str, dict[str, torch.Tensor]] = {"sasrec": {}, "cooc": {}}
        try:
            for name, tensor in art.state_dict.items():
                prefix, _, rest = name.partition(".")
                parts[prefix][rest] = tensor
            sasrec = SASRec(NextItemConfig.from_dict(config["sasrec"]))
            sasrec.load_state_dict(parts["sasrec"], strict=True)
            cooc = CooccurrenceRecommender.from_tensors(config["cooccurrence"], parts["cooc"])
            blend = BlendScorer(sasrec.eval(), cooc, float(config["sasrec_weight"]))
            rec = cls(blend, ItemVocab(art.vocab or []), version=art.metadata.get("version"))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ArtifactError(
                f"artifact {directory} does not match the {BLEND_KIND} model code ({exc}); "
                "retrain the model or load it with the code version that wrote it"
            ) from exc
        return rec.to(device)


def load_recommender(directory: str | Path, device: str | torch.device | None = "cpu") -> VocabRecommender:
    """Load whichever served next-item kind the artifact holds; ``ArtifactError`` for any other."""
    kind = read_metadata(directory).get("kind")
    if kind == COOCCURRENCE_KIND:
        return CooccurrenceItemRecommender.load(directory, device=device)
    if kind == BLEND_KIND:
        return BlendItemRecommender.load(directory, device=device)
    if kind == SASREC_KIND:
        return NextItemRecommender.load(directory, device=device)
    raise ArtifactError(
        f"artifact {directory} holds a {kind!r} model, not a next-item recommender "
        f"({SASREC_KIND!r}, {COOCCURRENCE_KIND!r} or {BLEND_KIND!r}); point the nextitem model at the "
        "right artifact"
    )
