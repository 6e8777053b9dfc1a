"""Image I/O that survives real folders: odd pixel formats, EXIF rotation, broken files.

Every image is read as float32 RGB ``(H, W, 3)`` in ``[0, 1]``:

- 8-bit modes (L, P, RGB, CMYK, YCbCr, ...) are converted to RGB and divided by 255;
- 16-bit grayscale (Pillow modes ``I;16*``, 16-bit PNG/TIFF) is divided by 65535 (never clipped to
  255); 32-bit integer mode ``I`` is treated as 16-bit data; float mode ``F`` is clipped to [0, 1];
- transparency (RGBA, LA, PA, P with a transparent colour) is composited over **white**, the way an
  image viewer shows it, rather than dropped (a dropped alpha leaves arbitrary colours where the
  image is transparent);
- the EXIF orientation tag is applied (the array is what a viewer shows);
- multi-frame files (TIFF pages, animations) give their first frame.

A file that cannot be decoded (missing, empty, truncated, corrupt, not an image), a float image
holding NaN / infinite values, and a file whose header declares more pixels than the cap
(``QUALITEACHER_MAX_PIXELS``, default 64 million, checked before any pixel is decoded: a 20-KB PNG
can declare 12000 x 12000) raise `ImageReadError` carrying the path and the reason. Data sets catch
it and record it in a `SkipLog`.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

MAX_PIXELS_ENV = "QUALITEACHER_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 64_000_000  # 48-MP phone photos pass; decoding one costs ~0.8 GB as float32 RGB

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageReadError(ValueError):
    """An image file could not be read; carries the ``path`` and the ``reason``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) when sent from a DataLoader worker
        return (type(self), (self.path, self.reason))


def configured_max_pixels() -> int | None:
    """The pixel cap of `read_image`: ``$QUALITEACHER_MAX_PIXELS`` (0: no cap) or the default."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r} is not a number of pixels (0: no cap)") from None
    return value if value > 0 else None


def read_image(path: str | os.PathLike, max_pixels: int | None = -1) -> np.ndarray:
    """Read an image file as float32 RGB ``(H, W, 3)`` in ``[0, 1]``.

    See the module docstring for the conversion rules. Raises `ImageReadError` (a ``ValueError``)
    with the path and the reason when the file is missing, empty, truncated, corrupt or not an
    image, holds non-finite float pixels, or declares more than ``max_pixels`` pixels in its header
    (default -1: `configured_max_pixels`; None or 0: no cap), checked before decoding.
    """
    cap = configured_max_pixels() if max_pixels == -1 else (max_pixels or None)
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file does not exist")
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # our own cap decides; Pillow's bomb warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im_file = Image.open(path)
        with im_file as im:
            w, h = im.size
            if cap is not None and w * h > cap:
                raise ImageReadError(path, f"{w}x{h} = {w * h / 1e6:.1f} MP exceeds the pixel cap of "
                                           f"{cap / 1e6:g} MP (raise it with --max-pixels or {MAX_PIXELS_ENV})")
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception as exc:  # noqa: BLE001  a broken EXIF block must not lose a readable image
                log.debug("ignoring unreadable EXIF orientation in %s: %s", path, exc)
            return _to_rgb_float(im)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            reason = f"truncated file ({reason})"
        raise ImageReadError(path, reason) from None
    except ValueError as exc:  # e.g. a mode Pillow cannot convert to RGB
        raise ImageReadError(path, f"unsupported pixel data: {exc}") from None


def _to_rgb_float(im: Image.Image) -> np.ndarray:
    if im.mode in _SIXTEEN_BIT_MODES or im.mode == "I":
        return _gray_to_rgb(np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0))
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        bad = int(arr.size - np.isfinite(arr).sum())
        if bad:  # NaN would restore to black and score as NaN: refuse the file instead
            raise ValueError(f"float image holds {bad} NaN or infinite pixel value(s)")
        return _gray_to_rgb(np.clip(arr, 0.0, 1.0))
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in _ALPHA_MODES and im.mode != "RGBA":
        im = im.convert("RGBA")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode not in ("L", "RGB", "RGBA"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...
    arr = np.asarray(im, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        return _gray_to_rgb(arr)
    if arr.shape[2] == 4:  # composite over white
        alpha = arr[..., 3:4]
        arr = arr[..., :3] * alpha + (1.0 - alpha)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2), dtype=np.float32)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` float array -> contiguous float32 tensor ``(3, H, W)``."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


def write_image(path: str | os.PathLike, image: np.ndarray | torch.Tensor) -> Path:
    """Write an image as an 8-bit PNG, creating parent folders; returns the path.

    ``image``: a numpy ``(H, W, 3)`` / ``(H, W)`` array or a tensor ``(3, H, W)`` / ``(1, H, W)`` /
    ``(1, 3, H, W)``; floats are taken in ``[0, 1]`` (clipped, rounded), uint8 is written as is.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"write_image writes PNG files; got suffix {path.suffix!r} in {path}")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"expected a (3, H, W) or (1, H, W) tensor, got shape {tuple(image.shape)}")
        arr = t.permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"expected an (H, W, 3) or (H, W) image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.round(np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")
    return path


def list_images(folder: str | os.PathLike, recursive: bool = False,
                skip_log: SkipLog | None = None) -> list[Path]:
    """Sorted image files of ``folder`` with a recognised suffix (case-insensitive).

    Hidden files (name starting with ``.``, e.g. macOS ``._x.png`` resource forks) are ignored.
    A name with an image suffix that is not a readable file (a dangling symbolic link, a folder
    named ``x.png``) is reported in ``skip_log`` (default: the process' `SkipLog`) and left out.
    Raises ``FileNotFoundError`` / ``NotADirectoryError`` naming the folder.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder does not exist: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    out = []
    for p in candidates:
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
            continue
        if p.is_file():
            out.append(p)
            continue
        log = skip_log if skip_log is not None else get_skip_log()
        if p.is_symlink() and not p.exists():
            log.record(p, f"dangling symbolic link (its target {os.readlink(p)} does not exist)")
        elif p.is_dir():
            log.record(p, "is a directory, not an image file")
        else:
            log.record(p, "not a regular file")
    return sorted(out)


def pad_to_size(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad an ``(H, W, C)`` image up to at least ``height x width`` (small-image rule).

    The rule: an image smaller than the crop is padded symmetrically (the odd pixel at the
    bottom/right) by reflection, or by replicating the border where a side is too short to reflect
    (``pad >= side``). Images already large enough are returned unchanged. The same call on a
    paired ``lq``/``gt`` gives aligned results.
    """
    h, w = image.shape[:2]
    ph, pw = max(height - h, 0), max(width - w, 0)
    if ph == 0 and pw == 0:
        return image
    mode = "reflect" if ph < h and pw < w else "edge"
    pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, pad, mode=mode)


class SkipLog:
    """Record of skipped files: each path is reported once (a logger warning), every skip counted.

    One instance lives in each process (DataLoader workers each have their own copy), guarded by a
    lock for threads. ``summary()`` gives the line a run ends with.
    """

    def __init__(self, name: str = "qualiteacher.data") -> None:
        self._logger = logging.getLogger(name)
        self._lock = threading.Lock()
        self._reasons: dict[str, str] = {}
        self.count = 0  # skip events, repeats of one path included

    def __getstate__(self) -> dict:  # picklable for spawned DataLoader workers
        with self._lock:
            return {"name": self._logger.name, "reasons": dict(self._reasons), "count": self.count}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["name"])
        self._reasons.update(state["reasons"])
        self.count = state["count"]

    def record(self, path: str | os.PathLike, reason: str) -> bool:
        """Count one skip of ``path``; warn on its first occurrence. Returns True if it was new."""
        key = str(path)
        with self._lock:
            self.count += 1
            if key in self._reasons:
                return False
            self._reasons[key] = reason
        self._logger.warning("skipping %s: %s", key, reason)
        return True

    @property
    def paths(self) -> dict[str, str]:
        """Skipped path -> first reason."""
        with self._lock:
            return dict(self._reasons)

    def __len__(self) -> int:
        with self._lock:
            return len(self._reasons)

    def clear(self) -> None:
        with self._lock:
            self._reasons.clear()
            self.count = 0

    def summary(self, max_items: int = 10) -> str:
        """One-paragraph summary: how many files were skipped, and the first ``max_items``."""
        with self._lock:
            items = list(self._reasons.items())
            count = self.count
        if not items:
            return "no files skipped"
        lines = [f"skipped {len(items)} file(s) ({count} skip event(s)):"]
        lines += [f"  {p}: {r}" for p, r in items[:max_items]]
        if len(items) > max_items:
            lines.append(f"  ... and {len(items) - max_items} more")
        return "\n".join(lines)


_DEFAULT_SKIP_LOG: SkipLog | None = None
_DEFAULT_LOCK = threading.Lock()


def get_skip_log() -> SkipLog:
    """The process' default `SkipLog` (created on first use)."""
    global _DEFAULT_SKIP_LOG
    with _DEFAULT_LOCK:
        if _DEFAULT_SKIP_LOG is None:
            _DEFAULT_SKIP_LOG = SkipLog()
        return _DEFAULT_SKIP_LOG
