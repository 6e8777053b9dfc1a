"""The console command: sub-commands listed, each one run once on tiny data."""
import subprocess
import sys

import numpy as np
from PIL import Image

from qualiteacher.cli import main


def test_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "qualiteacher.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("data", "iqa", "score", "restore", "detmap", "evaluate", "compare", "pipeline"):
        assert cmd in out.stdout


def test_data_demo_score_and_check(tmp_path, capsys):
    assert main(["data", "demo", "--out", str(tmp_path / "d"), "--size", "32", "--tasks", "lowlight"]) == 0
    assert (tmp_path / "d" / "manifest.csv").is_file()
    (tmp_path / "d" / "lowlight" / "unlabeled" / "broken.png").write_bytes(b"not an image")
    assert main(["data", "check", str(tmp_path / "d" / "lowlight" / "unlabeled")]) == 0
    assert "broken.png" in capsys.readouterr().out
    out = tmp_path / "scores.csv"
    assert main(["score", str(tmp_path / "d" / "lowlight" / "test" / "lq"), "--task", "lowlight",
                 "--out", str(out), "--cache", str(tmp_path / "cache.parquet")]) == 0
    import pandas as pd

    table = pd.read_csv(out)
    assert len(table) == 8 and table["fused"].between(0, 1).all()


def test_restore_with_a_stage3_checkpoint(tmp_path, demo_root, fast_ensemble_factory, capsys):
    import lightning as L

    from qualiteacher.data.datamodule import RestorationDataModule
    from qualiteacher.training.stage3 import QualiTeacherModule

    module = QualiTeacherModule(preset="tiny", student="unet", ensemble=fast_ensemble_factory(), mask_block=16,
                                views=("identity",), n_aug_variants=1)
    dm = RestorationDataModule(labeled_root=str(demo_root / "dehaze" / "labeled"),
                               unlabeled_root=str(demo_root / "dehaze" / "unlabeled"), crop_size=32, batch_size=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "s3.ckpt")
    src = demo_root / "dehaze" / "test" / "lq"
    assert main(["restore", str(src), "--checkpoint", str(tmp_path / "s3.ckpt"), "--out", str(tmp_path / "r"),
                 "--level", "5", "--tile", "32"]) == 0
    restored = sorted((tmp_path / "r").glob("*.png"))
    assert len(restored) == len(list(src.glob("*.png")))
    assert Image.open(restored[0]).size == Image.open(sorted(src.glob("*.png"))[0]).size
    assert main(["restore", str(src), "--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path)]) == 2


def test_detmap_on_a_tiny_rtts_tree(tmp_path, capsys):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "Annotations").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "JPEGImages" / "a.png")
    (tmp_path / "Annotations" / "a.xml").write_text(
        "<annotation><object><name>car</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax>"
        "<ymax>20</ymax></bndbox></object></annotation>")
    dets = tmp_path / "dets.csv"
    dets.write_text("image_id,label,score,x1,y1,x2,y2\na,car,0.9,1,1,20,20\na,car,0.8,25,25,39,39\n")
    assert main(["detmap", str(tmp_path), "--detections", str(dets)]) == 0
    out = capsys.readouterr().out
    assert "car" in out and "mAP@0.5: 1.0000" in out


def test_data_demo_counts_and_a_bigger_val_split_keeps_the_others(tmp_path, monkeypatch):
    import pandas as pd

    from qualiteacher.data import demo

    seen = []
    with monkeypatch.context() as m:  # the counts not given are build_demo's own defaults
        m.setattr(demo, "build_demo", lambda out, **kw: seen.append(kw) or pd.DataFrame(columns=["task", "split"]))
        m.setattr(demo, "summarize_manifest", lambda df: "")
        assert main(["data", "demo", "--out", str(tmp_path / "x")]) == 0
        assert main(["data", "demo", "--out", str(tmp_path / "x"), "--n-val", "48"]) == 0
    assert not any(k.startswith("n_") for k in seen[0]) and seen[1]["n_val"] == 48
    args = ["--size", "32", "--tasks", "dehaze", "--n-labeled", "2", "--n-unlabeled", "2", "--n-test", "2",
            "--n-clean", "1"]
    assert main(["data", "demo", "--out", str(tmp_path / "a"), "--n-val", "1", *args]) == 0
    assert main(["data", "demo", "--out", str(tmp_path / "b"), "--n-val", "5", *args]) == 0
    a, b = (pd.read_csv(tmp_path / d / "manifest.csv") for d in ("a", "b"))
    assert (b["split"] == "val").sum() == 5 and (a["split"] == "val").sum() == 1
    for split in ("labeled", "unlabeled", "test"):
        for path in a.loc[a["split"] == split, "path"]:
            assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path
