"""Where the pseudo-label bank keeps its entries' pixels: in RAM, or in content-addressed files.

An entry is one ``(4, H, W)`` uint8 array: the candidate's RGB image and its reliability mask.
Its key is a hash of the image id and the pixels, so a key names one content for ever:
:class:`DiskStore` never overwrites a file, and a checkpoint's index always points at files that
exist as long as nothing deletes them, which the bank does only after a checkpoint that no longer
needs them has been written (see :class:`qualiteacher.teacher.bank.PseudoLabelBank`).
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)
QUARANTINE = "quarantine"  # DiskStore: files it found but does not know (never deleted by it)


def entry_key(image_id: str, pixels: np.ndarray) -> str:
    """Content address of one entry: 32 hex digits of BLAKE2b over the id, the shape and the pixels."""
    h = hashlib.blake2b(digest_size=16)
    h.update(image_id.encode())
    h.update(b"\0" + repr(pixels.shape).encode() + b"\0")
    h.update(np.ascontiguousarray(pixels).data)
    return h.hexdigest()


class EntryStore(Protocol):
    """What the bank asks of a store. ``durable``: entries outlive the process (files), so the
    bank deletes them only once a checkpoint that no longer refers to them is written."""

    durable: bool

    def put(self, image_id: str, pixels: np.ndarray) -> str: ...

    def get_batch(self, keys: list[str]) -> Tensor: ...

    def delete(self, keys: list[str]) -> None: ...

    def adopt(self, keys: set[str]) -> None: ...

    def missing(self, keys: list[str]) -> list[str]: ...

    def state_dict(self, keys: list[str]) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class MemoryStore:
    """Entries in a dict (tiny runs and tests); the checkpoint carries the live ones."""

    durable = False

    def __init__(self) -> None:
        self.blobs: dict[str, Tensor] = {}

    def put(self, image_id: str, pixels: np.ndarray) -> str:
        key = entry_key(image_id, pixels)
        if key not in self.blobs:
            self.blobs[key] = torch.from_numpy(pixels.copy())  # a copy: never pin the caller's batch
        return key

    def get_batch(self, keys: list[str]) -> Tensor:
        return torch.stack([self.blobs[k] for k in keys])

    def delete(self, keys: list[str]) -> None:
        for k in keys:
            self.blobs.pop(k, None)

    def adopt(self, keys: set[str]) -> None:
        pass  # every blob in RAM is this run's

    def missing(self, keys: list[str]) -> list[str]:
        return [k for k in keys if k not in self.blobs]

    def state_dict(self, keys: list[str]) -> dict[str, Any]:
        return {"blobs": {k: self.blobs[k] for k in keys}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.blobs = dict(state.get("blobs", {}))


class DiskStore:
    """Entries as ``.npy`` files under ``root/<2 hex>/<key>.npy``, with a small LRU cache in RAM.

    Writes go to a temporary file that is then hard-linked to its final name, which fails if the
    name exists: a file is written once and never overwritten, and concurrent writers (DDP ranks
    sharing the folder) cannot leave a half-written entry behind.

    Deleting touches only this run's entries: the ones this process wrote or its index holds
    (:meth:`adopt`, called by the bank for every index it loads). A file the run does not know
    (another run's entry in a shared folder, or one a killed run wrote after its last checkpoint)
    is moved to ``root/quarantine/`` instead, with one warning: never deleted behind anyone's back.
    """

    durable = True

    def __init__(self, root: str | Path, cache_entries: int = 64) -> None:
        if cache_entries < 0:
            raise ValueError(f"cache_entries must be >= 0, got {cache_entries}")
        self.root = Path(root)  # created by the first write
        self.cache_entries = cache_entries
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._known: set[str] = set()  # keys written by this process or held by an index it loaded

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def _remember(self, key: str, pixels: Tensor) -> None:
        if self.cache_entries == 0:
            return
        self._cache[key] = pixels
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_entries:
            self._cache.popitem(last=False)

    def put(self, image_id: str, pixels: np.ndarray) -> str:
        key = entry_key(image_id, pixels)
        self._known.add(key)
        final = self.path(key)
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f"{key}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, pixels, allow_pickle=False)
            try:
                os.link(tmp, final)
            except FileExistsError:  # another rank wrote the same content first
                pass
            except OSError:  # a file system without hard links: same content, so replacing is safe
                os.replace(tmp, final)
            tmp.unlink(missing_ok=True)
        self._remember(key, torch.from_numpy(pixels.copy()))  # a copy: never pin the caller's batch
        return key

    def get_batch(self, keys: list[str]) -> Tensor:
        out = []
        for k in keys:
            pixels = self._cache.get(k)
            if pixels is None:
                try:
                    pixels = torch.from_numpy(np.load(self.path(k), allow_pickle=False))
                except FileNotFoundError:
                    raise FileNotFoundError(f"pseudo-label bank entry {self.path(k)} is missing: the bank "
                                            f"folder was changed outside the training run") from None
            self._remember(k, pixels)
            out.append(pixels)
        return torch.stack(out)

    def delete(self, keys: list[str]) -> None:
        """Delete this run's entries ``keys``; any other file among them goes to ``root/quarantine``."""
        foreign = []
        for k in keys:
            self._cache.pop(k, None)
            if k in self._known:
                self.path(k).unlink(missing_ok=True)
                self._known.discard(k)
            elif self.path(k).is_file():
                foreign.append(k)
        if foreign:
            quarantine = self.root / QUARANTINE
            quarantine.mkdir(parents=True, exist_ok=True)
            for k in foreign:
                os.replace(self.path(k), quarantine / f"{k}.npy")
            log.warning("pseudo-label bank %s: %d file(s) no index of this run refers to moved to %s (another "
                        "run's entries, or ones a killed run wrote after its last checkpoint); delete them "
                        "once no run uses this folder", self.root, len(foreign), quarantine)

    def adopt(self, keys: set[str]) -> None:
        """Mark ``keys`` as this run's entries (an index loaded from a checkpoint or merged from ranks)."""
        self._known |= set(keys)

    def missing(self, keys: list[str]) -> list[str]:
        return [k for k in keys if not self.path(k).is_file()]

    def keys_on_disk(self) -> set[str]:
        """Every entry file's key (for sweeping files a killed run wrote but never checkpointed)."""
        return {p.stem for p in self.root.glob("??/*.npy")}

    def state_dict(self, keys: list[str]) -> dict[str, Any]:
        return {}  # the files are the state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._cache.clear()
