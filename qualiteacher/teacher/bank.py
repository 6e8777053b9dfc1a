"""The pseudo-label bank: the best ``k`` candidates ever seen for every unlabeled image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class BankEntry:
    image: Tensor   # (3, H, W) uint8 on the CPU (a quarter of the float memory)
    mask: Tensor    # (1, H, W) uint8 reliability mask
    score: float    # fused ensemble score
    level: int      # discrete quality level


def _to_u8(x: Tensor) -> Tensor:
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


class PseudoLabelBank:
    """Per unlabeled image id, keep the ``k`` best candidates by fused score.

    A candidate enters only if the entry list is not full or it beats the worst kept entry
    (ties keep the incumbent). Entries live on the CPU as uint8; :meth:`gather` returns float
    tensors on the requested device.
    """

    def __init__(self, k: int = 3) -> None:
        if k < 1:
            raise ValueError(f"bank size k must be >= 1, got {k}")
        self.k = k
        self.entries: dict[str, list[BankEntry]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.entries

    def offer(self, image_id: str, image: Tensor, mask: Tensor, score: float, level: int) -> bool:
        """Offer one candidate; returns whether it was kept."""
        return self.offer_batch([image_id], image[None], mask[None], torch.tensor([score], dtype=torch.float64),
                                torch.tensor([level])) == 1

    def offer_batch(self, ids: list[str], images: Tensor, masks: Tensor, scores: Tensor,
                    levels: Tensor) -> int:
        """Offer candidates ``(N, 3, H, W)`` for ids ``(N,)``; returns how many were kept."""
        images, masks = _to_u8(images), _to_u8(masks)  # one device transfer for the batch
        scores_l, levels_l = scores.tolist(), levels.tolist()
        kept = 0
        for i, image_id in enumerate(ids):
            entry_list = self.entries.setdefault(image_id, [])
            if len(entry_list) >= self.k and scores_l[i] <= entry_list[-1].score:
                continue
            if len(entry_list) >= self.k:
                entry_list.pop()
            entry_list.append(BankEntry(images[i], masks[i], float(scores_l[i]), int(levels_l[i])))
            entry_list.sort(key=lambda e: -e.score)
            kept += 1
        return kept

    def accepts(self, ids: list[str], scores: Tensor) -> Tensor:
        """Which candidates could enter (bank not full, or better than the worst kept): (N,) bool.

        A cheap pre-check so reliability masks are computed only for candidates worth keeping.
        """
        worst = [self.entries[i][-1].score if len(self.entries.get(i, ())) >= self.k else float("-inf")
                 for i in ids]
        return scores.detach().float().cpu() > torch.tensor(worst)

    def gather(self, ids: list[str], device: torch.device | str = "cpu"
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Entries of ``ids`` as ``(images (N,3,H,W), masks (N,1,H,W), levels (N,), scores (N,), owner (N,))``.

        ``owner[i]`` is the position in ``ids`` of the image entry ``i`` belongs to. Ids without
        entries contribute nothing.
        """
        imgs, masks, levels, scores, owner = [], [], [], [], []
        for pos, image_id in enumerate(ids):
            for e in self.entries.get(image_id, ()):
                imgs.append(e.image)
                masks.append(e.mask)
                levels.append(e.level)
                scores.append(e.score)
                owner.append(pos)
        if not imgs:
            empty = torch.empty(0, device=device)
            return empty, empty, empty.long(), empty, empty.long()
        to = dict(device=device, non_blocking=True)
        return (torch.stack(imgs).to(**to).float() / 255, torch.stack(masks).to(**to).float() / 255,
                torch.tensor(levels, device=device), torch.tensor(scores, device=device),
                torch.tensor(owner, device=device))

    def best_scores(self, ids: list[str], default: float = 0.0) -> list[float]:
        """Best kept score per id (``default`` where none)."""
        return [self.entries[i][0].score if self.entries.get(i) else default for i in ids]

    def mean_score(self) -> float:
        scores = [e.score for v in self.entries.values() for e in v]
        return sum(scores) / len(scores) if scores else float("nan")

    def scores(self) -> Tensor:
        """Fused scores of every kept entry, (N,)."""
        return torch.tensor([e.score for v in self.entries.values() for e in v], dtype=torch.float32)

    def level_counts(self, n_levels: int = 8) -> list[int]:
        counts = [0] * n_levels
        for v in self.entries.values():
            for e in v:
                counts[min(max(e.level, 0), n_levels - 1)] += 1
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "entries": {i: [vars(e).copy() for e in v] for i, v in self.entries.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k = int(state["k"])
        self.entries = {i: [BankEntry(**e) for e in v] for i, v in state["entries"].items()}

    def merge_(self, other: "PseudoLabelBank") -> None:
        """Add another bank's entries (used to build the union across DDP ranks)."""
        for image_id, entries in other.entries.items():
            for e in entries:
                self.offer(image_id, e.image.float() / 255, e.mask.float() / 255, e.score, e.level)
