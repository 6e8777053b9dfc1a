"""Exponential moving average of the student's weights: the Mean Teacher."""
from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``θ_T ← d θ_T + (1 - d) θ_S`` for every parameter; buffers are copied from the student.

    Parameters are matched by name, so both modules must share one architecture. Floating
    parameters are averaged in one fused ``_foreach_lerp_`` call; buffers (running statistics,
    code-usage counters) follow the student, as their running averages are already smooth.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        missing = sorted(set(t_params) ^ set(s_params))[:5]
        raise ValueError(f"teacher and student differ in parameters, e.g. {missing}")
    t_float = [t_params[k] for k in t_params if t_params[k].is_floating_point()]
    s_float = [s_params[k].detach() for k in t_params if t_params[k].is_floating_point()]
    if t_float:
        torch._foreach_lerp_(t_float, s_float, 1.0 - decay)
    s_buffers = dict(student.named_buffers())
    for name, buf in teacher.named_buffers():
        buf.copy_(s_buffers[name])


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student`` in eval mode, to be updated with :func:`ema_update_`."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()
