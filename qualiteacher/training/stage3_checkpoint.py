"""What a stage-3 checkpoint holds besides the weights (the pseudo-label bank's index, every rank's
random streams) and the checks of reading a trained one back (``stage3.load_trained``)."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qualiteacher.checkpoints import CheckpointError, check_keys, checkpoint_state, describe, read_checkpoint
from qualiteacher.teacher.bank import PseudoLabelBank, merge_indexes
from qualiteacher.training.distributed import all_gather_objects, rank_seed

FROZEN_PREFIXES = ("ensemble.",)  # the IQA ensemble: frozen, rebuilt, never checkpointed


def drop_frozen_(state_dict: dict[str, Any]) -> None:
    for k in [k for k in state_dict if k.startswith(FROZEN_PREFIXES)]:
        del state_dict[k]


def save_bank_and_streams_(checkpoint: dict[str, Any], bank: PseudoLabelBank, generator: torch.Generator) -> None:
    """Add the bank and the ranks' random streams to ``checkpoint``. Lightning builds the checkpoint
    on every rank (rank 0 writes it): the ranks' indexes (no pixels: the entries are files in the
    shared bank folder) are merged, and every rank continues from the merged index."""
    mine = {"index": bank.index_state(), "generator": generator.get_state(), "torch": torch.get_rng_state()}
    ranks = all_gather_objects(mine)
    if len(ranks) > 1:
        bank.load_index_(merge_indexes([r["index"] for r in ranks], bank.k))
    checkpoint["pseudo_label_bank"] = bank.state_dict()
    checkpoint["qualiteacher_rng"] = {"generator": [r["generator"] for r in ranks],
                                      "torch": [r["torch"] for r in ranks]}
    bank.mark_checkpoint()


def restore_bank_and_streams(checkpoint: dict[str, Any], bank: PseudoLabelBank, generator: torch.Generator,
                             rank: int, seed: int, bank_dir: str | None) -> bool:
    """The bank and this rank's random streams from ``checkpoint``; whether a bank was restored."""
    resumed = "pseudo_label_bank" in checkpoint
    if resumed:
        bank.load_state_dict(checkpoint["pseudo_label_bank"])
        lost = bank.missing_entries()
        if lost:
            raise RuntimeError(f"{len(lost)} pseudo-label bank entries of this checkpoint are missing from "
                               f"bank_dir={bank_dir!r} (e.g. {lost[0]}): was the folder moved "
                               f"or deleted? Point model.bank_dir at it.")
    rng = checkpoint.get("qualiteacher_rng")
    if rng is not None and rank < len(rng["generator"]):
        generator.set_state(rng["generator"][rank])
        torch.set_rng_state(rng["torch"][rank])
    elif rng is not None:  # more ranks than the run that saved it: fresh streams for the new ones
        generator.manual_seed(rank_seed(seed + checkpoint.get("global_step", 0), rank))
    return resumed


def read_trained(path: Path, init: Callable[..., Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(checkpoint, state_dict, hyper-parameters)`` of a stage-3 checkpoint whose hyper-parameters
    are arguments of ``init`` (the module's ``__init__``: flat keys, as every stage-3 checkpoint
    has them); :class:`CheckpointError` otherwise."""
    if not path.exists():
        raise FileNotFoundError(f"stage 3 checkpoint not found: {path} (run stage3 first)")
    ckpt = read_checkpoint(path)
    state = checkpoint_state(ckpt, path)
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or not any(k.startswith("teacher.") for k in state):
        raise CheckpointError(path, f"not a stage-3 checkpoint: it looks like {describe(state)}; "
                                    f"pass OUT/stage3/final.ckpt")
    known = set(inspect.signature(init).parameters) - {"self", "ensemble"}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise CheckpointError(path, f"hyper-parameters unknown to this version of QualiTeacherModule: {unknown}")
    return ckpt, state, hparams


def load_trained_state_(path: Path, module: nn.Module, bank: PseudoLabelBank, ckpt: dict[str, Any],
                        state: dict[str, Any]) -> None:
    """Weights (strictly: every one there, nothing else, shapes alike) and bank into ``module``."""
    check_keys(path, state, module.state_dict(), "stage-3 model", ignore=FROZEN_PREFIXES)
    try:
        module.load_state_dict({k: v for k, v in state.items() if not k.startswith(FROZEN_PREFIXES)}, strict=True)
    except RuntimeError as err:  # shapes differ: another preset or architecture
        first = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), str(err)[:200])
        raise CheckpointError(path, f"weights do not fit the model its hyper-parameters build: {first}") from None
    try:
        bank.load_state_dict(ckpt.get("pseudo_label_bank", {"k": bank.k, "entries": {}}))
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise CheckpointError(path, f"pseudo-label bank is malformed ({type(err).__name__}: {err})") from None
