"""Checkpoints that cannot run code, strict key checks, and a resume that survives a cut-short
last.ckpt (qualiteacher/checkpoints.py, training.stage3.load_trained, students.read_checkpoint_state)."""
import json
import logging
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from qualiteacher.checkpoints import (
    CheckpointError,
    checkpoint_state,
    read_checkpoint,
    resume_checkpoint,
    rotating_checkpoint,
    strip_compiled_prefix,
)
from qualiteacher.cli import main


class _Evil:
    """Unpickling this writes a marker file: what a crafted checkpoint does to whoever loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def write_stage3_checkpoint(path: Path, student: str = "unet", **hparams) -> Path:
    """A stage-3 checkpoint in Lightning's layout (state_dict, hyper_parameters, bank), no training."""
    from qualiteacher.training.stage3 import QualiTeacherModule

    torch.manual_seed(0)
    module = QualiTeacherModule(student=student, preset="tiny", ensemble=nn.Identity(), **hparams)
    with torch.no_grad():
        for p in module.student.parameters():  # non-zero everywhere (zero-initialised parts included)
            p.add_(0.05 * torch.randn_like(p))
    module.teacher.load_state_dict(module.student.state_dict())
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pseudo_label_bank": module.bank.state_dict(), "global_step": 3}, path)
    return path


def write_evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"payload": _Evil(marker), "state_dict": {"student.w": torch.zeros(1)}}, path)
    return path


@pytest.fixture()
def evil(tmp_path):
    marker = tmp_path / "MARKER"
    path = write_evil_checkpoint(tmp_path / "EVIL.ckpt", marker)
    # the file really is dangerous: an ordinary unpickling runs its code (so the tests below can fail)
    with open(path, "rb") as fh:
        import zipfile

        with zipfile.ZipFile(fh) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    with pytest.raises(pickle.UnpicklingError, match="persistent"):  # no tensor storages outside torch.load,
        pickle.loads(data)                                             # but the code has run before
    assert marker.is_file()
    marker.unlink()
    return path, marker


def test_read_checkpoint_refuses_a_crafted_pickle(evil):
    path, marker = evil
    with pytest.raises(CheckpointError, match=r"refused: .*would run code"):
        read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "folder"])
def test_damaged_files_give_one_named_problem(tmp_path, damage):
    good = write_stage3_checkpoint(tmp_path / "good.ckpt")
    path = tmp_path / "bad.ckpt"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a checkpoint at all")
    else:
        path.mkdir()
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    assert {"empty": "truncated", "truncated": "truncated", "garbage": "not a PyTorch checkpoint",
            "folder": "folder"}[damage] in msg


def test_load_trained_strict_keys_and_foreign_checkpoints(tmp_path):
    from qualiteacher.training.stage3 import load_trained

    path = write_stage3_checkpoint(tmp_path / "s3.ckpt")
    module = load_trained(path)
    ckpt = torch.load(path, weights_only=True)
    assert torch.equal(module.student.state_dict()["conv_in.weight"], ckpt["state_dict"]["student.conv_in.weight"])
    # one student weight missing: named, not a random-weight student restoring silently
    broken = dict(ckpt, state_dict={k: v for k, v in ckpt["state_dict"].items() if k != "student.conv_in.weight"})
    torch.save(broken, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"keys missing: student\.conv_in\.weight"):
        load_trained(tmp_path / "missing.ckpt")
    # empty state dict, and a stage-1 checkpoint: "not a stage-3 checkpoint", saying what it is
    torch.save(dict(ckpt, state_dict={}), tmp_path / "empty_state.ckpt")
    with pytest.raises(CheckpointError, match="not a stage-3 checkpoint"):
        load_trained(tmp_path / "empty_state.ckpt")
    torch.save({"state_dict": {"autoencoder.enc.weight": torch.zeros(2)}, "hyper_parameters": {"fusion": "add"}},
               tmp_path / "stage1.ckpt")
    with pytest.raises(CheckpointError, match=r"not a stage-3 checkpoint: .*stage-1"):
        load_trained(tmp_path / "stage1.ckpt")
    # an unexpected extra weight is refused too
    torch.save(dict(ckpt, state_dict={**ckpt["state_dict"], "student.extra": torch.zeros(1)}), tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError, match=r"unexpected keys: student\.extra"):
        load_trained(tmp_path / "extra.ckpt")


def test_compiled_model_keys_are_accepted_on_purpose(tmp_path):
    from qualiteacher.training.stage3 import load_trained

    path = write_stage3_checkpoint(tmp_path / "s3.ckpt")
    ckpt = torch.load(path, weights_only=True)
    compiled = {k.replace("student.", "student._orig_mod.", 1): v for k, v in ckpt["state_dict"].items()}
    torch.save(dict(ckpt, state_dict=compiled), tmp_path / "compiled.ckpt")
    a, b = load_trained(path), load_trained(tmp_path / "compiled.ckpt")
    for k, v in a.student.state_dict().items():
        assert torch.equal(v, b.student.state_dict()[k])
    clash = {"student.x": torch.zeros(1), "student._orig_mod.x": torch.ones(1)}
    with pytest.raises(CheckpointError, match="compiled-model keys"):
        strip_compiled_prefix(clash)
    assert checkpoint_state({"state_dict": {"_orig_mod.a.b": torch.zeros(1)}}, "x") == {"a.b": torch.zeros(1)}


def test_stage_loaders_read_safely(tmp_path, evil):
    from qualiteacher.archs.presets import build_unet
    from qualiteacher.training.students import (
        load_student_weights,
        read_checkpoint_state,
    )

    path, marker = evil
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint_state(path)  # stage 2 reads stage 1 with it; the fidelity stage reads stage 2
    with pytest.raises(CheckpointError, match="refused"):
        load_student_weights(build_unet("tiny"), path)
    assert not marker.exists()


def test_restore_and_evaluate_refuse_a_crafted_checkpoint(tmp_path, evil, demo_root, capsys):
    path, marker = evil
    out = tmp_path / "out"
    src = demo_root / "dehaze" / "test" / "lq"
    assert main(["restore", str(src), "--checkpoint", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint") and "refused" in err[0]
    assert main(["evaluate", "--task", "dehaze", "--data", str(demo_root), "--checkpoint", str(path),
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()  # nothing ran, nothing was written


def test_init_from_a_crafted_checkpoint_fails_the_stage_in_mlflow(tmp_path, evil, demo_root, monkeypatch, capsys):
    from mlflow import MlflowClient

    path, marker = evil
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o"
    code = main(["pipeline", "dehaze", "--preset", "tiny", "--student=unet", f"--data_root={demo_root}",
                 f"--out_dir={out}", "--only-stage", "stage3", f"--stage3.model.init_from={path}"])
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert len(err) == 1 and "refused" in err[0]
    assert not marker.exists()
    state = json.loads((out / "state.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    stage3 = client.get_run(state["stages"]["stage3"]["run_id"])
    assert stage3.info.status == "FAILED" and "refused" in stage3.data.tags["error"]
    assert client.get_run(state["parent_run_id"]).info.status == "FAILED"


# ---------------------------------------------------------------------------- resume
class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 4))
        return torch.utils.data.DataLoader(data, batch_size=4)


def _fit(folder: Path, max_steps: int, ckpt_path: Path | None) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[rotating_checkpoint(folder, 2)])
    trainer.fit(_Tiny(), ckpt_path=str(ckpt_path) if ckpt_path else None)
    return trainer


def test_truncated_last_checkpoint_resumes_from_the_previous_one(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    assert resume_checkpoint(folder) is None
    _fit(folder, 6, None)
    last, prev = folder / "last.ckpt", folder / "prev.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert torch.load(prev, weights_only=True)["global_step"] == 4  # the one before, kept whole
    assert resume_checkpoint(folder) == last
    last.write_bytes(last.read_bytes()[:1000])  # killed while writing
    with caplog.at_level(logging.WARNING, logger="qualiteacher.checkpoints"):
        chosen = resume_checkpoint(folder)
    assert chosen == prev and "resuming from the previous checkpoint" in caplog.text
    trainer = _fit(folder, 8, chosen)
    assert trainer.global_step == 8 and torch.load(last, weights_only=True)["global_step"] == 8
    # neither readable: one clear error, never a silent restart
    last.write_bytes(b"")
    prev.write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(CheckpointError, match=r"truncated.*delete"):
        resume_checkpoint(folder)
