"""Reading checkpoints safely: tensors and plain data only, every expected weight present.

Every checkpoint QualiTeacher reads goes through :func:`read_checkpoint`, which calls
``torch.load(..., weights_only=True)``: a file that holds anything but tensors and plain Python
containers (a crafted pickle that would run code when loaded) is refused before any of it runs.
Problems come back as one :class:`CheckpointError` line naming the file and the problem:
``truncated``, ``not a PyTorch checkpoint``, ``refused: ... would run code``, ``not a stage-3
checkpoint``, ``keys missing: ...``, ``unexpected keys: ...``.

``torch.compile`` saves a compiled submodule's weights as ``<name>._orig_mod.<param>``. Such keys
are accepted on purpose (:func:`strip_compiled_prefix`); a file that mixes compiled and plain keys
for the same weight is refused (``compiled-model keys``), since which of the two is meant is unknown.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

COMPILED_SEGMENT = "_orig_mod."
_ZIP_MAGIC = b"PK\x03\x04"
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the problem in one line."""

    def __init__(self, path: str | Path, problem: str, what: str = "checkpoint") -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{what} {self.path}: {problem}")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The content of a checkpoint file, loaded with ``weights_only=True`` on the CPU.

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` for an empty,
    truncated, foreign or unsafe one (a pickle that references code is never executed).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(path, "is a folder, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(path, "truncated (empty file, 0 bytes)")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  every failure becomes one named problem
        raise CheckpointError(path, _load_problem(err, magic, size)) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(path, f"not a checkpoint: holds a {type(ckpt).__name__}, not a dict of weights")
    return ckpt


def _load_problem(err: Exception, magic: bytes, size: int) -> str:
    text = str(err)
    unsafe = _UNSAFE_GLOBAL.search(text)
    if unsafe or "Weights only load failed" in text:
        what = f" ({unsafe.group(1)})" if unsafe else ""
        return (f"refused: it holds Python objects{what} that would run code when loaded; only tensors "
                f"and plain data are read (re-save the weights with torch.save(state_dict))")
    if magic == _ZIP_MAGIC:
        return f"truncated or damaged ({size} bytes; the zip archive is incomplete: {text.splitlines()[0][:120]})"
    if isinstance(err, EOFError):
        return f"truncated ({size} bytes)"
    return f"not a PyTorch checkpoint ({type(err).__name__}: {text.splitlines()[0][:120] if text else 'unreadable'})"


def _numpy_array_globals() -> list[Any]:
    # what a pickled NumPy array or scalar references: constructors of plain data, no code
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?")]
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar, *dtypes]


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within this block every ``torch.load`` reads with ``weights_only=True``, whatever its caller
    passes (third-party loaders such as pyiqa's pass ``weights_only=False``) and whatever
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says; NumPy arrays are allowed as plain data. A file that
    references anything else is refused with :class:`CheckpointError` (``refused: ... would run
    code``) before any of it runs. Not thread-safe: it swaps ``torch.load`` for the block."""
    original = torch.load
    allowed = _numpy_array_globals()

    def load(f: Any, map_location: Any = None, pickle_module: Any = None, *args: Any, **kwargs: Any) -> Any:
        name = getattr(f, "name", f)
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, map_location=map_location, weights_only=True, mmap=kwargs.get("mmap"))
        except pickle.UnpicklingError as err:
            raise CheckpointError(str(name), _load_problem(err, b"", 0), what="weight file") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def checkpoint_state(ckpt: Mapping[str, Any], path: str | Path) -> dict[str, Tensor]:
    """The weights of a Lightning checkpoint (``state_dict``) or of a bare state dict, with any
    ``torch.compile`` prefixes removed. Every value must be a tensor."""
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, Mapping):
        raise CheckpointError(path, "not a checkpoint: 'state_dict' is not a mapping of weights")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(path, f"not a checkpoint of weights: non-tensor entries {_names(bad)}")
    return strip_compiled_prefix(dict(state), path)


def strip_compiled_prefix(state: Mapping[str, Tensor], path: str | Path = "<state dict>") -> dict[str, Tensor]:
    """``a._orig_mod.b`` → ``a.b`` (and a leading ``_orig_mod.``): the keys ``torch.compile`` writes.

    Raises :class:`CheckpointError` (``compiled-model keys``) when a compiled key and a plain key
    name the same weight.
    """
    out: dict[str, Tensor] = {}
    compiled = 0
    for key, value in state.items():
        plain = key.replace("." + COMPILED_SEGMENT, ".").removeprefix(COMPILED_SEGMENT)
        if plain != key:
            compiled += 1
        if plain in out:
            raise CheckpointError(path, f"compiled-model keys clash with plain keys ({key} and {plain}): "
                                        f"load the compiled model's own state_dict, or save one of the two")
        out[plain] = value
    if compiled:
        log.info("%s: %d torch.compile key(s) (%s*) read as plain keys", path, compiled, COMPILED_SEGMENT)
    return out


def check_keys(path: str | Path, have: Iterable[str], expected: Iterable[str], what: str = "model",
               ignore: tuple[str, ...] = ()) -> None:
    """Raise :class:`CheckpointError` unless ``have`` holds exactly the ``expected`` keys
    (keys starting with an ``ignore`` prefix are left out on both sides)."""
    have = {k for k in have if not k.startswith(ignore)} if ignore else set(have)
    expected = {k for k in expected if not k.startswith(ignore)} if ignore else set(expected)
    missing, unexpected = sorted(expected - have), sorted(have - expected)
    if missing and not have & expected:
        raise CheckpointError(path, f"holds none of the {what}'s {len(expected)} weights "
                                    f"(keys missing: {_names(missing)}; it has: {_names(sorted(have))})")
    if missing:
        raise CheckpointError(path, f"keys missing: {_names(missing)} ({len(missing)} of the {what}'s "
                                    f"{len(expected)} weights)")
    if unexpected:
        raise CheckpointError(path, f"unexpected keys: {_names(unexpected)} ({len(unexpected)} not in the {what})")


def describe(state: Mapping[str, Tensor]) -> str:
    """What a checkpoint looks like, from its weight names (for 'not a stage-N checkpoint' messages)."""
    tops = {k.split(".", 1)[0] for k in state}
    if "autoencoder" in tops:
        return "a stage-1 (codebook autoencoder) checkpoint"
    if "target_encoder" in tops:
        return "a stage-2 (code prediction) checkpoint"
    if "student" in tops and "teacher" not in tops:
        return "a warm-up or fidelity-stage checkpoint (student only)"
    if not state:
        return "an empty checkpoint (no weights)"
    return f"a checkpoint with weights {_names(sorted(tops))}"


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, … (+{len(keys) - limit})" if len(keys) > limit else shown


# ---------------------------------------------------------------------------- resume
LAST_NAME, PREV_NAME = "last.ckpt", "prev.ckpt"


def checkpoint_is_whole(path: str | Path) -> str | None:
    """None when ``path`` is a complete checkpoint archive, else what is wrong with it (cheap: the
    zip directory sits at the end of the file, so a file cut short by a kill has none)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "truncated (empty file)"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(n.endswith("data.pkl") for n in archive.namelist()):
                return "not a PyTorch checkpoint archive"
    except (zipfile.BadZipFile, OSError) as err:
        return f"truncated or damaged ({err})"
    return None


def resume_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint a stage resumes from: ``last.ckpt`` if whole, else ``prev.ckpt`` (kept by
    :func:`rotating_checkpoint`) with a warning, else None when there is neither. When neither
    is readable, :class:`CheckpointError` says so (delete the folder to start the stage afresh)."""
    folder = Path(folder)
    last, prev = folder / LAST_NAME, folder / PREV_NAME
    if not last.exists() and not prev.exists():
        return None
    problem = checkpoint_is_whole(last) if last.exists() else "missing"
    if problem is None:
        return last
    if prev.exists() and checkpoint_is_whole(prev) is None:
        log.warning("%s is %s: resuming from the previous checkpoint %s (the steps since are trained again)",
                    last, problem, prev)
        return prev
    raise CheckpointError(last, f"{problem}, and no readable {PREV_NAME} beside it: delete {folder} to "
                                f"train this stage from the start")


def rotating_checkpoint(dirpath: str | Path, every_n_train_steps: int) -> Any:
    """Lightning ``ModelCheckpoint`` writing ``last.ckpt`` every ``every_n_train_steps`` steps,
    which first renames the existing ``last.ckpt`` to ``prev.ckpt``: a kill while the new one is
    written leaves a whole checkpoint to resume from (:func:`resume_checkpoint`)."""
    # lazy: lightning takes 4 s to import; this basic module is read by commands that never train
    from lightning.pytorch.callbacks import ModelCheckpoint

    class KeepPrevious(ModelCheckpoint):
        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            path = Path(filepath)
            if path.name == LAST_NAME and path.is_file() and trainer.is_global_zero:
                os.replace(path, path.with_name(PREV_NAME))  # atomic rename, no copy
            super()._save_checkpoint(trainer, filepath)

    return KeepPrevious(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps)
