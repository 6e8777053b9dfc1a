"""What the stages need from DDP: launch ranks, per-rank seeds, object gathers, unused parameters.

Every training stage runs under Lightning DDP through the pipeline's own code. Each rank runs the
pipeline command (Lightning's launcher re-runs it for local ranks > 0; ``torchrun`` and SLURM start
every rank themselves); ranks > 0 train alongside rank 0 and do nothing else.
"""
from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist
from torch import nn

from qualiteacher.archs.conditioning import AdaLNModulation, LevelEmbedding, QualityConditioning

# global-rank variables of the launchers Lightning supports: torchrun, SLURM, Lightning's own
# (LOCAL_RANK / NODE_RANK for the processes it starts), LSF / jsrun
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "JSM_NAMESPACE_RANK")

# a large prime: rank r's stream starts far from rank 0's; rank 0 keeps the run seed itself
_RANK_SEED_STRIDE = 104_729


def launch_rank() -> int:
    """0 for the process that records, evaluates and registers; > 0 for a DDP worker process.

    Read from the launchers' environment, so it is known before any process group exists.
    """
    values = [int(os.environ[v]) for v in _RANK_VARIABLES if os.environ.get(v, "").strip().isdigit()]
    return max(values, default=0)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random streams, derived from the run seed (rank 0: ``seed``)."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return (int(seed) + _RANK_SEED_STRIDE * int(rank)) % (2 ** 63)


def world_size() -> int:
    """Processes in the default process group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def set_conditioning_trainable_(net: nn.Module, trainable: bool) -> int:
    """Set ``requires_grad`` of the quality conditioning of a student (level embeddings, adaLN
    projections and level vectors); returns the number of parameter tensors changed.

    Stages before stage 3 never condition on a level: their conditioning takes no part in the
    loss, and DDP's gradient reducer (which expects every trainable parameter to get a gradient)
    fails at the second step. Frozen until stage 3, it stays at its zero initialisation.
    """
    params = {id(p): p for m in net.modules()
              if isinstance(m, (LevelEmbedding, AdaLNModulation, QualityConditioning)) for p in m.parameters()}
    changed = 0
    for p in params.values():
        changed += int(p.requires_grad != trainable)
        p.requires_grad_(trainable)
    return changed
