"""Memory budgets for inference: how much a restoration may use, and how much a forward pass takes.

A budget bounds what restoring one image adds to the process: the image's own buffers (8-bit
input and output) and the batches of tiles in flight with their activations. The model's weights
and the Python / torch runtime (about 0.5 GB on CPU) are not part of it. The default comes from
the machine: on CPU a quarter of the available memory, at most :data:`CPU_BUDGET_CAP` (a batch of
about a megapixel already keeps the cores busy: more memory buys no speed there); on CUDA half of
the device's free memory.

What a forward pass takes is measured, not guessed: :func:`measure_peak` follows every tensor an
operation creates until it is freed (a dispatch mode), so it counts the activations the model
really holds at its worst moment; the callers add a margin for what kernels and allocators keep
beside the tensors.
"""
from __future__ import annotations

import os
import re
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GiB = 1 << 30
MiB = 1 << 20
CPU_BUDGET_CAP = 1 * GiB     # more memory than this gives a CPU no speed (batches of ~1 MP saturate it)
CPU_FRACTION = 0.25          # of the available memory, on CPU (other programs keep the rest)
CUDA_FRACTION = 0.5          # of the device's free memory
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}


class MemoryBudgetError(ValueError):
    """An image (or a tile of it) needs more memory than the budget allows."""


def parse_memory(value: str | float) -> int:
    """Bytes from ``2G``, ``1.5GiB``, ``512M``, ``800MB``, ``1e9`` or a number of bytes; a
    ``ValueError`` naming the value otherwise (units are powers of 1024)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        amount = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
        if m is None:
            raise ValueError(f"--max-memory {value!r} is not an amount of memory (e.g. 2G, 512M, 1.5GB)")
        amount = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not amount > 0:
        raise ValueError(f"--max-memory {value!r} must be more than 0 bytes")
    return int(amount)


def _cgroup_room() -> int | None:
    # a container's limit (cgroup v2) can be far below what the host reports as available
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_memory() -> int:
    """Bytes of RAM this process could still take: the system's available memory (``psutil``, or
    ``sysconf``), or less where a container's cgroup limit is nearer."""
    try:
        import psutil  # lazy: psutil is optional (not a declared dependency): sysconf otherwise

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = _cgroup_room()
    return avail if room is None else min(avail, room)


def default_budget(device: torch.device | str = "cpu") -> int:
    """The budget a restoration on ``device`` gets when none is given (see the module doc)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FRACTION)
    return int(min(CPU_BUDGET_CAP, available_memory() * CPU_FRACTION))


def resolve_budget(value: str | float | None, device: torch.device | str = "cpu") -> int:
    """``value`` in bytes (see :func:`parse_memory`), or :func:`default_budget` when ``None``."""
    return default_budget(device) if value is None else parse_memory(value)


def describe(n: float) -> str:
    """``1.5 GiB`` / ``320 MiB``: an amount for a message."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


class _LiveTensors(TorchDispatchMode):
    """Bytes held by the tensors that operations create, now and at the worst moment.

    A storage counts once, from the operation that allocates it until its last tensor is freed;
    outputs sharing an argument's storage (views, in-place results of weights or inputs) are
    free."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage address -> [tensor count, bytes]

    def _release(self, key: int) -> None:
        ref = self._refs.get(key)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # torch's signature
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._refs:
                self._refs[key][0] += 1
            elif key in inputs or storage.nbytes() == 0:
                continue  # a view of a weight or of the input: no new memory
            else:
                self._refs[key] = [1, storage.nbytes()]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key)
        return out


def measure_peak(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, int]:
    """``fn(x)`` and the peak bytes its tensors held (the output included, the input not), on any
    device; CUDA's own peak statistics are left alone (a training run may be reading them)."""
    mode = _LiveTensors()
    with mode:
        out = fn(x)
    return out, mode.peak
