"""`qualiteacher evaluate` / `compare`: the demo held-out set end to end, NR-IQA equal to the
ensemble's scores, detection restored vs unrestored, baselines, MLflow, and the error messages."""
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qualiteacher.cli import main


@pytest.fixture(scope="module")
def stage3_ckpt(tmp_path_factory, demo_root, fast_ensemble_factory):
    from conftest import fit_tiny_stage3

    _, trainer = fit_tiny_stage3(demo_root, fast_ensemble_factory())
    path = tmp_path_factory.mktemp("s3") / "final.ckpt"
    trainer.save_checkpoint(path)
    return path


def _eval(args, out):
    return main(["evaluate", *map(str, args), "--out", str(out), "--no-progress", "--device", "cpu"])


def test_demo_held_out_set_end_to_end(tmp_path, demo_root, stage3_ckpt, capsys):
    out = tmp_path / "ev"
    assert _eval(["--task", "dehaze", "--data", demo_root, "--checkpoint", stage3_ckpt, "--teacher",
                  "--save-images"], out) == 0
    printed = capsys.readouterr().out
    # offline machine: the literature metrics without weights are reported as skipped, not silently dropped
    assert "metric musiq skipped" in printed and "demo (test): 3 image(s)" in printed
    table = pd.read_csv(out / "results.csv", index_col=0)
    assert list(table.index) == ["input", "student@7", "teacher"]
    assert {"piqe", "brisque_live", "niqe_fit", "fused", "psnr", "ssim"} <= set(table.columns)
    assert table[["piqe", "brisque_live", "niqe_fit", "fused", "psnr", "ssim"]].notna().all().all()
    assert (table["images"] == 3).all() and (table["references"] == 3).all()
    per_image = pd.read_csv(out / "per_image.csv", dtype={"id": str})
    assert len(per_image) == 9 and set(per_image["restorer"]) == set(table.index)
    md = (out / "results.md").read_text()
    assert "PSNR ↑" in md and "NIQE-fit ↓" in md and "**" in md and "musiq" in md  # skip reasons listed
    saved = sorted((out / "images" / "student_level7").glob("*.png"))
    assert len(saved) == 3 and Image.open(saved[0]).size == (48, 48)


def test_nriqa_of_a_folder_equals_the_ensemble_scores(tmp_path, demo_root):
    from qualiteacher.eval.benchmarks import BENCHMARKS, read_benchmark
    from qualiteacher.eval.harness import build_metric_set, evaluate
    from qualiteacher.iqa.cache import score_folder
    from qualiteacher.iqa.presets import build_ensemble

    folder = demo_root / "derain" / "test" / "lq"
    ensemble = build_ensemble("offline", task="derain")
    records = read_benchmark(BENCHMARKS["unpaired"], "derain", folder)
    result = evaluate({"input": lambda x, _id: x}, records, build_metric_set(["brisque_live"]), ensemble,
                      progress=False)
    expected = score_folder(folder, ensemble, tmp_path / "cache.parquet").assign(
        id=lambda d: d["path"].map(lambda p: os.path.splitext(p)[0])).set_index("id")
    got = result.per_image.set_index("id")
    assert len(got) == len(expected) == 3
    for column in ("fused", "raw_brisque", "raw_niqe", "raw_piqe"):
        np.testing.assert_allclose(got[column], expected.loc[got.index, column], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["brisque_live"], got["raw_brisque"], rtol=1e-5)  # same scorer


DETECTOR = '''
import torch

def detect(images):  # COCO id 3 = car, always the top-left 20 px square
    return [{"boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0]]), "scores": torch.tensor([0.9]),
             "labels": torch.tensor([3])} for _ in images]
'''


def _rtts_tree(root, demo_root, annotated=("0000", "0001")):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for src in sorted((demo_root / "dehaze" / "test" / "lq").glob("*.png")):
        Image.open(src).save(root / "JPEGImages" / src.name)
        if src.stem in annotated:
            (root / "Annotations" / f"{src.stem}.xml").write_text(
                "<annotation><object><name>car</name><difficult>0</difficult><bndbox><xmin>0</xmin><ymin>0</ymin>"
                "<xmax>20</xmax><ymax>20</ymax></bndbox></object></annotation>")
    return root


def test_detection_restored_and_unrestored(tmp_path, demo_root, stage3_ckpt, capsys):
    data = _rtts_tree(tmp_path / "rtts", demo_root)
    (tmp_path / "det.py").write_text(DETECTOR)
    out = tmp_path / "ev"
    assert _eval(["--task", "dehaze", "--data", data, "--benchmark", "rtts", "--checkpoint", stage3_ckpt,
                  "--metrics", "piqe", "--detector-target", f"{tmp_path / 'det.py'}:detect"], out) == 0
    assert "1 image(s) without annotation left out of mAP" in capsys.readouterr().out
    table = pd.read_csv(out / "results.csv", index_col=0)
    # the same images, restored and unrestored, each get mAP; the detector is perfect on both
    assert table.loc[["input", "student@7"], ["map_50", "map"]].to_numpy().tolist() == [[1.0, 1.0], [1.0, 1.0]]
    detection = pd.read_csv(out / "detection.csv", index_col=0)
    assert detection.loc["input", "ap50/car"] == 1.0 and np.isnan(detection.loc["input", "ap50/bus"])
    assert "mAP@0.5 ↑" in (out / "results.md").read_text()


def test_detection_errors_are_clear(tmp_path, demo_root, stage3_ckpt, capsys):
    data = _rtts_tree(tmp_path / "rtts", demo_root)
    base = ["--task", "dehaze", "--data", data, "--benchmark", "rtts", "--checkpoint", stage3_ckpt, "--metrics", "piqe"]
    assert _eval([*base, "--detector", "fasterrcnn_resnet50_fpn", "--detector-weights", tmp_path / "none.pth"],
                 tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "none.pth" in err and "download" in err
    (tmp_path / "det.py").write_text(DETECTOR)
    for xml in (data / "Annotations").glob("*.xml"):
        xml.unlink()
    assert _eval([*base, "--detector-target", f"{tmp_path / 'det.py'}:detect"], tmp_path / "o") == 2
    assert "annotat" in capsys.readouterr().err.lower()
    assert _eval(["--task", "dehaze", "--data", demo_root, "--checkpoint", stage3_ckpt, "--metrics", "piqe",
                  "--detector-target", f"{tmp_path / 'det.py'}:detect"], tmp_path / "o") == 2
    assert "no boxes" in capsys.readouterr().err


def test_data_and_checkpoint_errors(tmp_path, demo_root, stage3_ckpt, capsys):
    ok = ["--checkpoint", stage3_ckpt, "--metrics", "piqe"]
    assert _eval(["--task", "dehaze", "--data", tmp_path / "nowhere", "--benchmark", "real3000", *ok], tmp_path) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _eval(["--task", "desnow", "--data", tmp_path / "empty", *ok], tmp_path) == 2
    assert "no image files" in capsys.readouterr().err
    assert _eval(["--task", "dehaze", "--data", demo_root, "--checkpoint", tmp_path / "x.ckpt"], tmp_path) == 2
    assert "x.ckpt" in capsys.readouterr().err
    assert _eval(["--task", "dehaze", "--data", demo_root, *ok, "--benchmark", "nope"], tmp_path) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert _eval(["--task", "dehaze", "--data", demo_root, "--checkpoint", stage3_ckpt, "--metrics", "musiq"],
                 tmp_path) == 2
    assert "musiq" in capsys.readouterr().err


def test_baselines_bad_files_and_compare(tmp_path, demo_root, stage3_ckpt, capsys):
    data = tmp_path / "set"
    for sub in ("lq", "gt"):
        (data / sub).mkdir(parents=True)
        for src in sorted((demo_root / "desnow" / "test" / sub).glob("*.png")):
            Image.open(src).save(data / sub / src.name)
    (data / "lq" / "broken.png").write_bytes(b"not a png")
    (data / "gt" / "broken.png").write_bytes(b"not a png")
    common = ["--task", "desnow", "--data", data, "--metrics", "piqe"]
    # the clean references as a "baseline": PSNR is infinite / SSIM 1; the broken pair is skipped
    assert _eval([*common, "--checkpoint", f"ours={stage3_ckpt}", "--baseline", f"oracle={data / 'gt'}"],
                 tmp_path / "a") == 0
    printed = capsys.readouterr().out
    assert "broken.png" in printed
    a = pd.read_csv(tmp_path / "a" / "results.csv", index_col=0)
    assert list(a.index) == ["input", "ours", "oracle"] and (a["images"] == 3).all()
    assert a.loc["oracle", "ssim"] == pytest.approx(1.0)
    assert _eval([*common, "--checkpoint", f"ours={stage3_ckpt}", "--level", "3"], tmp_path / "b") == 0
    capsys.readouterr()
    assert main(["compare", f"L7={tmp_path / 'a'}", f"L3={tmp_path / 'b' / 'results.csv'}",
                 "--out", str(tmp_path / "cmp.md")]) == 0
    text = (tmp_path / "cmp.md").read_text()
    for row in ("| L7/input |", "| L7/ours |", "| oracle |", "| L3/ours |"):
        assert row in text
    assert main(["compare", str(tmp_path / "missing.csv")]) == 2


def test_mlflow_logging(tmp_path, demo_root, stage3_ckpt, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    assert _eval(["--task", "dehaze", "--data", demo_root, "--checkpoint", stage3_ckpt, "--metrics", "piqe",
                  "--mlflow"], tmp_path / "ev") == 0
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("qualiteacher-eval")
    run = client.search_runs([exp.experiment_id])[0]
    assert run.data.metrics["eval/student_level7/piqe"] == pytest.approx(
        pd.read_csv(tmp_path / "ev" / "results.csv", index_col=0).loc["student@7", "piqe"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} >= {"eval/results.csv", "eval/results.md"}
    mlflow.set_tracking_uri(None)


def test_markdown_table_marks_directions_and_best():
    from qualiteacher.eval.report import markdown_table

    table = pd.DataFrame({"images": [2, 2], "niqe_fit": [5.0, 4.0], "psnr": [20.0, 25.0]},
                         index=pd.Index(["input", "student@7"], name="restorer"))
    text = markdown_table(table, digits=1)
    assert text.splitlines()[0] == "| restorer | images | NIQE-fit ↓ | PSNR ↑ |"
    assert "| student@7 | 2 | **4.0** | **25.0** |" in text and "| input | 2 | 5.0 | 20.0 |" in text


def test_demo_benchmark_reads_any_of_its_real_domain_splits(tmp_path, demo_root, capsys):
    from qualiteacher.eval.benchmarks import BENCHMARKS, read_benchmark

    demo = BENCHMARKS["demo"]
    test = read_benchmark(demo, "dehaze", demo_root)
    unseen = read_benchmark(demo, "dehaze", demo_root, split="unseen")
    assert len(test) == 3 and len(unseen) == 3  # the conftest's counts
    assert all("/test/lq/" in str(r.lq) for r in test) and all("/unseen/lq/" in str(r.lq) for r in unseen)
    assert all("/unseen/gt/" in str(r.gt) for r in unseen)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_benchmark(demo, "dehaze", demo_root, split="nope")
    assert _eval(["--task", "dehaze", "--data", demo_root, "--split", "unseen", "--baseline", "classical:dcp",
                  "--metrics", "piqe"], tmp_path) == 0
    table = pd.read_csv(tmp_path / "results.csv").set_index("restorer")
    assert "unseen" in capsys.readouterr().out
    assert list(table.index) == ["input", "classical:dcp"] and (table["references"] == 3).all()
    assert table.loc["classical:dcp", "psnr"] > table.loc["input", "psnr"]  # it dehazes the unseen photos
