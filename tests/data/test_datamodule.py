import math
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch

from qualiteacher.data.datamodule import RestorationDataModule
from qualiteacher.data.datasets import ImageFolderDataset
from qualiteacher.data.io import SkipLog, get_skip_log, write_image

CROP = 32


@pytest.fixture(autouse=True)
def _fresh_skip_log():
    get_skip_log().clear()  # the data module records into the process' default log
    yield
    get_skip_log().clear()


def _random_image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


def _paired(root: Path, n: int = 6, same: bool = True, sizes=((40, 48), (36, 40), (48, 48))) -> Path:
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        lq = write_image(root / "lq" / f"im{i}.png", _random_image(i, h, w))
        if same:
            (root / "gt").mkdir(parents=True, exist_ok=True)
            shutil.copy(lq, root / "gt" / lq.name)
        else:
            write_image(root / "gt" / lq.name, _random_image(100 + i, h, w))
    return root


def _unpaired(root: Path, n: int = 9) -> Path:
    for i in range(n):
        write_image(root / f"u{i}.png", _random_image(50 + i, 40, 44))
    return root


def _first_batch(dm: RestorationDataModule) -> dict:
    dm.setup("fit")
    loader = dm.train_dataloader()
    batch, _, _ = next(iter(loader))
    return batch


def test_paired_crops_aligned_shapes_and_dtypes(tmp_path):
    dm = RestorationDataModule(str(_paired(tmp_path / "lab")), crop_size=CROP, batch_size=3)
    dm.setup("fit")
    n_batches = 0
    for batch, _, _ in dm.train_dataloader():
        lab = batch["labeled"]
        assert set(batch) == {"labeled"}
        assert lab["lq"].shape == lab["gt"].shape == (3, 3, CROP, CROP)
        assert lab["lq"].dtype == torch.float32 and lab["quality"].shape == (3,)
        assert torch.isnan(lab["quality"]).all()
        assert isinstance(lab["id"], list) and all(isinstance(i, str) for i in lab["id"])
        assert torch.equal(lab["lq"], lab["gt"])  # gt == lq on disk -> crops stay equal
        n_batches += 1
    assert n_batches == 2


def test_crop_matches_a_window_of_the_source(tmp_path):
    _paired(tmp_path / "lab", n=1, same=False, sizes=((40, 48),))
    dm = RestorationDataModule(str(tmp_path / "lab"), crop_size=CROP, batch_size=1, augment=False)
    lab = _first_batch(dm)["labeled"]
    lq, gt = _random_image(0, 40, 48), _random_image(100, 40, 48)
    crop = lab["lq"][0].permute(1, 2, 0).numpy()
    hits = [(y, x) for y in range(40 - CROP + 1) for x in range(48 - CROP + 1)
            if np.abs(lq[y:y + CROP, x:x + CROP] - crop).max() < 1e-2]
    assert len(hits) == 1
    y, x = hits[0]  # the gt crop is taken from the same window
    np.testing.assert_allclose(lab["gt"][0].permute(1, 2, 0).numpy(), gt[y:y + CROP, x:x + CROP], atol=1e-2)


def test_combined_loader_max_size_cycle(tmp_path):
    dm = RestorationDataModule(str(_paired(tmp_path / "lab", n=4)), unlabeled_root=str(_unpaired(tmp_path / "un")),
                               crop_size=CROP, batch_size=2, unlabeled_batch_size=3)
    dm.setup("fit")
    batches = [b for b, _, _ in dm.train_dataloader()]
    assert len(batches) == 3  # max(4 // 2, 9 // 3): the labeled side cycles
    un = batches[0]["unlabeled"]
    assert set(un) == {"lq", "id"} and un["lq"].shape == (3, 3, CROP, CROP)
    assert sorted(i for b in batches for i in b["unlabeled"]["id"]) == sorted(f"u{i}" for i in range(9))


def test_deterministic_for_a_seed(tmp_path):
    lab, un = str(_paired(tmp_path / "lab", same=False)), str(_unpaired(tmp_path / "un"))

    def run(seed, workers=0):
        dm = RestorationDataModule(lab, unlabeled_root=un, crop_size=CROP, batch_size=2, seed=seed,
                                   num_workers=workers)
        dm.setup("fit")
        return [b for b, _, _ in dm.train_dataloader()]

    a, b, c = run(0), run(0), run(1)
    for x, y in zip(a, b):
        assert x["labeled"]["id"] == y["labeled"]["id"]
        assert torch.equal(x["labeled"]["lq"], y["labeled"]["lq"])
        assert torch.equal(x["unlabeled"]["lq"], y["unlabeled"]["lq"])
    assert any(not torch.equal(x["unlabeled"]["lq"], z["unlabeled"]["lq"]) for x, z in zip(a, c))
    w1, w2 = run(3, workers=2), run(3, workers=2)
    assert all(torch.equal(x["unlabeled"]["lq"], y["unlabeled"]["lq"]) for x, y in zip(w1, w2))


def test_corrupt_file_is_skipped(tmp_path, caplog):
    root = _paired(tmp_path / "lab", n=4)
    (root / "lq" / "im1.png").write_bytes(b"not an image")
    dm = RestorationDataModule(str(root), crop_size=CROP, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))[0]["labeled"]
    assert len(batch["id"]) == 4 and "im1" not in batch["id"]
    assert dm.skip_log is get_skip_log()
    assert len(dm.skip_log) == 1 and "im1.png" in dm.skip_log.summary()
    assert dm.skip_log.count == 1  # the bad index is not read again
    dm.teardown("fit")
    assert "skipped 1 file" in caplog.text


def test_every_file_bad_is_a_clear_error(tmp_path):
    root = _paired(tmp_path / "lab", n=2)
    for p in (root / "lq").iterdir():
        p.write_bytes(b"")
    dm = RestorationDataModule(str(root), crop_size=CROP, batch_size=1)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="none of its 2 images"):
        next(iter(dm.train_dataloader()))


def test_size_mismatch_is_skipped(tmp_path):
    root = _paired(tmp_path / "lab", n=2, sizes=((40, 40),))
    write_image(root / "gt" / "im0.png", _random_image(0, 40, 44))
    dm = RestorationDataModule(str(root), crop_size=CROP, batch_size=2)
    batch = _first_batch(dm)["labeled"]
    assert batch["id"] == ["im1", "im1"]
    assert "differs from its gt" in dm.skip_log.summary()


def test_small_images_padded_or_skipped(tmp_path):
    root = _paired(tmp_path / "lab", n=2, sizes=((20, 24), (40, 40)))
    dm = RestorationDataModule(str(root), crop_size=CROP, batch_size=2, augment=False)
    batch = _first_batch(dm)["labeled"]
    assert sorted(batch["id"]) == ["im0", "im1"] and batch["lq"].shape[-2:] == (CROP, CROP)
    small = batch["lq"][batch["id"].index("im0")].permute(1, 2, 0).numpy()
    src = _random_image(0, 20, 24)  # reflect padding keeps the source in the middle
    np.testing.assert_allclose(small[6:26, 4:28], src, atol=1e-2)
    dm = RestorationDataModule(str(root), crop_size=CROP, batch_size=2, small_images="skip")
    batch = _first_batch(dm)["labeled"]
    assert batch["id"] == ["im1", "im1"] and "smaller than the crop" in dm.skip_log.summary()


def test_unpaired_labeled_uses_image_as_gt(tmp_path):
    dm = RestorationDataModule(str(_unpaired(tmp_path / "clean", 4)), labeled_layout="unpaired",
                               crop_size=CROP, batch_size=2)
    lab = _first_batch(dm)["labeled"]
    assert torch.equal(lab["lq"], lab["gt"])


@pytest.mark.parametrize("kind", ["id", "path", "parquet"])
def test_quality_table(tmp_path, kind):
    root = _paired(tmp_path / "lab", n=3)
    if kind == "path":
        table = pd.DataFrame({"path": ["lab/gt/im0.png", str(root / "gt" / "im2.png")], "fused": [0.25, 0.75]})
    else:
        table = pd.DataFrame({"id": ["im0", "im2"], "fused": [0.25, 0.75]})
    path = tmp_path / ("q.parquet" if kind == "parquet" else "q.csv")
    table.to_parquet(path) if kind == "parquet" else table.to_csv(path, index=False)
    dm = RestorationDataModule(str(root), crop_size=CROP, batch_size=3, quality_table=str(path))
    lab = _first_batch(dm)["labeled"]
    quality = dict(zip(lab["id"], lab["quality"].tolist()))
    assert quality["im0"] == 0.25 and quality["im2"] == 0.75 and math.isnan(quality["im1"])


def test_quality_table_needs_columns(tmp_path):
    root = _paired(tmp_path / "lab", n=1)
    pd.DataFrame({"name": ["im0"], "score": [1.0]}).to_csv(tmp_path / "q.csv", index=False)
    dm = RestorationDataModule(str(root), crop_size=CROP, quality_table=str(tmp_path / "q.csv"))
    with pytest.raises(ValueError, match="'fused' column.*name, score"):
        dm.setup("fit")


def test_val_loader_full_images_multiple_of_8(tmp_path):
    lab = _paired(tmp_path / "lab", n=2)
    val = _paired(tmp_path / "val", n=2, same=False, sizes=((37, 45), (5, 6)))
    dm = RestorationDataModule(str(lab), val_root=str(val), crop_size=CROP)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert [tuple(b["lq"].shape) for b in batches] == [(1, 3, 32, 40), (1, 3, 8, 8)]
    assert all(b["gt"].shape == b["lq"].shape for b in batches) and batches[0]["id"] == ["im0"]
    dm = RestorationDataModule(str(lab), val_root=str(val), val_crop_size=16, crop_size=CROP)
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))["lq"].shape == (1, 3, 16, 16)
    dm = RestorationDataModule(str(lab), val_root=str(_unpaired(tmp_path / "real", 1)), val_layout="unpaired")
    dm.setup("validate")
    assert set(next(iter(dm.val_dataloader()))) == {"lq", "id"}
    assert RestorationDataModule(str(lab)).val_dataloader() == []


def test_layout_split_option(tmp_path):
    lab = _paired(tmp_path / "lab", n=2)
    for n in (3, 1800, 1900):
        write_image(tmp_path / "real" / f"{n}.png", _random_image(n, 40, 40))
    dm = RestorationDataModule(str(lab), unlabeled_root=str(tmp_path / "real"), unlabeled_layout="real3000",
                               val_root=str(tmp_path / "real"), val_layout="real3000", val_split="test")
    dm.setup("fit")
    assert [r.id for r in dm.datasets["unlabeled"].records] == ["3"]
    assert [r.id for r in dm.datasets["val"].records] == ["1800", "1900"]


@pytest.mark.parametrize("kwargs,error,match", [
    ({"crop_size": 0}, ValueError, "crop_size"),
    ({"batch_size": -1}, ValueError, "batch_size"),
    ({"num_workers": -1}, ValueError, "num_workers"),
    ({"small_images": "drop"}, ValueError, "pad, skip"),
    ({"labeled_layout": "voc"}, ValueError, "known layouts"),
    ({"unlabeled_root": "does/not/exist"}, FileNotFoundError, "unlabeled_root.*does/not/exist"),
    ({"quality_table": "nope.csv"}, FileNotFoundError, "nope.csv"),
])
def test_constructor_validation(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        RestorationDataModule(str(_paired(tmp_path / "lab", n=1)), **kwargs)
    with pytest.raises(FileNotFoundError, match="labeled_root"):
        RestorationDataModule(str(tmp_path / "missing"))


def test_image_folder_dataset(tmp_path):
    root = _unpaired(tmp_path / "imgs", 3)
    (root / "u1.png").write_bytes(b"\x89PNG broken")
    skips = SkipLog()
    ds = ImageFolderDataset(root, multiple=8, skip_log=skips)
    items = [ds[i] for i in range(len(ds))]
    assert [it["id"] for it in items] == ["u0", "u2", "u2"]  # the bad file is replaced by the next
    assert items[0]["image"].shape == (3, 40, 40) and items[0]["path"].endswith("u0.png")
    assert len(skips) == 1
    full = ImageFolderDataset(root, skip_log=SkipLog())[0]["image"]
    assert full.shape == (3, 40, 44)


class _Probe(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((tuple(batch["labeled"]["lq"].shape), tuple(batch["unlabeled"]["lq"].shape)))
        return (self.weight * batch["labeled"]["lq"].mean() - batch["unlabeled"]["lq"].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.log("val", batch["lq"].mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_smoke(tmp_path):
    dm = RestorationDataModule(str(_paired(tmp_path / "lab", n=4)), unlabeled_root=str(_unpaired(tmp_path / "un", 4)),
                               val_root=str(_paired(tmp_path / "val", n=1)), crop_size=CROP, batch_size=2)
    model = _Probe()
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert model.seen == [((2, 3, CROP, CROP), (2, 3, CROP, CROP))] * 2


def test_quality_table_keeps_numeric_looking_ids(tmp_path):
    # the demo data names images 0000.png, 0001.png ...: a CSV round trip must not turn "0001" into 1
    from qualiteacher.data.datamodule import read_quality_table
    from qualiteacher.data.records import ImageRecord

    records = [ImageRecord(id=f"{i:04d}", lq=tmp_path / f"{i:04d}.png") for i in range(3)]
    path = tmp_path / "q.csv"
    pd.DataFrame({"id": ["0000", "0001", "0002"], "fused": [0.1, 0.8, 0.9]}).to_csv(path, index=False)
    assert read_quality_table(path, records) == [0.1, 0.8, 0.9]
