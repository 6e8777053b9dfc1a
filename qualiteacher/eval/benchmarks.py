"""The test sets users report on: which reader, which split, which detection classes.

An explicit table (`BENCHMARKS`) names each one; `resolve_benchmark` picks one for a task and a data
folder, and `read_benchmark` returns its records with a clear error for a missing folder or an empty
split. The protocols: Real3000 test = images 1705-2004; RTTS = every image (5 VOC classes); ExDark
= split 3 (test) of ``imageclasslist.txt`` (12 classes); RealSnow10K = every image (or a
sub-folder); ``demo`` = the embedded demo data's held-out ``TASK/test`` pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qualiteacher.data.layouts import EXDARK_CLASSES, RTTS_CLASSES, read_layout
from qualiteacher.data.records import ImageRecord


@dataclass(frozen=True)
class Benchmark:
    """A test set: ``layout`` reader with ``options``, ``subdir`` under the data root (``{task}``
    filled in, and ``{split}``: the asked split, else ``default_split``), and the detection
    ``classes`` when the set carries boxes (``None`` otherwise)."""

    name: str
    layout: str
    options: dict[str, Any] = field(default_factory=dict)
    subdir: str = ""
    classes: tuple[str, ...] | None = None
    default_split: str | None = None


BENCHMARKS: dict[str, Benchmark] = {
    # the demo data's test split by default; --split val / unseen read its other real-domain pairs
    "demo": Benchmark("demo", "paired", subdir="{task}/{split}", default_split="test"),
    "paired": Benchmark("paired", "paired"),
    "unpaired": Benchmark("unpaired", "unpaired"),
    "real3000": Benchmark("real3000", "real3000", {"split": "test"}),
    "rtts": Benchmark("rtts", "rtts", classes=RTTS_CLASSES),
    "exdark": Benchmark("exdark", "exdark", {"split": "test"}, classes=EXDARK_CLASSES),
    "realsnow": Benchmark("realsnow", "realsnow"),
}
# the real benchmark of each task when the data folder does not say otherwise
TASK_BENCHMARKS: dict[str, str] = {"dehaze": "real3000", "derain": "unpaired", "desnow": "realsnow",
                                   "lowlight": "exdark"}


def list_benchmarks() -> list[str]:
    """Names accepted by ``--benchmark``."""
    return list(BENCHMARKS)


def resolve_benchmark(name: str, task: str, data: str | Path) -> Benchmark:
    """The benchmark ``name``, or for ``"auto"`` the one the folder looks like: the demo layout
    (``DATA/TASK/test``), a paired folder (``lq/`` + ``gt/``), else the task's real benchmark."""
    if name != "auto":
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; known: auto, {', '.join(list_benchmarks())}")
        return BENCHMARKS[name]
    data = Path(data)
    if (data / task / "test" / "lq").is_dir():
        return BENCHMARKS["demo"]
    if (data / "lq").is_dir() and (data / "gt").is_dir():
        return BENCHMARKS["paired"]
    if task not in TASK_BENCHMARKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_BENCHMARKS)}")
    return BENCHMARKS[TASK_BENCHMARKS[task]]


def read_benchmark(bench: Benchmark, task: str, data: str | Path, split: str | None = None,
                   limit: int | None = None) -> list[ImageRecord]:
    """Records of ``bench`` under ``data`` (``split`` overrides the protocol's split); at most
    ``limit`` of them. Raises ``FileNotFoundError`` / ``ValueError`` naming the folder when the
    set is missing or the split is empty."""
    in_folder = "{split}" in bench.subdir
    where = bench.subdir.format(task=task, split=split or bench.default_split) if bench.subdir else ""
    root = Path(data) / where if where else Path(data)
    options = dict(bench.options)
    if split is not None and not in_folder:
        if "split" not in options and bench.layout not in ("realsnow",):
            raise ValueError(f"benchmark {bench.name!r} has no splits; leave --split out")
        options["split"] = split
    records = read_layout(bench.layout, root, **options)
    if not records:
        shown = split or bench.default_split if in_folder else options.get("split", "(all)")
        raise ValueError(f"{bench.name}: the split {shown!r} of {root} is empty")
    return records[:limit] if limit else records
