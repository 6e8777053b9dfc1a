"""The pseudo-label bank: the best ``k`` candidates ever seen for every unlabeled image.

The bank is an index (image id -> up to ``k`` entries: fused score, level, content key), kept in
a few NumPy columns (a few hundred bytes per id), and a store that holds each entry's pixels
under its key: :class:`~qualiteacher.teacher.bank_store.DiskStore` (files under the stage's
output folder; the pipeline's default) or :class:`~qualiteacher.teacher.bank_store.MemoryStore`
(RAM, saved inside checkpoints; tiny runs and tests). Checkpoints hold the index only (plus the
pixels for the memory store).

Garbage collection of a disk store: an entry pushed out of the index may still be referenced by
the checkpoints on disk, so its key waits in ``pending``; :meth:`PseudoLabelBank.mark_checkpoint`
(called while a checkpoint is being written) closes a generation of dropped keys, and
:meth:`PseudoLabelBank.collect_garbage` (called once that checkpoint is on disk) deletes the
generations that none of the ``keep_checkpoints`` newest checkpoints refers to (the pipeline keeps
two: ``last.ckpt`` and ``prev.ckpt``). Keys hash the image id and the pixels, and a dropped entry
can never re-enter (a candidate must beat the worst kept score, which only rises), so a deleted
key is never needed again.

Under DDP every rank offers the candidates of the ids it sees and writes their files; at each
checkpoint the ranks' indexes are gathered (no pixels move) and merged with :func:`merge_indexes`,
and every rank continues from the merged index.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from qualiteacher.teacher.bank_store import EntryStore, MemoryStore

_KEY = "S32"  # 32 hex digits


class BankRecord(NamedTuple):
    """One kept candidate: its fused score, quality level and content key."""

    score: float
    level: int
    key: str


class Gathered(NamedTuple):
    """Entries of a batch of ids. ``owner[i]``: position in ``ids`` of the image entry ``i`` belongs to."""

    images: Tensor  # (N, 3, H, W) float in [0, 1]
    masks: Tensor   # (N, 1, H, W) float in [0, 1]
    levels: Tensor  # (N,) long
    scores: Tensor  # (N,) float32
    owner: Tensor   # (N,) long


def _to_u8(x: Tensor) -> Tensor:
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def merge_indexes(indexes: list[dict[str, list[tuple[float, int, str]]]], k: int
                  ) -> dict[str, list[tuple[float, int, str]]]:
    """Union of several indexes (id -> entries ``(score, level, key)``): per id the best ``k`` of
    all entries, a key counted once, ties in the order of ``indexes`` (rank order)."""
    merged: dict[str, list[tuple[float, int, str]]] = {}
    for index in indexes:
        for image_id, entries in index.items():
            merged.setdefault(image_id, []).extend(entries)
    out = {}
    for image_id, entries in merged.items():
        seen: set[str] = set()
        unique = [e for e in entries if not (e[2] in seen or seen.add(e[2]))]
        out[image_id] = sorted(unique, key=lambda e: -e[0])[:k]  # stable: earlier index wins ties
    return out


class PseudoLabelBank:
    """Per unlabeled image id, keep the ``k`` best candidates by fused score.

    A candidate enters only if the id has fewer than ``k`` entries or it beats the worst kept one
    (ties keep the incumbent). Pixels are stored as uint8; :meth:`gather` returns float tensors on
    the requested device. ``store`` defaults to a :class:`MemoryStore`; ``keep_checkpoints``: how
    many of the newest checkpoints must find their entries (a disk store).
    """

    def __init__(self, k: int = 3, store: EntryStore | None = None, keep_checkpoints: int = 2) -> None:
        if k < 1:
            raise ValueError(f"bank size k must be >= 1, got {k}")
        if keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
        self.k = k
        self.store: EntryStore = store if store is not None else MemoryStore()
        self.keep_checkpoints = keep_checkpoints
        self._reset_index(0)
        self.pending: list[str] = []        # dropped since the last checkpoint
        self.marked: list[list[str]] = []   # dropped before each checkpoint since, oldest first

    # ------------------------------------------------------------------ index columns
    def _reset_index(self, capacity: int) -> None:
        self._rows: dict[str, int] = {}
        self._ids: list[str] = []
        self._count = np.zeros(capacity, np.int16)
        self._score = np.full((capacity, self.k), -np.inf)
        self._level = np.zeros((capacity, self.k), np.int16)
        self._key = np.zeros((capacity, self.k), _KEY)

    def _row(self, image_id: str) -> int:
        row = self._rows.get(image_id)
        if row is not None:
            return row
        row = len(self._ids)
        if row == len(self._count):  # grow the columns geometrically
            extra = max(64, row)
            self._count = np.concatenate([self._count, np.zeros(extra, np.int16)])
            self._score = np.concatenate([self._score, np.full((extra, self.k), -np.inf)])
            self._level = np.concatenate([self._level, np.zeros((extra, self.k), np.int16)])
            self._key = np.concatenate([self._key, np.zeros((extra, self.k), _KEY)])
        self._rows[image_id] = row
        self._ids.append(image_id)
        return row

    def _drop(self, keys: list[str]) -> None:
        if self.store.durable:
            self.pending.extend(keys)
        else:
            self.store.delete(keys)

    def _valid(self) -> np.ndarray:
        n = len(self._ids)
        return np.arange(self.k)[None, :] < self._count[:n, None]  # (n, k) bool

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return int((self._count[: len(self._ids)] > 0).sum())

    def __contains__(self, image_id: str) -> bool:
        row = self._rows.get(image_id)
        return row is not None and self._count[row] > 0

    @property
    def entries(self) -> dict[str, list[BankRecord]]:
        """The index as ``{id: [BankRecord, ...]}`` (best first); built on demand."""
        return {i: self._records(r) for i, r in self._rows.items() if self._count[r] > 0}

    def _records(self, row: int) -> list[BankRecord]:
        return [BankRecord(float(self._score[row, j]), int(self._level[row, j]), self._key[row, j].decode())
                for j in range(int(self._count[row]))]

    def live_keys(self) -> set[str]:
        return {k.decode() for k in self._key[: len(self._ids)][self._valid()]}

    def accepts(self, ids: list[str], scores: Tensor) -> Tensor:
        """Which candidates could enter (id not full, or better than its worst kept): (N,) bool.

        A cheap pre-check so reliability masks are computed only for candidates worth keeping.
        """
        rows = np.array([self._rows.get(i, -1) for i in ids], dtype=np.int64)
        worst = np.full(len(ids), -np.inf)
        full = rows >= 0
        full[full] = self._count[rows[full]] >= self.k
        worst[full] = self._score[rows[full], self.k - 1]
        return scores.detach().double().cpu() > torch.from_numpy(worst)

    def best_scores(self, ids: list[str], default: float = 0.0) -> list[float]:
        """Best kept score per id (``default`` where none)."""
        return [float(self._score[self._rows[i], 0]) if i in self else default for i in ids]

    def scores(self) -> Tensor:
        """Fused scores of every kept entry, (N,), ids in insertion order, best first."""
        n = len(self._ids)
        return torch.from_numpy(self._score[:n][self._valid()]).float()

    def mean_score(self) -> float:
        s = self.scores()
        return float(s.double().mean()) if s.numel() else float("nan")

    def level_counts(self, n_levels: int = 8) -> list[int]:
        levels = self._level[: len(self._ids)][self._valid()].clip(0, n_levels - 1)
        return np.bincount(levels, minlength=n_levels).tolist()

    # ------------------------------------------------------------------ offering and reading
    def offer(self, image_id: str, image: Tensor, mask: Tensor, score: float, level: int) -> bool:
        """Offer one candidate; returns whether it was kept."""
        return self.offer_batch([image_id], image[None], mask[None], torch.tensor([score], dtype=torch.float64),
                                torch.tensor([level])) == 1

    def offer_batch(self, ids: list[str], images: Tensor, masks: Tensor, scores: Tensor,
                    levels: Tensor) -> int:
        """Offer candidates ``(N, 3, H, W)`` with masks ``(N, 1, H, W)`` for ids ``(N,)``; returns
        how many were kept. Only kept candidates are written to the store."""
        pixels = torch.cat([_to_u8(images), _to_u8(masks)], 1).numpy()  # (N, 4, H, W), one transfer
        scores_l, levels_l = scores.tolist(), levels.tolist()
        kept = 0
        for i, image_id in enumerate(ids):
            s = float(scores_l[i])
            row = self._rows.get(image_id)
            n = 0 if row is None else int(self._count[row])
            if not math.isfinite(s) or (n >= self.k and s <= self._score[row, n - 1]):
                continue
            key = self.store.put(image_id, pixels[i])
            row = self._row(image_id)
            if key.encode() in self._key[row, :n]:  # this very content is kept already
                continue
            if n >= self.k:
                self._drop([self._key[row, n - 1].decode()])
                n -= 1
            pos = int((self._score[row, :n] >= s).sum())  # after incumbents of equal score
            for col in (self._score, self._level, self._key):
                col[row, pos + 1:n + 1] = col[row, pos:n].copy()
            self._score[row, pos], self._level[row, pos], self._key[row, pos] = s, int(levels_l[i]), key
            self._count[row] = n + 1
            kept += 1
        return kept

    def gather(self, ids: list[str], device: torch.device | str = "cpu") -> Gathered:
        """Entries of ``ids`` (best first per id); ids without entries contribute nothing."""
        keys, levels, scores, owner = [], [], [], []
        for pos, image_id in enumerate(ids):
            row = self._rows.get(image_id)
            for j in range(0 if row is None else int(self._count[row])):
                keys.append(self._key[row, j].decode())
                levels.append(int(self._level[row, j]))
                scores.append(float(self._score[row, j]))
                owner.append(pos)
        if not keys:
            empty = torch.empty(0, device=device)
            return Gathered(empty, empty, empty.long(), empty, empty.long())
        pixels = self.store.get_batch(keys).to(device, non_blocking=True).float() / 255  # (N, 4, H, W)
        return Gathered(pixels[:, :3], pixels[:, 3:], torch.tensor(levels, device=device),
                        torch.tensor(scores, dtype=torch.float32, device=device),
                        torch.tensor(owner, device=device))

    # ------------------------------------------------------------------ checkpoints and DDP
    def index_state(self) -> dict[str, list[tuple[float, int, str]]]:
        """The index as plain data, ``{id: [(score, level, key), ...]}`` (what DDP ranks exchange)."""
        return {i: [tuple(r) for r in self._records(row)] for i, row in self._rows.items() if self._count[row] > 0}

    def load_index_(self, index: dict[str, list[tuple[float, int, str]]]) -> None:
        """Replace the index (e.g. by the ranks' merged one); own keys it lacks are dropped."""
        before = self.live_keys()
        self._reset_index(len(index))
        for image_id, entries in index.items():
            row = self._row(image_id)
            entries = list(entries)[: self.k]
            for j, (score, level, key) in enumerate(entries):
                self._score[row, j], self._level[row, j], self._key[row, j] = float(score), int(level), key
            self._count[row] = len(entries)
        self.store.adopt(self.live_keys())  # this run's entries now: its garbage collection may delete them
        self._drop(sorted(before - self.live_keys()))

    def state_dict(self) -> dict[str, Any]:
        return {"format": 2, "k": self.k, "entries": self.index_state(),
                **self.store.state_dict(sorted(self.live_keys()))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k = int(state["k"])
        self.pending, self.marked = [], []
        if state.get("format", 1) == 1:  # legacy: the pixels inside the entries
            self._reset_index(0)
            for image_id, entries in state["entries"].items():
                for e in entries:
                    self.offer(image_id, e["image"].float() / 255, e["mask"].float() / 255, e["score"], e["level"])
            return
        self.store.load_state_dict(state)
        self._reset_index(0)
        self.load_index_(state["entries"])
        self.pending = []

    def missing_entries(self) -> list[str]:
        """Keys of the index whose pixels the store lacks (should always be empty)."""
        return self.store.missing(sorted(self.live_keys()))

    def mark_checkpoint(self) -> None:
        """A checkpoint of the current index is being written: the entries dropped since the
        previous one form a generation that this checkpoint no longer refers to."""
        self.marked.append(self.pending)
        self.pending = []

    def collect_garbage(self) -> int:
        """Delete the entries that none of the ``keep_checkpoints`` newest checkpoints refers to.
        Call only once the last marked checkpoint is on disk; returns how many were deleted."""
        dead: list[str] = []
        while len(self.marked) > self.keep_checkpoints - 1:  # older than every kept checkpoint
            dead += self.marked.pop(0)
        if not dead:
            return 0
        live = self.live_keys()
        dead = [k for k in dict.fromkeys(dead) if k not in live]
        self.store.delete(dead)
        return len(dead)
