"""The pipeline console: step progress bar with ETA, key numbers per stage, known harmless
warnings silenced where they arise (real ones stay), and the final summary's table and paths."""
import io
import logging
import warnings

import lightning as L
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from qualiteacher import console


class Toy(L.LightningModule):
    """Logs like our stage modules: ``toy/total`` and a stage-3 style bank histogram."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch[0]).pow(2).mean()
        self.log_dict({"stage3/total": loss, "stage3/sup": loss / 2, "stage3/bank_images": 6.0,
                       "stage3/bank_mean_score": 0.5, "stage3/pl_level_3": 2.0, "stage3/pl_level_7": 2.0},
                      on_step=True, on_epoch=False)
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ToyData(L.LightningDataModule):
    def __init__(self, val_root=None) -> None:
        super().__init__()
        self.val_root = val_root

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=2)

    def val_dataloader(self):
        return []


@pytest.fixture(autouse=True)
def _restore_console():
    levels = {n: logging.getLogger(n).level for n in console._QUIET_INFO_LOGGERS}
    with warnings.catch_warnings():
        yield
    console.setup("normal")
    for n, lv in levels.items():
        logging.getLogger(n).setLevel(lv)


def _trainer(steps, callbacks, bar=False):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_model_summary=False, enable_progress_bar=bar, callbacks=callbacks, log_every_n_steps=1)


def test_step_progress_bar_counts_steps_with_eta_and_loss():
    from rich.console import Console

    buf = io.StringIO()
    bar = console.StepProgressBar("stage3", console=Console(file=buf, force_terminal=True, color_system=None, width=140))
    trainer = _trainer(6, [bar], bar=True)
    trainer.fit(Toy(), datamodule=ToyData())
    text = buf.getvalue()
    assert "6/6 steps" in text and "ETA" in text and "loss" in text
    assert "Epoch" not in text and not any(isinstance(c, L.pytorch.callbacks.RichProgressBar) for c in trainer.callbacks)


def test_stage_numbers_are_means_of_the_last_steps_with_bank_and_mean_pl_level(capsys):
    console.setup("quiet")
    console.stage_start("dehaze", "stage3")
    trainer = _trainer(5, [console.StageNumbers("stage3")])
    trainer.fit(Toy(), datamodule=ToyData())
    console.stage_done("dehaze", "stage3")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("✓ dehaze · stage3 done in") and "5 steps" in line
    assert "total " in line and "sup " in line and "bank 6 images, mean score 0.500, mean PL level 5.00" in line


def test_key_numbers_pick_the_catalogued_terms_in_order():
    text = console.key_numbers("stage2", {"l1": 0.5, "total": 2.0, "unrelated": 9.0}, {})
    assert text == "total 2 · l1 0.5"


def test_known_harmless_warnings_are_silenced_and_real_ones_stay():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        console.setup("normal")
        warnings.warn("Found 3 module(s) in eval mode at the start of training. This may lead to ...")
        warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no\n"
                      "pre-optimization state was saved. ...")  # multi-line, as Lightning 2.6 writes it
        warnings.warn("a real problem the user must see")
    assert [str(w.message) for w in seen] == ["a real problem the user must see"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        console.setup("verbose")  # verbose shows everything
        warnings.warn("Found 3 module(s) in eval mode at the start of training. This may lead to ...")
    assert len(seen) == 1
    assert logging.getLogger("lightning.pytorch").level == logging.INFO


@pytest.mark.parametrize("val_root,val_used,shown", [(None, False, False), ("some/folder", False, True),
                                                    ("some/folder", True, False)])
def test_val_loader_without_validation_step_warns_only_when_a_folder_is_unused(val_root, val_used, shown):
    console.setup("normal")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model, data = Toy(), ToyData(val_root)
        with console.fit_warnings(model, data, val_used=val_used):  # val_used: a callback reads the folder
            _trainer(1, []).fit(model, datamodule=data)
    messages = [str(w.message) for w in seen]
    assert any("no `validation_step`" in m for m in messages) == shown


def test_quiet_and_verbose_flags():
    from qualiteacher.pipeline.cli import build_parser as _parser

    assert _parser().parse_known_args(["--quiet"])[0].verbosity == "quiet"
    assert _parser().parse_known_args(["--verbose"])[0].verbosity == "verbose"
    assert _parser().parse_known_args([])[0].verbosity == "normal"
    with pytest.raises(SystemExit):
        _parser().parse_known_args(["--quiet", "--verbose"])


def test_final_summary_lists_the_results_table_and_where_everything_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "outputs" / "dehaze"
    (out / "eval").mkdir(parents=True)
    (out / "stage3").mkdir()
    (out / "stage3" / "final.ckpt").write_bytes(b"x")
    pd.DataFrame({"images": [8, 8, 8], "fused": [0.41, 0.58, 0.63], "iqa_level": [3.0, 5.0, 5.5],
                  "psnr": [14.2, 17.9, 18.3], "ssim": [0.61, 0.72, 0.74]},
                 index=pd.Index(["input", "teacher", "student@7"], name="restorer")).to_csv(out / "eval" / "results.csv")
    pd.DataFrame({"id": ["a"] * 2, "level": [0, 7], "fused": [0.4, 0.6]}).to_csv(out / "eval" / "score_vs_level.csv", index=False)
    cfg = {"task": "dehaze", "preset": "demo", "out_dir": "outputs/dehaze", "experiment": "qualiteacher"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    text = console.final_summary(cfg, {"parent_run_id": "abc123", "stages": {}}, uri, seconds=75)
    assert "done in 1 min 15 s" in text and "Results on 8 held-out dehaze test images" in text
    for row in ("input", "teacher", "student@7", "0.6300", "18.3000"):
        assert row in text, row
    assert "Spearman ρ = 1.000" in text
    assert "Files:   outputs/dehaze" in text and "outputs/dehaze/stage3/final.ckpt" in text
    assert f"MLflow:  {uri}" in text and "parent run abc123" in text
    assert f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1" in text
    assert text.splitlines()[-1].startswith("Try it:  ") and "app --checkpoint outputs/dehaze/stage3/final.ckpt" in text
    # a remote tracking server: open it, no local UI command
    assert "open http://127.0.0.1:5005 in a browser" in console.final_summary(
        cfg, {"stages": {}}, "http://127.0.0.1:5005")
