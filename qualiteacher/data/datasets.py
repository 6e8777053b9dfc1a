"""The datasets `RestorationDataModule` serves: training crops, whole validation images, image folders.

Small images: an image smaller than the crop is reflect-padded up to it (`pad_to_size`);
``small_images="skip"`` skips it instead (recorded in the `SkipLog`). Bad files: a dataset that
meets an unreadable file records it in the `SkipLog` and serves the next readable index instead;
when no file is readable it raises ``RuntimeError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from kornia.color import linear_rgb_to_rgb, rgb_to_linear_rgb
from torch.utils.data import Dataset, get_worker_info

from qualiteacher.classical.dark_channel import airlight_of
from qualiteacher.data.io import (
    ImageReadError,
    SkipLog,
    get_skip_log,
    pad_to_size,
    read_image,
    to_tensor,
)
from qualiteacher.data.layouts import read_unpaired
from qualiteacher.data.records import ImageRecord

SMALL_IMAGE_MODES = ("pad", "skip")


def centre_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The central ``height x width`` window of an ``(H, W, C)`` image (no-op where smaller)."""
    h, w = image.shape[:2]
    top, left = max(h - height, 0) // 2, max(w - width, 0) // 2
    return image[top:top + min(height, h), left:left + min(width, w)]


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed the worker's dataset copy from the loader's seed."""
    info = get_worker_info()
    reseed = getattr(info.dataset, "reseed", None) if info is not None else None
    if reseed is not None:
        reseed(torch.initial_seed())  # base seed drawn from the loader's generator + worker id


def _serve(index: int, n: int, bad: set[int], load: Callable[[int], dict], skip_log: SkipLog, what: str) -> dict:
    """``load(index)``, or the next loadable index when it raises `ImageReadError`."""
    for k in range(n):
        j = (index + k) % n
        if j in bad:
            continue
        try:
            return load(j)
        except ImageReadError as exc:
            skip_log.record(exc.path, exc.reason)
            bad.add(j)
    raise RuntimeError(f"{what}: none of its {n} images can be served\n{skip_log.summary()}")


def _check_small(image: np.ndarray, size: int, mode: str, path: Path) -> np.ndarray:
    h, w = image.shape[:2]
    if h >= size and w >= size:
        return image
    if mode == "skip":
        raise ImageReadError(path, f"{w}x{h} is smaller than the crop {size}x{size} (small_images='skip')")
    return pad_to_size(image, size, size)


def _read_pair(record: ImageRecord, with_gt: bool) -> tuple[np.ndarray, np.ndarray | None]:
    lq = read_image(record.lq)
    if not with_gt:
        return lq, None
    if record.gt is None:  # clean-only set: the image is its own reference
        return lq, lq
    gt = read_image(record.gt)
    if gt.shape != lq.shape:
        raise ImageReadError(record.lq, f"size {lq.shape[1]}x{lq.shape[0]} differs from its gt {record.gt} "
                                        f"({gt.shape[1]}x{gt.shape[0]})")
    return lq, gt


def thicken_haze(image: np.ndarray, depth: float) -> np.ndarray:
    """``image`` (H, W, 3) float in [0, 1] behind a uniform layer of extra haze of optical depth
    ``depth``: ``I' = I t + A (1 - t)``, ``t = exp(-depth)``, ``A`` the image's airlight as the dark
    channel prior estimates it (`airlight_of`). On a hazy input ``I = J t0 + A (1 - t0)`` this is the
    scattering model again at transmission ``t0 t``: the same scene, denser haze, the same airlight."""
    if depth <= 0:
        return image
    airlight = airlight_of(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None])[0].numpy()
    t = math.exp(-depth)
    return (image * t + airlight[None, None, :] * (1.0 - t)).astype(np.float32)


def darken_exposure(image: np.ndarray, stops: float) -> np.ndarray:
    """``image`` (H, W, 3) sRGB in [0, 1] as if exposed ``stops`` stops shorter: linear light (the
    sRGB transfer curve undone) times ``2 ** -stops``, then the curve again. A clean photo stays
    clean, only dimmer: no noise, no cast, the same scene."""
    if stops <= 0:
        return image
    x = torch.from_numpy(np.ascontiguousarray(np.clip(image, 0.0, 1.0).transpose(2, 0, 1))).double()
    out = linear_rgb_to_rgb(rgb_to_linear_rgb(x) * 2.0 ** -stops)
    return out.permute(1, 2, 0).numpy().astype(np.float32)


def whole_image_view(image: np.ndarray, side: int) -> torch.Tensor:
    """The whole ``image`` (H, W, 3) resized to ``side`` x ``side`` (area-averaged when smaller):
    what a training crop's image-level statistics are measured on (``context``)."""
    h, w = image.shape[:2]
    inter = cv2.INTER_AREA if side < max(h, w) else cv2.INTER_LINEAR
    return to_tensor(cv2.resize(np.ascontiguousarray(image), (side, side), interpolation=inter))


class CropDataset(Dataset):
    """Training crops of ``records``: ``{"lq", "gt", "quality", "id"}`` if ``paired``, else ``{"lq", "id"}``.

    ``quality``: one fused score per record (NaN where unknown). Augmentation is reproducible: the
    albumentations pipeline is seeded with ``seed`` here and reseeded per DataLoader worker.
    ``context_side``: each item also holds ``context``, its whole LQ image at ``context_side`` x
    ``context_side`` (:func:`whole_image_view`), on which training measures the image-level
    statistics of the fusion's classical prior (the airlight), as inference measures them on the
    whole photo for each of its tiles.
    ``extra_haze``: a labeled pair's input (not a clean pair's) gets, with probability one half, a
    uniform layer of extra haze of optical depth drawn in ``[0, extra_haze]`` (:func:`thicken_haze`),
    whole image and context alike: denser haze than the paired data holds (0: off).
    ``clean_exposure``: a clean pair's photo (its input and target alike) is, with probability one
    half, shown darker by up to this many stops (:func:`darken_exposure`): do no harm to a dim
    photo that is properly exposed, not only to a bright one (0: off).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        crop_size: int,
        paired: bool,
        quality: Sequence[float] | None = None,
        augment: bool = True,
        small_images: str = "pad",
        seed: int = 0,
        skip_log: SkipLog | None = None,
        random_crop: bool = True,
        clean_pairs: float = 0.0,
        context_side: int | None = None,
        extra_haze: float = 0.0,
        clean_exposure: float = 0.0,
    ) -> None:
        if quality is not None and len(quality) != len(records):
            raise ValueError(f"{len(quality)} quality values for {len(records)} records")
        if not 0.0 <= clean_pairs <= 1.0:
            raise ValueError(f"clean_pairs must lie in [0, 1], got {clean_pairs}")
        if extra_haze < 0:
            raise ValueError(f"extra_haze must be >= 0, got {extra_haze}")
        if clean_exposure < 0:
            raise ValueError(f"clean_exposure must be >= 0 (stops), got {clean_exposure}")
        self.clean_pairs, self.context_side, self.extra_haze = clean_pairs, context_side, extra_haze
        self.clean_exposure = clean_exposure
        self._seed_draws(seed)
        self.records = list(records)
        self.crop_size, self.paired, self.small_images = crop_size, paired, small_images
        self.quality = [math.nan] * len(records) if quality is None else [float(q) for q in quality]
        self.skip_log = skip_log if skip_log is not None else get_skip_log()
        self._bad: set[int] = set()
        flips = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)] if augment else []
        crop = A.RandomCrop if random_crop else A.CenterCrop
        self.transform = A.Compose(
            [crop(height=crop_size, width=crop_size), *flips],
            additional_targets={"gt": "image"} if paired else None,
            seed=seed,
        )

    def reseed(self, seed: int) -> None:
        self.transform.set_random_seed(seed)
        self._seed_draws(seed)

    def _seed_draws(self, seed: int) -> None:
        # one generator per augmentation: switching one on does not shift the others' draws
        self._clean_rng = np.random.default_rng(seed)
        self._haze_rng = np.random.default_rng([seed, 1])
        self._exposure_rng = np.random.default_rng([seed, 2])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return _serve(index, len(self.records), self._bad, self._load, self.skip_log, "training data")

    def _load(self, index: int) -> dict:
        record = self.records[index]
        lq, gt = _read_pair(record, self.paired)
        lq = _check_small(lq, self.crop_size, self.small_images, record.lq)
        context = {}
        if not self.paired:
            if self.context_side:
                context["context"] = whole_image_view(lq, self.context_side)
            return {"lq": to_tensor(self.transform(image=lq)["image"]), "id": record.id, **context}
        gt = _check_small(gt, self.crop_size, "pad", record.lq)
        clean = bool(self.clean_pairs) and self._clean_rng.random() < self.clean_pairs
        if self.extra_haze and self._haze_rng.random() < 0.5:  # drawn for every pair: clean pairs do not shift the draws
            depth = self._haze_rng.uniform(0.0, self.extra_haze)
            if record.gt is not None and not clean:  # a clean pair's input is replaced below: not thickened
                lq = thicken_haze(lq, depth)
        if self.clean_exposure and self._exposure_rng.random() < 0.5:  # drawn for every pair, as the haze
            stops = self._exposure_rng.uniform(0.0, self.clean_exposure)
            if clean:  # a clean pair's target is its input (below): both dimmer
                gt = darken_exposure(gt, stops)
        out = self.transform(image=lq, gt=gt)
        if clean:
            out["image"] = out["gt"]  # a clean -> clean pair: restoring must leave a clean photo as it is
            lq = gt
        if self.context_side:
            context["context"] = whole_image_view(lq, self.context_side)
        return {
            "lq": to_tensor(out["image"]),
            "gt": to_tensor(out["gt"]),
            "quality": torch.tensor(self.quality[index], dtype=torch.float32),
            "id": record.id,
            **context,
        }


class EvalDataset(Dataset):
    """Whole images for validation: ``{"lq", "gt" (if ``paired``), "id"}``, centre-cropped so each
    side is a multiple of ``multiple`` (and to ``crop_size`` if given; smaller images are padded)."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        paired: bool,
        multiple: int = 8,
        crop_size: int | None = None,
        skip_log: SkipLog | None = None,
    ) -> None:
        self.records, self.paired, self.multiple, self.crop_size = list(records), paired, multiple, crop_size
        self.skip_log = skip_log if skip_log is not None else get_skip_log()
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return _serve(index, len(self.records), self._bad, self._load, self.skip_log, "validation data")

    def _load(self, index: int) -> dict:
        record = self.records[index]
        lq, gt = _read_pair(record, self.paired)
        images = {"lq": lq} if gt is None else {"lq": lq, "gt": gt}
        for key, image in images.items():
            size = max(self.multiple, self.crop_size or 0)
            image = pad_to_size(image, size, size)
            h, w = image.shape[:2]
            if self.crop_size is not None:
                h, w = min(h, self.crop_size), min(w, self.crop_size)
            images[key] = to_tensor(centre_crop(image, h - h % self.multiple, w - w % self.multiple))
        return {**images, "id": record.id}


class ImageFolderDataset(Dataset):
    """Images of a folder for inference and scoring: ``{"image": (3,H,W), "id", "path"}``.

    A bad file is recorded in the `SkipLog` and the next readable image is served in its place, so
    one image can come twice: key results by ``id``. ``multiple`` centre-crops each side to a
    multiple of it (1: full size).
    """

    def __init__(
        self, root: str | Path, recursive: bool = False, multiple: int = 1, skip_log: SkipLog | None = None
    ) -> None:
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        self.records = read_unpaired(root, recursive=recursive)
        self.multiple = multiple
        self.skip_log = skip_log if skip_log is not None else get_skip_log()
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return _serve(index, len(self.records), self._bad, self._load, self.skip_log, "image folder")

    def _load(self, index: int) -> dict:
        record = self.records[index]
        image = read_image(record.lq)
        h, w = image.shape[:2]
        if h < self.multiple or w < self.multiple:
            image = pad_to_size(image, self.multiple, self.multiple)
            h, w = image.shape[:2]
        image = centre_crop(image, h - h % self.multiple, w - w % self.multiple)
        return {"image": to_tensor(image), "id": record.id, "path": str(record.lq)}
