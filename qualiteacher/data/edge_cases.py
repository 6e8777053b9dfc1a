"""A folder of hostile images, to check that scoring and restoring survive any input.

`build_edge_case_folder` writes one ordinary photo-like image and the files that broke commands
before (README, "Safety and robustness"): a constant image, a 1 x 1 image, a 20000 x 8 strip, a PNG whose
header declares 12000 x 12000 pixels in about 18 KB (`write_png_header_bomb`, written without
ever holding the pixels in memory), a file that is not an image, a dangling link and a folder
named like an image.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from qualiteacher.data.io import write_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_header_bomb(path: str | Path, width: int = 12000, height: int = 12000) -> Path:
    """A valid 1-bit grayscale PNG of ``width`` x ``height`` black pixels, streamed row by row
    through zlib: a few KB on disk, ``width * height`` pixels once decoded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)          # filter byte + packed 1-bit pixels
    comp = zlib.compressobj(9)
    rows_per_block = max(1, (1 << 22) // len(row))         # ~4 MB of raw rows per call
    block = row * rows_per_block
    parts = []
    for start in range(0, height, rows_per_block):
        n = min(rows_per_block, height - start)
        parts.append(comp.compress(block if n == rows_per_block else row * n))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts))
                     + _chunk(b"IEND", b""))
    return path


def build_edge_case_folder(folder: str | Path, size: int = 48, seed: int = 0) -> dict[str, str]:
    """Write the hostile files into ``folder``; returns file name -> what it is. Only
    ``normal.png`` is an ordinary image; every other entry must be reported, never crash a command."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    normal = np.stack([0.5 + 0.3 * np.sin(6 * xx + c) * np.cos(4 * yy) for c in range(3)], -1)
    write_image(folder / "normal.png", np.clip(normal + 0.05 * rng.standard_normal(normal.shape), 0, 1))
    write_image(folder / "flat.png", np.full((size, size, 3), 0.5, np.float32))
    write_image(folder / "one_pixel.png", np.full((1, 1, 3), 0.25, np.float32))
    write_image(folder / "strip_20000x8.png", rng.random((8, 20000, 3)).astype(np.float32))
    write_png_header_bomb(folder / "bomb_12000x12000.png")
    (folder / "not_an_image.png").write_bytes(b"this is text, not a PNG")
    (folder / "folder.png").mkdir(exist_ok=True)
    link = folder / "dangling.png"
    if not link.is_symlink():
        os.symlink(folder / "missing_target.png", link)
    return {
        "normal.png": "an ordinary image",
        "flat.png": "a constant image (natural-scene statistics undefined)",
        "one_pixel.png": "a 1 x 1 image",
        "strip_20000x8.png": "a 20000 x 8 strip (extreme aspect ratio)",
        "bomb_12000x12000.png": "a PNG declaring 12000 x 12000 pixels in a few KB",
        "not_an_image.png": "a text file with an image suffix",
        "folder.png": "a folder named like an image",
        "dangling.png": "a symbolic link to a missing file",
    }
