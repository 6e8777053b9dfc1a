"""A tile restored as part of its image: what the image fusion reads of the whole image, shared.

The image fusion (:class:`~qualiteacher.archs.fidelity.ImageFusion`) reads two statistics of the
whole image: a global context vector (the mean of its hidden feature) and its classical prior's
own (the dark channel prior's airlight). Run on tiles, each tile measures its own: a hazy tile and
a clear one get different airlights and the restored image shows blocks, one per tile (a 480-px
hazy photo in 128-px tiles came out 14.4 dB from the same photo restored whole).
:func:`image_context` measures them once, on a copy of the whole image downscaled to a few tiles
(a "context pass", :func:`qualiteacher.training.restore.context_image`), and every forward in its
block uses them for the tiles of the same images (24.3 dB with a 256-px context). Nothing of it is
a weight.

What stays per tile: the attention over a tile's tokens and the group norms' statistics. Fixing
the group norms to the context pass's statistics was measured and rejected: statistics of the
downscaled copy (less fine texture, lower variance) over-amplify features at full resolution
(magenta blotches in bright regions, 19.3 dB), and even the exact full-resolution statistics gave
21.9 dB: the remaining difference is the attention's reach, which only larger tiles extend.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from qualiteacher.archs.fidelity import ImageContext, ImageFusion


@contextmanager
def image_context(model: nn.Module, images: Tensor, run: Callable[[Tensor], object],
                  prior_images: Tensor | None = None) -> Iterator[bool]:
    """Within the block, the image fusions of ``model`` use the context of ``images`` (B, 3, h, w):
    ``run(images)`` (a forward of the model on a downscaled copy of the whole images) records it,
    and it stays fixed until the block ends, for forwards on batches of tiles of the same B images,
    position after position (``n * B`` tiles). ``prior_images``: the same images at a larger size,
    on which the classical prior's statistics are measured instead (they cost no attention, and
    an airlight taken at a few hundred pixels misses small bright haze). Yields False, fixing
    nothing, for a model without an image fusion or whose forward did not reach it (``w = 0``)."""
    fusions = [m for m in model.modules() if isinstance(m, ImageFusion)]
    if not fusions:
        yield False
        return
    try:
        for m in fusions:
            m.recording, m.recorded, m.fixed = True, None, None
        with torch.no_grad():
            run(images)
            for m in fusions:
                fixed = m.recorded
                if fixed is not None and prior_images is not None and m.prior_statistics is not None:
                    fixed = fixed._replace(prior=m.prior_statistics(prior_images.float()))
                m.recording, m.fixed = False, fixed
        yield any(m.fixed is not None for m in fusions)
    finally:
        for m in fusions:
            m.recording, m.recorded, m.fixed = False, None, None


def prior_statistics(model: nn.Module, images: Tensor | None) -> dict[str, Tensor] | None:
    """The image-level statistics (per image of ``images``, (B, 3, H, W) in [0, 1]) of the classical
    prior that ``model``'s image fusion reads: ``{"airlight": (B, 3)}`` for ``dcp``; None for no
    ``images`` (a batch without whole images) and for a model without an image fusion or whose
    prior has none (``lime``: local only)."""
    if images is None:
        return None
    for m in model.modules():
        if isinstance(m, ImageFusion) and m.prior_statistics is not None:
            with torch.no_grad():
                return {k: v.detach() for k, v in m.prior_statistics(images.float()).items()}
    return None


def select_statistics(stats: dict[str, Tensor] | None, rows: Tensor) -> dict[str, Tensor] | None:
    """The statistics of the batch images ``rows`` (an index tensor): a batch built by indexing."""
    return None if stats is None else {k: v[rows] for k, v in stats.items()}


@contextmanager
def fixed_prior_statistics(model: nn.Module, stats: dict[str, Tensor] | None) -> Iterator[None]:
    """Within the block the classical prior of ``model``'s image fusions uses ``stats`` (per image,
    from :func:`prior_statistics` of the whole images; a batch of ``n * B`` repeats them position
    after position) instead of measuring its input, while the context vector stays each batch's
    own: a training crop gets the airlight of its image, as a tile of that image does at inference
    (:func:`image_context`). Per-crop airlights are biased (a crop without sky takes a bright wall
    for the airlight), and a fusion trained on them met other airlights at inference. ``stats``
    None or empty: nothing changes. Gradients flow as usual (the statistics are constants)."""
    fusions = [m for m in model.modules() if isinstance(m, ImageFusion) and m.prior_statistics is not None]
    if not stats or not fusions:
        yield
        return
    try:
        for m in fusions:
            m.fixed = ImageContext(stats, None)
        yield
    finally:
        for m in fusions:
            m.fixed = None
