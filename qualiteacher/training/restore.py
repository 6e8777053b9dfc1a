"""Inference: restore images of any size at a requested quality level, in tiles, under a memory budget.

Every caller (``qualiteacher restore``, ``evaluate``, the pipeline's evaluation, the app, the
registered model) goes through :func:`restore`: tiles of a size chosen for the architecture
(:func:`default_tile`), as many per batch as the memory budget holds (``--max-memory``; default
from the machine, see :mod:`qualiteacher.training.memory`), blended without seams
(:mod:`qualiteacher.training.tiling`). Time grows with the number of pixels, memory does not.
What the model reads of the whole image (the image fusion's context, its classical prior's
airlight) is measured once on a downscaled copy of the whole and shared by every tile
(:func:`context_image`, :mod:`qualiteacher.archs.context`), so the tiles of an image agree.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from qualiteacher.archs.context import image_context
from qualiteacher.checkpoints import CheckpointError, check_keys
from qualiteacher.devices import best_device_type
from qualiteacher.teacher.ema import make_teacher
from qualiteacher.training.memory import MemoryBudgetError, describe, resolve_budget
from qualiteacher.training.stage3_checkpoint import read_trained
from qualiteacher.training.students import build_student, student_spec
from qualiteacher.training.tiling import TilePlan, plan_tiles, run_tiles, tiled_apply  # noqa: F401  (tiled_apply: re-exported)

CONTEXT_TILES = 2       # the context pass sees the whole image at up to 2 tile sides (attention: 4^2 a tile's cost)
PRIOR_SIDE = 1024       # ... and the classical prior's statistics (no attention: cheap) at up to 1024 px
MIN_TILE = 16           # smaller tiles leave the model no context (a grid pattern in the output)
TILE_TOKENS = 32        # default tiles hold about 32 x 32 positions at the model's coarsest scale ...
TILE_RANGE = (128, 512)  # ... within these sides (attention over a tile costs its number of positions)


class NonFiniteOutputError(ValueError):
    """The model produced NaN or infinite values (broken weights): an error, never a black image."""


class TrainedModels(NamedTuple):
    """What restoring needs from a stage-3 checkpoint: the student, its EMA teacher, the hyper-parameters."""

    student: nn.Module
    teacher: nn.Module
    hparams: dict[str, Any]


def size_multiple(model: nn.Module) -> int:
    """Input sides that need no padding are multiples of this (8 when the model does not say)."""
    return int(getattr(model, "size_multiple", 8))


def default_tile(model: nn.Module) -> int:
    """The tile side for ``model``: :data:`TILE_TOKENS` positions at its coarsest scale (its size
    multiple), within :data:`TILE_RANGE`: 128 px for the demo IQPIR (attention at 1/4 scale), 512 px
    for the paper one (1/32)."""
    m = size_multiple(model)
    side = min(max(TILE_TOKENS * m, TILE_RANGE[0]), TILE_RANGE[1])
    return math.ceil(side / m) * m


def default_overlap(tile: int) -> int:
    """Overlap of neighbouring tiles: an eighth of the tile, at least 16 px, at most a quarter."""
    return min(max(16, tile // 8), tile // 4)


def auto_tile(image: Tensor, tile: int | None, model: nn.Module | None = None) -> int | None:
    """The tile side :func:`restore` uses for ``image`` (..., H, W): ``tile`` if given (0: never
    tile), else :func:`default_tile`; ``None`` when the image fits in one tile (restored whole)."""
    if tile == 0:
        return None
    side = tile or (default_tile(model) if model is not None else TILE_RANGE[1])
    h, w = image.shape[-2:]
    return None if h <= side and w <= side else side


def check_tile(tile: int | None, multiple: int = 8, overlap: int | None = None) -> None:
    """``ValueError`` unless ``tile`` (None / 0: automatic / no tiling) is at least the model's
    size ``multiple`` plus the ``overlap`` (default :func:`default_overlap`): smaller tiles leave
    the model no context and write a grid pattern."""
    if tile is None or tile == 0:
        return
    overlap = default_overlap(tile) if overlap is None else overlap
    least = max(MIN_TILE, multiple + overlap, 2 * overlap + 1)
    if tile < least:
        raise ValueError(f"--tile {tile} is too small: tiles must be at least {least} px (the model's size "
                         f"multiple {multiple} plus the {overlap}-px overlap, and {MIN_TILE} px at least); use "
                         f"the training crop size or larger, or 0 for no tiling")


def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU when there is one: :func:`~qualiteacher.devices.best_device_type`), ``cpu``,
    ``cuda``, ``cuda:N``, ``mps``: a ``ValueError`` naming the problem when the device does not
    exist here (checked before any work starts)."""
    if name == "auto":
        return torch.device(best_device_type())
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, mps, auto): {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unsupported device type {device.type!r} (cpu, cuda, mps)")
    return device


def _per_image(value: float | Tensor | None, b: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=dtype, device=device).reshape(-1)
    return t.expand(b) if t.numel() == 1 else t


def _student_fn(model: nn.Module, b: int, level: int | Tensor | None, w: float | Tensor | None,
                device: torch.device) -> Callable[[Tensor], Tensor]:
    # tiles -> restored tiles; per-image levels and w repeat over the positions of a batch
    levels = _per_image(level, b, device, torch.long)
    ws = w if w is None or not isinstance(w, Tensor) else _per_image(w, b, device, torch.float32)

    def fn(x: Tensor) -> Tensor:
        rep = x.shape[0] // b  # tiles arrive position after position, the B images' tiles together
        lv = None if levels is None else levels.repeat(rep)
        if ws is None:
            out = model(x, lv).image  # any (x, level) model works
        else:
            out = model(x, lv, w=ws.repeat(rep) if isinstance(ws, Tensor) else ws).image
        if not torch.isfinite(out).all():
            raise NonFiniteOutputError("the model's output holds NaN or infinite values: its weights are broken "
                                       "(retrain, or take an earlier checkpoint)")
        return out.clamp(0, 1)

    return fn


def _plan(fn: Callable[[Tensor], Tensor], model: nn.Module, images: Tensor, tile: int | None,
          overlap: int | None, budget: int, multiple: int, tiles_per_batch: int | None,
          device: torch.device) -> TilePlan:
    h, wd = images.shape[-2:]
    used = auto_tile(images, tile, model)
    side = math.ceil(max(h, wd) / multiple) * multiple if used is None else used  # None: one tile, the whole image
    while True:
        ov = 0 if side >= max(h, wd) else default_overlap(side) if overlap is None else overlap
        try:
            return plan_tiles(fn, images, side, ov, budget, multiple, tiles_per_batch, device, key=model,
                              fit=tile is None)  # a given tile (the training crop) is kept as it is
        except MemoryBudgetError:  # an automatic tile may shrink until one fits the budget
            smaller = (side * 3 // 4) // multiple * multiple
            if tile is not None or smaller < max(MIN_TILE, 2 * multiple, 2 * default_overlap(smaller) + 1):
                raise
            side = smaller


def plan_restore(model: nn.Module, images: Tensor, tile: int | None = None, overlap: int | None = None,
                 max_memory: str | int | None = None, tiles_per_batch: int | None = None) -> TilePlan:
    """How :func:`restore` cuts ``images`` with these settings: the tile grid (an automatic tile
    shrinks until one batch fits the budget), the overlap and the positions per batch."""
    device = next((p.device for p in model.parameters()), images.device)
    budget = resolve_budget(max_memory, device)
    fn = _student_fn(model, images.shape[0], 7, None, device)
    with torch.no_grad():
        return _plan(fn, model, images, tile, overlap, budget, size_multiple(model), tiles_per_batch, device)


@torch.no_grad()
def restore(model: nn.Module, images: Tensor, level: int | Tensor | None = 7, tile: int | None = None,
            overlap: int | None = None, max_memory: str | int | None = None, multiple: int | None = None,
            w: float | Tensor | None = None, tiles_per_batch: int | None = None) -> Tensor:
    """Restore ``images`` (B, 3, H, W) with a student at quality ``level`` (an int, or a (B,)
    tensor: one level per image) and, for a student with a fidelity path, fidelity ``w`` (a float
    or a (B,) tensor; ``None``: the student's default). ``level=None`` runs unconditioned (as the
    teacher does).

    ``images`` may be uint8 (0..255; the result is uint8) or float in [0, 1] (the result in its
    dtype), on any device: tiles go to the model's device one batch at a time. ``tile``: None picks
    :func:`default_tile`, fitted to the image (images that fit in one tile run whole; the tile
    shrinks when the budget cannot hold one), 0 never tiles, an int is the tile side, kept exactly
    (the training crop size gives what evaluation measured). ``overlap`` defaults to :func:`default_overlap`. ``max_memory`` (bytes or
    ``"2G"``; None: the machine's default) bounds the image buffers plus the tiles in flight;
    :class:`~qualiteacher.training.memory.MemoryBudgetError` when even one tile does not fit.
    :class:`NonFiniteOutputError` when the model outputs NaN/inf. :func:`plan_restore` says how
    an image is cut.
    """
    device = next((p.device for p in model.parameters()), images.device)
    multiple = multiple or size_multiple(model)
    budget = resolve_budget(max_memory, device)
    fn = _student_fn(model, images.shape[0], level, w, device)
    was_training = model.training
    model.eval()
    try:
        plan = _plan(fn, model, images, tile, overlap, budget, multiple, tiles_per_batch, device)
        if len(plan.grid.ys) * len(plan.grid.xs) == 1:
            return run_tiles(fn, images, plan, device)
        th, tw = plan.grid.tile  # the context pass: at most one batch of tiles' pixels (the budget) ...
        side = min(math.isqrt(plan.positions * th * tw), CONTEXT_TILES * max(th, tw))  # ... and 2 tile sides
        with image_context(model, context_image(images, side, multiple, device), fn,
                           context_image(images, PRIOR_SIDE, 1, device)):
            return run_tiles(fn, images, plan, device)
    finally:
        model.train(was_training)


def context_image(images: Tensor, side: int, multiple: int, device: torch.device) -> Tensor:
    """``images`` (B, 3, H, W) downscaled (antialiased, aspect kept) to fit ``side`` x ``side``,
    sides multiples of ``multiple``, as float in [0, 1] on ``device``: what a tiled restore
    measures the whole image's context on (:func:`~qualiteacher.archs.context.image_context`).
    :func:`restore` gives it the pixels of one batch of tiles (what the budget holds), at most
    :data:`CONTEXT_TILES` tile sides: a 480-px hazy photo in 128-px tiles came out 14.4 dB from the
    same photo restored whole with no shared context, 21.3 dB with a 128-px context, 24.3 dB with
    256 px (0.36 s for the demo model on 2 CPU cores), 25.3 dB with the whole 480 px."""
    h, w = images.shape[-2:]
    scale = min(1.0, side / max(h, w))
    size = [max(multiple, round(n * scale / multiple) * multiple) for n in (h, w)]
    small = torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    small = small.to(device).float()
    return small / 255 if images.dtype == torch.uint8 else small


def inference_ready(net: nn.Module) -> nn.Module:
    """``net`` in eval mode with its convolution weights channels-last (NHWC), like the tiles
    :func:`restore` cuts: with both in that layout oneDNN reorders nothing per call (a 1-MP dehaze
    restore with the demo model on 2 CPU cores: 6.6 -> 5.3 s; outputs equal within one 8-bit step).
    For models loaded to restore only: it changes the layout of the weights in place."""
    return net.eval().to(memory_format=torch.channels_last)


def check_weights_finite(path: str | Path, state: dict[str, Tensor]) -> None:
    """:class:`~qualiteacher.checkpoints.CheckpointError` when a floating weight holds NaN / inf."""
    bad = [k for k, v in state.items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(path, f"{len(bad)} weight tensor(s) hold NaN or infinite values (e.g. {bad[0]}): "
                                    f"this model cannot restore images; retrain, or take an earlier checkpoint")


def load_for_inference(path: str | Path) -> TrainedModels:
    """Student and EMA teacher of a stage-3 checkpoint (``OUT/stage3/final.ckpt``), on the CPU, in
    eval mode, and its hyper-parameters: nothing else is built. Unlike ``load_trained`` no
    pseudo-label bank is loaded, so a checkpoint's ``bank_dir`` never gets a file, and no IQA
    ensemble. Read with ``weights_only``; the student's and teacher's keys are checked strictly;
    non-finite weights are refused (:class:`~qualiteacher.checkpoints.CheckpointError`)."""
    # lazy: stage3 imports lightning (4 s); the many callers of restore() that load no checkpoint never need it
    from qualiteacher.training.stage3 import QualiTeacherModule

    path = Path(path)
    _, state, hparams = read_trained(path, QualiTeacherModule.__init__)  # the checks load_trained makes
    known = inspect.signature(QualiTeacherModule.__init__).parameters
    defaults = {k: p.default for k, p in known.items() if p.default is not inspect.Parameter.empty}
    build = dict(student_spec({**defaults, **hparams})["build"])
    try:
        student = build_student(build.pop("student"), **build)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(path, f"its hyper-parameters do not build a model: {err}") from None
    nets = {"student": student, "teacher": make_teacher(student)}
    ours = {k: v for k, v in state.items() if k.startswith(("student.", "teacher."))}
    check_keys(path, ours, [f"{n}.{k}" for n, net in nets.items() for k in net.state_dict()], "stage-3 model")
    check_weights_finite(path, ours)
    for name, net in nets.items():
        try:
            net.load_state_dict({k[len(name) + 1:]: v for k, v in ours.items() if k.startswith(name + ".")})
        except RuntimeError as err:  # shapes differ: another preset or architecture
            first = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), str(err)[:200])
            raise CheckpointError(path, f"weights do not fit the model its hyper-parameters build: {first}") from None
    return TrainedModels(inference_ready(nets["student"]), inference_ready(nets["teacher"]), dict(hparams))


def check_output_folder(input_folder: str | Path, out: str | Path) -> None:
    """``ValueError`` when ``out`` is the input folder itself: restored files would replace the originals."""
    src, dst = Path(input_folder), Path(out)
    same = dst.exists() and src.exists() and dst.samefile(src) if dst.exists() else dst.resolve() == src.resolve()
    if same:
        raise ValueError(f"--out {out} is the input folder: the restorations would overwrite the originals; "
                         f"choose another output folder")


PHOTO_BYTES_PER_PIXEL = 10  # 8-bit input and output (3 + 3) and Pillow's decoding buffer (4)


def check_photo_fits(height: int, width: int, budget: int) -> None:
    """:class:`~qualiteacher.training.memory.MemoryBudgetError` when a photo of this size (read
    from its header, before decoding) cannot be held in 8 bits within ``budget`` bytes."""
    need = PHOTO_BYTES_PER_PIXEL * height * width
    if need > budget:
        raise MemoryBudgetError(f"{width}x{height} px needs about {describe(need)} to read and write, over the "
                                f"memory budget of {describe(budget)} (raise --max-memory)")
