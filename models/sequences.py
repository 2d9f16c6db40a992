"""Item vocabulary and interaction-sequence data for the next-item model.

Pure Python + numpy + torch; no Kafka, no Faust.

* :class:`ItemVocab` maps external item id strings to dense indices ``1..n`` (``0`` is padding)
  and back. Its :meth:`ItemVocab.sha256` identifies it in a model artifact.
* :func:`read_sequences` reads the ``user item item ...`` text format (one user a line, items in
  chronological order), e.g. ``../shared/data/amazon-toys/Toys_and_Games.txt``.
* :func:`leave_one_out` splits sequences the SASRec / S3-Rec / ICLRec way: last item = test
  target, second-to-last = validation target, everything before = training input.
* :func:`pad_left` turns histories into the left-padded ``[B, L]`` index matrix the model reads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PAD = 0


class ItemVocab:
    """External item ids (strings) <-> dense indices ``1..len(self)``; index 0 is padding."""

    __slots__ = ("_items", "_index")

    def __init__(self, items: Iterable[str]) -> None:
        items = [str(i) for i in items]
        index: dict[str, int] = {}
        for pos, item in enumerate(items, start=1):
            if item in index:
                raise ValueError(f"duplicate item id {item!r} in vocabulary; ids must be unique")
            index[item] = pos
        self._items: list[str] = items
        self._index = index

    @classmethod
    def from_sequences(cls, sequences: Iterable[Sequence[str]]) -> ItemVocab:
        """Vocabulary of every item seen, numerically sorted when all ids are integers."""
        seen: set[str] = set()
        for seq in sequences:
            seen.update(seq)
        if all(s.isdigit() for s in seen):
            return cls(sorted(seen, key=int))
        return cls(sorted(seen))

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ItemVocab) and self._items == other._items

    def __hash__(self) -> int:  # pragma: no cover - rarely used
        return hash(tuple(self._items))

    @property
    def items(self) -> list[str]:
        """Item ids in index order (index ``i`` is ``items[i - 1]``)."""
        return list(self._items)

    @property
    def num_items(self) -> int:
        return len(self._items)

    def index(self, item: str) -> int:
        """Index of ``item``; 0 (padding) when unknown."""
        return self._index.get(item, PAD)

    def encode(self, items: Iterable[str]) -> list[int]:
        """Indices of the known items, in order; unknown items are dropped."""
        return [i for i in map(self._index.get, map(str, items)) if i]  # unknown: None; PAD (0) is no item

    def decode(self, indices: Iterable[int]) -> list[str]:
        """Item ids for indices ``>= 1``; raises ``IndexError`` on padding / out of range."""
        out = []
        for i in indices:
            i = int(i)
            if i < 1 or i > len(self._items):
                raise IndexError(f"item index {i} outside 1..{len(self._items)}")
            out.append(self._items[i - 1])
        return out

    def sha256(self) -> str:
        """Stable fingerprint of the vocabulary (order matters)."""
        return hashlib.sha256(json.dumps(self._items, separators=(",", ":")).encode("utf-8")).hexdigest()

    def to_json(self) -> str:
        return json.dumps(self._items, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ItemVocab:
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError("vocabulary JSON must be a list of item id strings")
        return cls(data)


def read_sequences(path: str | Path, limit_users: int | None = None) -> list[tuple[str, list[str]]]:
    """Read ``user item item ...`` lines; returns ``[(user_id, [item_id, ...]), ...]``.

    Blank lines are skipped; a line with a user and no items is kept with an empty list.
    """
    out: list[tuple[str, list[str]]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.split()
            if not parts:
                continue
            out.append((parts[0], parts[1:]))
            if limit_users is not None and len(out) >= limit_users:
                break
    return out


@dataclass(frozen=True)
class LeaveOneOut:
    """Leave-one-out split of encoded sequences (indices into an :class:`ItemVocab`).

    Only users with at least 3 interactions take part (one for training input, one for
    validation, one for test), as in the published protocol (5-core data has >= 5 anyway).

    Attributes:
        users: user ids, aligned with the lists below.
        train: ``seq[:-2]`` per user: the only data the model is trained on.
        valid_target: ``seq[-2]``; its input (and excluded history) is ``train``.
        test_input: ``seq[:-1]``: input and excluded history for the test target.
        test_target: ``seq[-1]``.
    """

    users: list[str]
    train: list[list[int]]
    valid_target: list[int]
    test_input: list[list[int]]
    test_target: list[int]

    @property
    def valid_input(self) -> list[list[int]]:
        return self.train


def leave_one_out(users: Sequence[str], sequences: Sequence[Sequence[int]]) -> LeaveOneOut:
    u, tr, vt, ti, tt = [], [], [], [], []
    for user, seq in zip(users, sequences, strict=False):
        if len(seq) < 3:
            continue
        seq = list(seq)
        u.append(user)
        tr.append(seq[:-2])
        vt.append(seq[-2])
        ti.append(seq[:-1])
        tt.append(seq[-1])
    return LeaveOneOut(u, tr, vt, ti, tt)


def pad_left(histories: Sequence[Sequence[int]], max_len: int) -> torch.Tensor:
    """Left-padded ``[B, max_len]`` int64 matrix of the last ``max_len`` items of each history."""
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for row, hist in enumerate(histories):
        if len(hist) == 0:
            continue
        tail = list(hist[-max_len:])
        out[row, max_len - len(tail) :] = tail
    return torch.from_numpy(out)


def length_buckets(
    histories: Sequence[Sequence[int]], max_len: int, min_rows: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Group histories of similar length: ``(row indices, left-padded [rows, L])`` per group.

    Each group is padded only to its own longest history (capped at ``max_len``); lengths are
    grouped by powers of two, so a batch of short histories never pays for one long one.
    Empty histories fall in the shortest group as an all-padding row. Groups of fewer than
    ``min_rows`` rows are joined with the next longer ones (the last group may stay smaller):
    every group costs a forward pass, whose fixed cost outweighs the padding for small groups.
    """
    lengths = np.minimum(np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories)), max_len)
    group_of = np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    buckets = []
    pending: list[np.ndarray] = []  # row indices of the groups not yet given a pass
    groups = np.unique(group_of)
    for n, group in enumerate(groups, start=1):
        pending.append(np.flatnonzero(group_of == group))
        rows = np.concatenate(pending)
        if len(rows) < min_rows and n < len(groups):
            continue
        width = max(1, int(lengths[rows].max()))
        buckets.append((torch.from_numpy(rows), pad_left([histories[r] for r in rows], width)))
        pending = []
    return buckets


def training_windows(sequences: Sequence[Sequence[int]], max_len: int) -> list[list[int]]:
    """Cut training sequences into windows of at most ``max_len + 1`` items.

    Each window gives ``max_len`` (input, next item) pairs. The most recent window always ends
    at the last item; longer sequences contribute further windows towards their start
    (stride ``max_len``) so no transition is lost. Sequences with < 2 items give nothing.
    """
    out: list[list[int]] = []
    span = max_len + 1
    for seq in sequences:
        seq = list(seq)
        end = len(seq)
        while end >= 2:
            start = max(0, end - span)
            out.append(seq[start:end])
            if start == 0:
                break
            end = start + 1  # overlap one item so the transition across the cut is kept
    return out
