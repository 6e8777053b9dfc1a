"""Training / validation data: `RestorationDataModule` (its datasets: `qualiteacher.data.datasets`).

Train batches are ``{"labeled": L, "unlabeled": U}`` from a Lightning ``CombinedLoader`` in mode
``max_size_cycle`` (``{"labeled": L}`` alone when no unlabeled data is given):

- ``L = {"lq": (B,3,c,c), "gt": (B,3,c,c), "quality": (B,) float32 (NaN if unknown), "id": list[str]}``
- ``U = {"lq": (B,3,c,c), "id": list[str]}``
- with ``context_side`` s, both also hold ``"context": (B,3,s,s)``, each crop's whole LQ image

Both sides get the same weak CPU augmentation (albumentations: random crop to ``crop_size``,
horizontal and vertical flips), applied to ``lq`` and ``gt`` together so paired crops stay aligned.
Validation batches are ``{"lq", "gt" (paired layouts only), "id"}`` at batch size 1, centre-cropped
so that height and width are multiples of ``val_multiple`` (and to ``val_crop_size`` if given).
Small images and bad files: see `qualiteacher.data.datasets`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from qualiteacher.data.datasets import SMALL_IMAGE_MODES, CropDataset, EvalDataset, seed_worker
from qualiteacher.data.io import get_skip_log
from qualiteacher.data.layouts import check_layout, read_layout
from qualiteacher.data.records import ImageRecord

log = logging.getLogger(__name__)

def read_quality_table(path: str | Path, records: Sequence[ImageRecord]) -> list[float]:
    """Fused quality per record from a CSV/parquet table with columns ``fused`` and ``id`` or ``path``.

    Matching: by ``id`` if the table has that column, else by ``path`` (relative entries are taken
    relative to the table's folder, or to the working folder) against the record's ``gt``, then
    ``lq``. Records without an entry get NaN (reported).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table = pd.read_csv(path, dtype={"id": str})  # ids such as "0007" stay strings
    elif suffix in (".parquet", ".pq"):
        table = pd.read_parquet(path)
    else:
        raise ValueError(f"quality table must be .csv or .parquet: {path}")
    if "fused" not in table.columns or not {"id", "path"} & set(table.columns):
        raise ValueError(f"quality table {path} needs a 'fused' column and an 'id' or 'path' column; "
                         f"it has: {', '.join(map(str, table.columns))}")
    fused = table["fused"].astype(float).tolist()
    if "id" in table.columns:
        by_id = dict(zip(table["id"].astype(str), fused))
        values = [by_id.get(r.id, math.nan) for r in records]
    else:
        by_path: dict[Path, float] = {}
        for entry, q in zip(table["path"].astype(str), fused):
            p = Path(entry)
            for base in ((path.parent, Path.cwd()) if not p.is_absolute() else (Path("/"),)):
                by_path.setdefault((base / p).resolve(), q)
        values = []
        for r in records:
            keys = [k.resolve() for k in (r.gt, r.lq) if k is not None]
            values.append(next((by_path[k] for k in keys if k in by_path), math.nan))
    missing = sum(math.isnan(v) for v in values)
    if missing:
        log.warning("quality table %s: no score for %d of %d labeled images (NaN)", path, missing, len(values))
    return values


class RestorationDataModule(pl.LightningDataModule):
    """Paired labeled data, optional unlabeled real data and optional validation data.

    Args:
        labeled_root: folder of the labeled (paired) set, read with ``labeled_layout``. A layout
            without references (e.g. ``unpaired`` clean images for stage 1) uses each image as its
            own ``gt``.
        unlabeled_root: folder of unlabeled real images (stage 3), read with ``unlabeled_layout``.
        val_root: folder of validation images, read with ``val_layout``.
        labeled_split / unlabeled_split / val_split: ``split`` option of the reader, if any
            (``real3000``: train/test/all, ``exdark``: train/val/test/all, ``realsnow``: sub-folder).
        crop_size: side of the square training crops.
        batch_size / unlabeled_batch_size: batch sizes (unlabeled defaults to ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: seeds shuffling and augmentation (labeled ``seed``, unlabeled ``seed + 1``).
        small_images: ``"pad"`` (reflect-pad up to the crop) or ``"skip"``.
        quality_table: CSV/parquet with ``fused`` and ``id`` or ``path``: the labeled ``quality``.
        augment: random flips on top of the random crop.
        unlabeled_fixed_view: serve every unlabeled image as the same centre crop, without flips
            (default). The pseudo-label bank keeps candidates per image id, so they must refer to
            one fixed view; stage 3 applies its geometric augmentation on the accelerator to the
            input and its pseudo-labels alike.
        val_crop_size: centre-crop validation images to this side (``None``: whole images).
        val_multiple: validation sides are centre-cropped to a multiple of this.
        clean_pairs: fraction of labeled pairs served as ``gt -> gt`` (the clean image as its own
            input): "do no harm", a clean or lightly degraded photo must come back as it went in.
        context_side: training items also hold ``context``, their whole LQ image at this side
            (``CropDataset``): a fusion prior's image statistics measured on the whole image, as at
            inference. None: each crop's own.
        extra_haze: labeled inputs get, half the time, a uniform layer of extra haze of optical depth
            up to this (`CropDataset`): denser haze than the paired data holds. 0: off.
        clean_exposure: clean pairs are, half the time, shown darker by up to this many stops
            (`CropDataset`): do no harm to dim but properly exposed photos too. 0: off.

    Skipped files go to the process' default `SkipLog` (``self.skip_log``, `get_skip_log()`);
    DataLoader workers keep their own copies.
    """

    def __init__(
        self,
        labeled_root: str,
        unlabeled_root: str | None = None,
        val_root: str | None = None,
        labeled_layout: str = "paired",
        unlabeled_layout: str = "unpaired",
        val_layout: str = "paired",
        labeled_split: str | None = None,
        unlabeled_split: str | None = None,
        val_split: str | None = None,
        crop_size: int = 64,
        batch_size: int = 4,
        unlabeled_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        small_images: str = "pad",
        quality_table: str | None = None,
        augment: bool = True,
        unlabeled_fixed_view: bool = True,
        val_crop_size: int | None = None,
        val_multiple: int = 8,
        clean_pairs: float = 0.0,
        context_side: int | None = None,
        extra_haze: float = 0.0,
        clean_exposure: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= clean_pairs <= 1.0:
            raise ValueError(f"clean_pairs must lie in [0, 1], got {clean_pairs}")
        for name, value in (("crop_size", crop_size), ("batch_size", batch_size),
                            ("unlabeled_batch_size", unlabeled_batch_size),
                            ("val_crop_size", val_crop_size), ("val_multiple", val_multiple),
                            ("context_side", context_side)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if extra_haze < 0:
            raise ValueError(f"extra_haze must be >= 0, got {extra_haze}")
        if clean_exposure < 0:
            raise ValueError(f"clean_exposure must be >= 0 (stops), got {clean_exposure}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if small_images not in SMALL_IMAGE_MODES:
            raise ValueError(f"small_images must be one of {', '.join(SMALL_IMAGE_MODES)}; got {small_images!r}")
        for layout in (labeled_layout, unlabeled_layout, val_layout):
            check_layout(layout)
        for name, folder in (("labeled_root", labeled_root), ("unlabeled_root", unlabeled_root),
                             ("val_root", val_root)):
            if folder is not None and not Path(folder).is_dir():
                raise FileNotFoundError(f"{name} folder does not exist: {folder}")
        if quality_table is not None and not Path(quality_table).is_file():
            raise FileNotFoundError(f"quality_table file does not exist: {quality_table}")
        self.save_hyperparameters()
        self.labeled_root, self.unlabeled_root, self.val_root = labeled_root, unlabeled_root, val_root
        self.layouts = {"labeled": labeled_layout, "unlabeled": unlabeled_layout, "val": val_layout}
        self.splits = {"labeled": labeled_split, "unlabeled": unlabeled_split, "val": val_split}
        self.crop_size, self.batch_size = crop_size, batch_size
        self.unlabeled_batch_size = unlabeled_batch_size or batch_size
        self.num_workers, self.seed, self.small_images = num_workers, seed, small_images
        self.quality_table, self.augment = quality_table, augment
        self.unlabeled_fixed_view = unlabeled_fixed_view
        self.val_crop_size, self.val_multiple = val_crop_size, val_multiple
        self.clean_pairs, self.context_side, self.extra_haze = clean_pairs, context_side, extra_haze
        self.clean_exposure = clean_exposure
        self.skip_log = get_skip_log()  # the process' default log: run drivers print its summary
        self.datasets: dict[str, Dataset] = {}

    def _read(self, part: str, root: str) -> list[ImageRecord]:
        options: dict[str, object] = {}
        if self.splits[part] is not None:
            options["split"] = self.splits[part]
        if self.layouts[part] in ("rtts", "exdark"):
            options["skip_log"] = self.skip_log
        return read_layout(self.layouts[part], root, **options)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and "labeled" not in self.datasets:
            labeled = self._read("labeled", self.labeled_root)
            quality = None if self.quality_table is None else read_quality_table(self.quality_table, labeled)
            self.datasets["labeled"] = CropDataset(
                labeled, self.crop_size, paired=True, quality=quality, augment=self.augment,
                small_images=self.small_images, seed=self.seed, skip_log=self.skip_log,
                clean_pairs=self.clean_pairs, context_side=self.context_side, extra_haze=self.extra_haze,
                clean_exposure=self.clean_exposure)
            if self.unlabeled_root is not None:
                self.datasets["unlabeled"] = CropDataset(
                    self._read("unlabeled", self.unlabeled_root), self.crop_size, paired=False,
                    augment=self.augment and not self.unlabeled_fixed_view, small_images=self.small_images,
                    seed=self.seed + 1, skip_log=self.skip_log, random_crop=not self.unlabeled_fixed_view,
                    context_side=self.context_side)
        if stage in (None, "fit", "validate") and self.val_root is not None and "val" not in self.datasets:
            records = self._read("val", self.val_root)
            self.datasets["val"] = EvalDataset(
                records, paired=all(r.gt is not None for r in records), multiple=self.val_multiple,
                crop_size=self.val_crop_size, skip_log=self.skip_log)

    def _loader(self, part: str, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
        if part not in self.datasets:
            raise RuntimeError(f"no {part} data set: call setup() first (or give the {part} folder)")
        dataset = self.datasets[part]
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) >= batch_size,
            num_workers=self.num_workers,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(seed),
            persistent_workers=False,
        )

    def train_dataloader(self) -> CombinedLoader:
        loaders = {"labeled": self._loader("labeled", self.batch_size, True, self.seed)}
        if "unlabeled" in self.datasets:
            loaders["unlabeled"] = self._loader("unlabeled", self.unlabeled_batch_size, True, self.seed + 1)
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader | list:
        if self.val_root is None:
            return []
        return self._loader("val", 1, False, self.seed)

    def teardown(self, stage: str | None = None) -> None:
        if len(self.skip_log):
            log.warning("data: %s", self.skip_log.summary())
