"""Safe at the edges, round two (issue 27): no code from IQA weight files or a planted last.ckpt,
no model resumed under settings it was not trained with, one odd image never stops an evaluation,
one run per output folder, one-line refusals of careless values, a bank folder per run of a study."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_safety import _Evil

from qualiteacher.checkpoints import CheckpointError, weights_only_loads
from qualiteacher.cli import main

REPO = Path(__file__).resolve().parents[1]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------------------- 1: IQA weight files
def test_weights_only_loads_overrides_the_caller_and_the_environment(tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    torch.save({"params": _Evil(marker)}, tmp_path / "evil.pth")
    torch.save({"w": torch.ones(2), "a": np.arange(3.0)}, tmp_path / "good.pth")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with weights_only_loads():
        with pytest.raises(CheckpointError, match=r"weight file .*evil.pth: refused: .*would run code"):
            torch.load(tmp_path / "evil.pth", weights_only=False)  # what pyiqa passes
        good = torch.load(tmp_path / "good.pth", weights_only=False)  # tensors and NumPy arrays: plain data
    assert torch.equal(good["w"], torch.ones(2)) and list(good["a"]) == [0.0, 1.0, 2.0]
    assert not marker.exists()


def test_pyiqa_member_reads_a_crafted_weight_file_as_data_only(tmp_path, monkeypatch):
    from qualiteacher.iqa.pyiqa_adapter import build_pyiqa_member

    marker = tmp_path / "MARKER"
    torch.save({"params": _Evil(marker)}, tmp_path / "CNNIQA_koniq10k-e6f14c91.pth")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="refused"):
        build_pyiqa_member("cnniqa", "cnniqa", weights_path=str(tmp_path / "CNNIQA_koniq10k-e6f14c91.pth"),
                           allow_download=False)
    assert not marker.exists()
    # a real state dict still loads through pyiqa's own loader
    net = build_pyiqa_member("cnniqa", "cnniqa", pretrained=False, allow_download=False).net
    torch.save({"params": net.state_dict()}, tmp_path / "good.pth")
    loaded = build_pyiqa_member("cnniqa", "cnniqa", weights_path=str(tmp_path / "good.pth"), allow_download=False)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.net.state_dict().items())


def test_score_with_a_crafted_weights_dir_is_one_line(tmp_path, demo_root, capsys, monkeypatch):
    marker = tmp_path / "MARKER"
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save({"params": _Evil(marker)}, weights / "musiq_koniq_ckpt-e95806b9.pth")  # the paper preset's first
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    code = main(["score", str(demo_root / "dehaze" / "test" / "lq"), "--preset", "paper", "--task", "dehaze",
                 "--weights-dir", str(weights), "--out", str(tmp_path / "s.csv")])
    assert code == 2 and "refused" in _one_error_line(capsys.readouterr().err)
    assert not marker.exists()


# ---------------------------------------------------------------------------- 2, 3, 9: the pipeline
def _pipeline(tmp_path: Path, demo_root: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qualiteacher.cli", "pipeline", "dehaze", "--preset", "tiny", "--student=unet",
           f"--data_root={demo_root}", f"--out_dir={tmp_path / 'out'}", "--quiet", "--stage2.trainer.max_steps=2",
           *extra]
    run_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(cmd, cwd=tmp_path, env={**run_env, **(env or {})}, capture_output=True, text=True,
                          timeout=600)


def test_resume_never_runs_code_from_a_planted_last_checkpoint(tmp_path, demo_root):
    marker = tmp_path / "MARKER"
    folder = tmp_path / "out" / "stage2" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"payload": _Evil(marker), "state_dict": {}}, folder / "last.ckpt")
    run = _pipeline(tmp_path, demo_root, "--only-stage", "stage2", env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert run.returncode == 2
    line = _one_error_line(run.stderr)
    assert line.startswith("error: checkpoint") and "last.ckpt" in line and "refused" in line
    assert not marker.exists()


def test_changed_settings_retrain_on_request_and_are_refused_otherwise(tmp_path, demo_root):
    out = tmp_path / "out"
    huge = "--stage2.data.batch_size=100000"
    first = _pipeline(tmp_path, demo_root, "--only-stage", "stage2", huge)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "data.batch_size=100000 is larger than the 8 labeled images: batches of 8" in first.stdout  # 9
    recorded = json.loads((out / "stage2" / "final.fingerprint.json").read_text())
    assert recorded["settings"]["model.lr"] == 2e-4
    # the same settings resume (nothing to train: the stage is at its last step)
    again = _pipeline(tmp_path, demo_root, "--only-stage", "stage2", huge)
    assert again.returncode == 0 and "resuming from" in again.stdout
    # an interrupted stage (not done) rerun with other settings: one line, how to start fresh
    state = json.loads((out / "state.json").read_text())
    state["stages"]["stage2"].pop("done")
    (out / "state.json").write_text(json.dumps(state))
    refused = _pipeline(tmp_path, demo_root, huge, "--stage2.model.lr=0.001", "--stage3.trainer.max_steps=1")
    assert refused.returncode == 2
    line = _one_error_line(refused.stderr)
    assert "model.lr 0.0002 → 0.001" in line and "--from-stage stage2" in line
    # asked for by --from-stage: trained from its start, the old files set aside
    retrained = _pipeline(tmp_path, demo_root, huge, "--from-stage", "stage2", "--stage2.model.lr=0.001",
                          "--only-stage", "stage2")
    assert retrained.returncode == 0, retrained.stderr[-2000:]
    assert "training it from its start" in retrained.stdout and "resuming" not in retrained.stdout
    assert (out / "stage2" / "superseded" / "checkpoints" / "last.ckpt").is_file()
    final = torch.load(out / "stage2" / "final.ckpt", weights_only=True)
    assert final["hyper_parameters"]["lr"] == 0.001 and final["global_step"] == 2
    assert final["qualiteacher_settings"]["settings"]["model.lr"] == 0.001


def test_an_accelerator_that_is_not_there_is_refused_before_anything_trains(tmp_path, demo_root, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = main(["pipeline", "dehaze", "--preset", "tiny", f"--data_root={demo_root}",
                 f"--out_dir={tmp_path / 'out'}", "--stage3.trainer.accelerator=gpu"])
    assert code == 2 and "stage3.trainer.accelerator=gpu: no GPU" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out" / "state.json").exists() and not (tmp_path / "out" / "stage1").exists()
    assert main(["pipeline", "dehaze", "--preset", "tiny", "--stage3.trainer.accelerator=gpu", "--print_config"]) == 0


@pytest.mark.parametrize("argv, says", [
    (["pipeline", "foo"], "invalid choice: 'foo'"),
    (["score", "x", "--max-pixels", "lots"], "invalid int value: 'lots'"),
    (["evaluate", "--task", "nope", "--data", "x"], "invalid choice: 'nope'"),
    (["pipeline", "dehaze", "--from-stage", "nope"], "invalid choice: 'nope'"),
])
def test_wrong_invocations_are_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: qualiteacher") and says in line and "--help" in line


# ---------------------------------------------------------------------------- 4: paired evaluate
def test_paired_evaluate_scores_what_it_can_of_tiny_and_strip_images(tmp_path, demo_root, app_checkpoint,
                                                                    monkeypatch, capsys):
    from qualiteacher.eval.fullref import fullref_scores

    x = torch.rand(2, 3, 8, 8)
    scores = fullref_scores(x, x.flip(-1))
    assert scores.ssim.isnan().all() and scores.psnr.isfinite().all() and "11-px window" in scores.note
    data = tmp_path / "paired"
    for part in ("lq", "gt"):
        (data / part).mkdir(parents=True)
        for src in sorted((demo_root / "dehaze" / "test" / part).glob("*.png"))[:1]:
            Image.open(src).save(data / part / src.name)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"tiny": (8, 8), "strip": (8, 20000)}.items():
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(data / "lq" / f"{name}.png")
        Image.fromarray(pixels[::-1].copy()).save(data / "gt" / f"{name}.png")
    monkeypatch.setenv("QUALITEACHER_OFFLINE", "1")
    out = tmp_path / "eval"
    code = main(["evaluate", "--task", "dehaze", "--data", str(data), "--benchmark", "paired", "--checkpoint",
                 str(app_checkpoint), "--metrics", "piqe", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err[-2000:]
    table = __import__("pandas").read_csv(out / "per_image.csv").set_index(["id", "restorer"])
    assert table.loc[("tiny", "input"), "ssim"] != table.loc[("tiny", "input"), "ssim"]  # NaN
    assert np.isfinite(table.loc[("tiny", "input"), "psnr"]) and np.isfinite(table.loc[("strip", "input"), "psnr"])
    assert "11-px window" in table.loc[("strip", "input"), "note"]
    assert np.isfinite(table.xs("input", level="restorer")["ssim"]).sum() == 1  # the ordinary image
    assert "SSIM not computed" in capsys.readouterr().out


# ---------------------------------------------------------------------------- 6: one run per folder
_HOLDER = textwrap.dedent("""
    import sys, time
    from qualiteacher.pipeline.state import FolderLock
    FolderLock(sys.argv[1], "holder").acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_one_run_per_output_folder_and_stale_locks_are_taken_over(tmp_path, demo_root, capsys):
    from qualiteacher.pipeline.state import FolderInUse, FolderLock

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUse, match=rf"in use by another run \(pid {holder.pid} .*holder\)"):
            FolderLock(out).acquire()
        code = main(["pipeline", "dehaze", "--preset", "tiny", f"--data_root={demo_root}", f"--out_dir={out}"])
        assert code == 2 and f"pid {holder.pid}" in _one_error_line(capsys.readouterr().err)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FolderLock(out) as lock:  # the dead holder's lock
        assert lock.took_over and str(holder.pid) in lock.took_over
    with FolderLock(out) as lock:  # released cleanly: nothing to take over
        assert lock.took_over is None


# ---------------------------------------------------------------------------- 9: smaller ones
@pytest.mark.parametrize("data", ["/etc", "../outside", "data/../../outside"])
def test_mlmodel_data_path_outside_the_model_folder_is_refused(tmp_path, data):
    from qualiteacher.registry import model_data_folder

    model = tmp_path / "m"
    model.mkdir()
    (model / "MLmodel").write_text(f"flavors:\n  python_function:\n    loader_module: qualiteacher.registry\n"
                                   f"    data: {data}\n")
    with pytest.raises(ValueError, match="outside the model folder"):
        model_data_folder(model)


def test_auto_metrics_offline_probe_once_and_never_download(monkeypatch):
    import socket

    from qualiteacher.eval.metrics import DEFAULT_METRICS, resolve_metrics
    from qualiteacher.iqa import pyiqa_adapter

    probes: list[tuple] = []

    def unreachable(where, timeout=None, *a, **k):
        probes.append(where)
        raise OSError("Network is unreachable")

    def download(*a, **k):
        raise AssertionError("a download was tried")

    for var in pyiqa_adapter._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(pyiqa_adapter, "_REACHABLE", {})
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(pyiqa_adapter, "_download", download)
    metrics = resolve_metrics(None, allow_download=True)
    assert len(probes) == len(set(probes)) <= 3  # once per host, whatever the number of files
    offline = [n for n in DEFAULT_METRICS if n in metrics.skipped]
    assert all("not reachable" in metrics.skipped[n] for n in offline)
    assert "piqe" in metrics.modules  # what needs no weights is there


# ---------------------------------------------------------------------------- 10: the study's bank
def test_every_study_run_gets_its_own_bank_folder(tmp_path, demo_root):
    from qualiteacher.study.runner import StudySettings, run_bank_dir, run_config, seed_config
    from qualiteacher.study.store import RunKey, StudyStore

    store = StudyStore(tmp_path / "study")
    cfg = seed_config(StudySettings(preset="tiny", data_root=str(demo_root)), store, seed=0)
    banks = {m: run_config(cfg, store, RunKey(m, 0), steps=2, held_out=None).stage3["model"]["bank_dir"]
             for m in ("qualiteacher", "mean_teacher", "qualiteacher-mask")}
    assert len(set(banks.values())) == 3
    assert all(Path(b).is_relative_to(store.run_dir(RunKey(m, 0))) for m, b in banks.items())
    assert run_bank_dir("/fast/bank", tmp_path / "warm", tmp_path / "run", RunKey("qualiteacher", 1)) \
        == "/fast/bank/qualiteacher-seed1"


def test_a_resumed_run_quarantines_bank_files_it_does_not_know(tmp_path, caplog):
    from qualiteacher.teacher.bank import PseudoLabelBank
    from qualiteacher.teacher.bank_store import QUARANTINE, DiskStore

    root = tmp_path / "bank"
    gen = torch.Generator().manual_seed(0)

    def offer(bank, ids):
        n = len(ids)
        bank.offer_batch(ids, torch.rand(n, 3, 8, 8, generator=gen), torch.ones(n, 1, 8, 8),
                         torch.rand(n, generator=gen), torch.full((n,), 3))

    other = PseudoLabelBank(2, DiskStore(root))  # another run writing into the same folder
    offer(other, ["a", "b"])
    mine = PseudoLabelBank(2, DiskStore(root))
    offer(mine, ["c"])
    saved = mine.state_dict()
    resumed = PseudoLabelBank(2, DiskStore(root))
    resumed.load_state_dict(saved)
    # the resume sweep of stage 3: files no index refers to
    resumed.store.delete(sorted(resumed.store.keys_on_disk() - resumed.live_keys()))
    quarantined = {p.stem for p in (root / QUARANTINE).glob("*.npy")}
    assert quarantined == other.live_keys()                      # moved aside, never deleted
    assert resumed.live_keys() <= resumed.store.keys_on_disk()
    assert "no index of this run refers to" in caplog.text
    # its own entries the run still deletes (garbage collection)
    resumed.store.delete(sorted(resumed.live_keys()))
    assert not resumed.live_keys() & resumed.store.keys_on_disk()
