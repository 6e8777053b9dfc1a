"""Images at a bounded size and memory: 8-bit reading, and grading a large image at a bounded scale.

IQA members were made for images of a few hundred pixels a side; a 12-MP photo graded at full
size costs each member a full-resolution float copy (and a header-only 60-MP PNG costs gigabytes)
and says little more. Here an image is read as 8-bit RGB (a quarter of float32), downscaled in
8-bit by Pillow (box reduction, then antialiased resampling) until its longer side is at most
``max_side``, and only then turned into float32: what ``qualiteacher score`` and the reward guard
grade. :func:`read_uint8` is also how ``qualiteacher restore`` keeps a photo in 8-bit until a tile
of it is needed.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from qualiteacher.data.io import ImageReadError, configured_max_pixels, read_image

SCORE_SIDE = 1024  # default longer side at which `score` grades (images above are downscaled)
_EIGHT_BIT = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "RGBa", "La", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_WHITE = (255, 255, 255, 255)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` from the file's header (nothing decoded); the EXIF rotation is not
    applied (the pixel count is the same). ``ImageReadError`` when the file is not an image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size[1], im.size[0]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        pass
    read_image(path)  # not an image: read_image names the problem (missing, empty, not an image ...)
    raise ImageReadError(path, "unreadable image header")  # pragma: no cover  (read, yet no header)


def read_uint8(path: str | os.PathLike, max_side: int | None = None, max_pixels: int | None = -1) -> np.ndarray:
    """An image as uint8 RGB ``(H, W, 3)``, by the rules of ``qualiteacher.data.io.read_image``
    (EXIF rotation, alpha over white, pixel cap from the header), downscaled so that the longer
    side is at most ``max_side`` (``None``: full size). 16-bit and float files go through
    ``read_image`` and are rounded to 8 bits; unreadable files raise its ``ImageReadError``."""
    cap = configured_max_pixels() if max_pixels == -1 else (max_pixels or None)
    try:
        with warnings.catch_warnings():  # the pixel cap decides; Pillow's bomb warning would repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im_file = Image.open(path)
        with im_file as im:
            eight_bit = im.mode in _EIGHT_BIT and (cap is None or im.size[0] * im.size[1] <= cap)
            if eight_bit:
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode in ("L", "RGB"):  # shrink first: a grey 60-MP bomb never becomes 4 bytes a pixel
                    return np.array(_rgb(_shrink(im, max_side)))  # writable: torch.from_numpy takes it as is
                return np.array(_shrink(_rgb(im), max_side))
    except Exception:  # noqa: BLE001, S110  read_image below names the problem of a file Pillow cannot use
        pass
    # 16-bit / float pixels, an image over the pixel cap, a broken file: read_image's rules and errors
    x = torch.from_numpy(read_image(path, max_pixels=max_pixels)).permute(2, 0, 1)[None]
    x = fit_side(x, max_side) if max_side else x
    return (x[0].permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def _rgb(im: Image.Image) -> Image.Image:
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _shrink(im: Image.Image, max_side: int | None) -> Image.Image:
    w, h = im.size
    if not max_side or max(w, h) <= max_side:
        return im
    s = max_side / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return im.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)  # box-reduce first: bounded, antialiased


def read_bounded(path: str | os.PathLike, max_side: int | None = SCORE_SIDE) -> np.ndarray:
    """:func:`read_uint8` at a longer side of at most ``max_side``, as float32 ``(H, W, 3)`` in [0, 1]
    (what ``read_image`` gives for an image within the bound)."""
    return read_uint8(path, max_side).astype(np.float32) / 255.0


def fit_side(images: Tensor, side: int | None) -> Tensor:
    """Bilinear (antialiased) downscale of (B, C, H, W) so the longer side is at most ``side``
    (``None`` / 0: unchanged)."""
    h, w = images.shape[-2:]
    if not side or max(h, w) <= side:
        return images
    s = side / max(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def score_bounded(ensemble: Any, images: Tensor, max_side: int | None = SCORE_SIDE) -> Any:
    """``ensemble(images)`` on copies whose longer side is at most ``max_side``: an ensemble's
    scores of a large image without a full-resolution float copy per member."""
    return ensemble(fit_side(images, max_side))


def check_side(max_side: int | None) -> int | None:
    """``--max-side``: ``None`` / 0 (full size) or at least 32 px; a ``ValueError`` otherwise."""
    if max_side is not None and max_side != 0 and max_side < 32:
        raise ValueError(f"--max-side {max_side}: grade at 32 px a side at least (0: full size)")
    return max_side or None

