"""The CLI error contract: an expected error is one line on stderr and exit code 2, checked before
any work starts; --debug shows the traceback instead."""
import socket

import pytest
import torch

from qualiteacher.cli import main


def _one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(("error: ", "configuration error: ")), err[0]
    return err[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from test_safety import write_stage3_checkpoint

    return write_stage3_checkpoint(tmp_path_factory.mktemp("ck") / "s3.ckpt")


@pytest.mark.parametrize("argv, expected", [
    (["data", "check", "{tmp}/nowhere"], "does not exist"),
    (["data", "check", "{tmp}", "--layout", "nonsense"], "unknown data layout 'nonsense'"),
    (["score", "{tmp}/nowhere", "--cache", "{tmp}/c.parquet"], "image folder does not exist"),
    (["score", "{tmp}", "--preset", "nope", "--cache", "{tmp}/c.parquet"], "unknown IQA preset 'nope'"),
    (["restore", "{tmp}/nowhere", "--checkpoint", "{ckpt}", "--out", "{tmp}/out"], "input folder not found"),
    (["restore", "{tmp}", "--checkpoint", "{tmp}/missing.ckpt", "--out", "{tmp}/out"], "not found"),
    (["restore", "{tmp}", "--checkpoint", "{ckpt}", "--out", "{tmp}/out", "--level", "99"], "--level 99 is out of range"),
    (["restore", "{tmp}", "--checkpoint", "{ckpt}", "--out", "{tmp}/out", "--tile", "3"], "--tile 3 is too small"),
    (["restore", "{tmp}", "--checkpoint", "{ckpt}", "--out", "{tmp}/out", "--device", "gpu7"], "not a device name"),
    (["evaluate", "--task", "dehaze", "--data", "{tmp}", "--checkpoint", "{ckpt}", "--device", "cpu", "--tile", "3",
      "--benchmark", "unpaired", "--out", "{tmp}/out"], "--tile 3 is too small"),
])
def test_expected_errors_are_one_line_and_exit_2(argv, expected, tmp_path, ckpt, capsys):
    (tmp_path / "x.png").write_bytes(b"")  # a folder holding one (bad) image
    argv = [a.format(tmp=tmp_path, ckpt=ckpt) for a in argv]
    assert main(argv) == 2
    assert expected in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()  # checked before any work


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cuda_without_a_gpu(tmp_path, ckpt, capsys):
    assert main(["restore", str(tmp_path), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"),
                 "--device", "cuda"]) == 2
    assert "no CUDA GPU" in _one_error_line(capsys)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["data", "check", str(tmp_path / "nowhere"), "--debug"])


def test_trainer_values_are_validated_by_print_config(capsys):
    assert main(["pipeline", "dehaze", "--preset", "tiny", "--stage3.trainer.max_steps=-5", "--print_config"]) == 2
    line = _one_error_line(capsys)
    assert "stage3.trainer" in line and "max_steps" in line


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends


def test_unreachable_tracking_server_is_one_line(tmp_path, demo_root, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    code = main(["pipeline", "dehaze", "--preset", "tiny", f"--data_root={demo_root}", f"--out_dir={tmp_path / 'o'}"])
    assert code == 2
    line = _one_error_line(capsys)
    assert uri in line and "not reachable" in line and "MLFLOW_TRACKING_URI" in line
    assert not (tmp_path / "mlflow.db").exists()
