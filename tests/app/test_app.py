"""`qualiteacher app` without a browser: restore / score / sweep on tiny models, uploads of every
kind, loading from a checkpoint and from a model registered in a temporary MLflow store."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from qualiteacher.app.logic import (UploadError, level_sweep, read_upload, restore_image, score_images,
                                    score_markdown)
from qualiteacher.app.model import AppModel, load_checkpoint_model, load_registry_model
from qualiteacher.app.ui import Handlers, Settings, upload_path
from qualiteacher.archs.output import StudentOutput
from qualiteacher.archs.presets import build_unet


def _ramped_unet() -> nn.Module:
    net = build_unet("tiny").eval()
    weight = net.level_embedding.embedding.weight
    n, c = weight.shape
    with torch.no_grad():  # level q adds (q/7 - 0.5) * (+1, -1, +1, ...) at the bottleneck
        weight.copy_(1.5 * (torch.arange(n) / (n - 1) - 0.5)[:, None] * (1 - 2 * (torch.arange(c) % 2))[None, :])
    return net


def _model(student: nn.Module, teacher: nn.Module | None = None) -> AppModel:
    return AppModel(student, teacher, "dehaze", "offline", None, 7, "test")


def _image(seed: int = 0, size: tuple[int, int] = (40, 48)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand((1, 3, size[0] // 8, size[1] // 8), generator=g)
    return torch.nn.functional.interpolate(base, size=size, mode="bilinear").clamp(0, 1) * 0.6 + 0.3


@pytest.fixture(scope="module")
def ensemble(fast_ensemble_factory):
    return fast_ensemble_factory("dehaze")


def test_restore_and_scores_follow_the_hand_set_level(ensemble):
    model = _model(_ramped_unet())
    x = _image()
    low, top = restore_image(model, x, level=0), restore_image(model, x, level=7)
    assert low.image.shape == x.shape and low.tile is None and low.seconds >= 0
    assert (low.image - top.image).abs().mean() > 1e-2          # the dial moves the output
    table = score_images(ensemble, torch.cat([low.image, top.image]), ["0", "7"])
    assert table.fused[0] != pytest.approx(table.fused[1], abs=1e-4)
    assert set(table.members) == {s.name for s in ensemble.specs}
    md = score_markdown(table)
    assert "**fused**" in md and all(name in md for name in table.members)
    # a zero conditioning: every level gives the same image (what the hand-set weights changed)
    flat = build_unet("tiny").eval()
    a, b = restore_image(_model(flat), x, level=0).image, restore_image(_model(flat), x, level=7).image
    assert torch.equal(a, b)


def test_level_sweep_gives_every_level_with_its_score(ensemble):
    model = _model(_ramped_unet())
    x = _image(1, (48, 48))
    sweep = level_sweep(model, ensemble, x)
    assert sweep.table.names == [f"level {q}" for q in range(8)]
    assert len(set(round(f, 5) for f in sweep.table.fused)) > 1
    assert len(sweep.images) == 8 and sweep.images[0].dtype == np.uint8 and sweep.images[0].shape == (48, 48, 3)
    assert sweep.captions[3] == f"level 3 · {sweep.table.fused[3]:.3f}"
    # the batched sweep gives each image its own level: level 5 scores as restoring at 5 alone
    alone = score_images(ensemble, restore_image(model, x, level=5).image, ["5"])
    assert sweep.table.fused[5] == pytest.approx(alone.fused[0], abs=1e-4)


def test_sweep_of_a_large_image_runs_on_a_small_copy(ensemble):
    model = _model(_ramped_unet())
    sweep = level_sweep(model, ensemble, _image(2, (80, 800)), side=96)
    assert sweep.table.scored_side <= 96 and len(sweep.table.fused) == 8


def test_large_images_are_tiled_with_each_image_at_its_own_level(ensemble):
    from qualiteacher.app.logic import pick_tile
    from qualiteacher.training.restore import restore

    model = _model(_ramped_unet())
    assert pick_tile(torch.zeros(1, 3, 40, 600), None, model.student) == 128  # the tiny U-Net's default tile
    assert pick_tile(torch.zeros(1, 3, 128, 128), None, model.student) is None  # fits one tile: whole
    assert pick_tile(torch.zeros(1, 3, 40, 600), 0) is None and pick_tile(torch.zeros(1, 3, 40, 80), 32) == 32
    x = _image(3, (48, 80))
    out = restore_image(model, x, level=6, tile=32)
    assert out.tile == 32 and out.image.shape == x.shape
    assert torch.allclose(out.image, restore(model.student, x, level=6, tile=32))
    # a tiled sweep: the tiles of all eight levels go through one batch, each with its level
    sweep = level_sweep(model, ensemble, x, tile=32)
    alone = torch.cat([restore(model.student, x, level=q, tile=32) for q in (0, 7)])
    assert sweep.table.fused[0::7] == pytest.approx(score_images(ensemble, alone, ["0", "7"]).fused, abs=1e-4)


class FidelityStub(nn.Module):
    """Records how it was called; a student with the fidelity path."""

    has_fidelity = True
    default_w = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[tuple] = []

    def forward(self, x, level, w=None):
        self.calls.append((None if level is None else level.tolist(), w))
        return StudentOutput(x * self.scale * (1.0 if w is None else w), x.new_zeros(()))


def test_fidelity_w_is_passed_as_keyword_only_to_students_that_have_it():
    stub = FidelityStub()
    restore_image(_model(stub), _image(), level=3, w=0.25)
    assert stub.calls[-1] == ([3], 0.25)
    # the U-Net has no fidelity path: w is dropped, not passed
    unet = _ramped_unet()
    assert restore_image(_model(unet), _image(), level=3, w=0.25).image.shape == (1, 3, 40, 48)


def test_teacher_toggle(ensemble):
    teacher = build_unet("tiny").eval()
    model = _model(_ramped_unet(), teacher)
    out = restore_image(model, _image(), level=0, teacher=True)
    assert out.label == "teacher"
    assert torch.equal(out.image, restore_image(_model(teacher), _image(), level=7).image)  # unconditioned
    with pytest.raises(UploadError, match="no teacher"):
        restore_image(_model(_ramped_unet()), _image(), teacher=True)


def _save(tmp_path, name, mode, size=(40, 32), **kw):
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode == "I;16":
        im = Image.fromarray((np.asarray(im.convert("L")).astype(np.uint16) * 257))
    elif mode == "P":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode != "RGB":
        im = im.convert(mode)
    path = tmp_path / name
    im.save(path, **kw)
    return path


@pytest.mark.parametrize("name,mode", [("rgb.png", "RGB"), ("sixteen.png", "I;16"), ("cmyk.jpg", "CMYK"),
                                       ("palette.png", "P"), ("alpha.png", "RGBA"), ("gray.tif", "L")])
def test_odd_modes_are_read_as_rgb(tmp_path, name, mode):
    x = read_upload(_save(tmp_path, name, mode))
    assert x.shape == (1, 3, 32, 40) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1


def test_bad_uploads_give_a_message_not_a_crash(tmp_path, ensemble):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    truncated = tmp_path / "truncated.jpg"
    good = _save(tmp_path, "good.jpg", "RGB", size=(64, 64))
    truncated.write_bytes(good.read_bytes()[:300])
    huge = tmp_path / "huge.png"
    Image.new("1", (12000, 12000)).save(huge)                      # 144 MP declared, a few kB on disk
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    tiny = _save(tmp_path, "tiny.png", "RGB", size=(4, 4))
    h = Handlers(_model(_ramped_unet()), ensemble, Settings())
    for path, words in [(corrupt, "not an image"), (truncated, "truncated"), (huge, "144 MP"),
                        (text, "not an image"), (tiny, "too small"), (None, "Upload an image")]:
        pair, scores, status = h.restore(None if path is None else {"path": str(path)}, 7, None, False)
        assert pair is None and scores == "" and status.startswith("⚠️") and words in status, (path, status)
        strip, text_md = h.sweep(None if path is None else str(path), None)
        assert strip is None and words in text_md
    pair, scores, status = h.restore({"path": str(good)}, 5, None, False)
    assert pair[0].shape == pair[1].shape == (64, 64, 3) and "level 5" in status and "**fused**" in scores


def test_upload_path_of_gradio_payloads():
    assert upload_path({"path": "/a/b.png", "url": "x"}) == "/a/b.png"
    assert upload_path("/a/b.png") == "/a/b.png" and upload_path(None) is None


def test_checkpoint_model_carries_task_and_ensemble_settings(app_checkpoint):
    model = load_checkpoint_model(app_checkpoint)
    assert model.task == "dehaze" and model.iqa_preset == "offline" and model.teacher is not None
    assert model.top_level == 7 and not model.has_fidelity
    x = _image()
    assert not torch.equal(restore_image(model, x, 0).image, restore_image(model, x, 7).image)


def test_app_command_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from qualiteacher.cli import main

    assert main(["app", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["app", "--model", "runs:/abc/student", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert "models:/" in capsys.readouterr().err
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["app"]) == 2                                   # default: models:/qualiteacher-dehaze/latest
    assert "no MLflow store at sqlite:///" in capsys.readouterr().err and not (tmp_path / "mlflow.db").exists()


def test_registry_loading_from_a_temporary_store(app_checkpoint, tmp_path, monkeypatch):
    """Register the checkpoint's student the way the pipeline does, then load it by URI."""
    import shutil

    from qualiteacher.pipeline.stages.register import register_student
    from qualiteacher.pipeline.state import PipelineState
    from qualiteacher.tracking.runs import PipelineRuns

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "stage3").mkdir(parents=True)
    shutil.copy(app_checkpoint, tmp_path / "out" / "stage3" / "final.ckpt")
    cfg = {"task": "dehaze", "preset": "tiny", "student": "unet", "out_dir": str(tmp_path / "out"),
           "experiment": "qualiteacher"}
    runs = PipelineRuns(cfg, PipelineState(tmp_path / "out" / "state.json"), workdir=tmp_path, commit="test")
    runs.start_parent()
    runs.log_params(runs.child("stage3"), {"model.iqa_preset": "offline", "model.top_level": 7})
    register_student(tmp_path / "out" / "stage3" / "final.ckpt", "dehaze", runs, runs.child("register"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert runs.uri == uri

    model = load_registry_model("models:/qualiteacher-dehaze/latest", uri)
    assert model.task == "dehaze" and model.iqa_preset == "offline" and "version 1" in model.source
    reference = load_checkpoint_model(app_checkpoint)
    x = _image(4)
    assert torch.allclose(restore_image(model, x, 2).image, restore_image(reference, x, 2).image, atol=1e-6)
    with pytest.raises(Exception, match="qualiteacher-derain"):
        load_registry_model("models:/qualiteacher-derain/latest", uri)
