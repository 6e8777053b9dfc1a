"""The evaluation's NR-IQA metric set: catalogue, weight-file table, offline / auto resolution, scoring."""
import importlib
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qualiteacher.eval.metrics import (
    DEFAULT_METRICS,
    EVAL_METRICS,
    OFFLINE_METRICS,
    OFFLINE_SUBSTITUTES,
    MetricSet,
    list_eval_metrics,
    metric_label,
    resolve_metrics,
    score_images,
)
from qualiteacher.iqa.members import MissingWeightsError
from qualiteacher.iqa.pyiqa_adapter import build_pyiqa_member
from qualiteacher.iqa.pyiqa_weights import (
    METRIC_WEIGHT_FILES,
    default_weight_file,
    metric_available,
    metric_weight_files,
    pyiqa_weights_dir,
)

# every file a default-built metric loads, as pyiqa 0.1.16 names it: (arch module, default_model_urls keys)
PYIQA_DEFAULT_KEYS = {
    "brisque": ("brisque_arch", ["url"]),
    "niqe": ("niqe_arch", ["url"]),
    "cnniqa": ("cnniqa_arch", ["koniq10k"]),
    "musiq": ("musiq_arch", ["koniq10k"]),
    "nima": ("nima_arch", ["inception_resnet_v2-ava"]),
    "topiq_nr": ("topiq_arch", ["cfanet_nr_koniq_res50"]),
    "hyperiqa": ("hypernet_arch", ["resnet50-koniq"]),
    "maniqa": ("maniqa_arch", ["koniq"]),
    "dbcnn": ("dbcnn_arch", ["scnn", "koniq"]),
}
TIMM_BACKBONES = {"nima": "inception_resnet_v2", "topiq_nr": "resnet50", "hyperiqa": "resnet50",
                  "maniqa": "vit_base_patch8_224"}
MISSING_OFFLINE = {  # default metric -> its file and folder under $TORCH_HOME/hub
    "cnniqa": ("CNNIQA_koniq10k-e6f14c91.pth", "pyiqa"),
    "musiq": ("musiq_koniq_ckpt-e95806b9.pth", "pyiqa"),
    "clipiqa": ("RN50.pt", "clip"),
    "niqe": ("niqe_modelparameters.mat", "pyiqa"),
    "brisque": ("brisque_svm_weights.pth", "pyiqa"),
}


def _no_network(*args, **kwargs):
    raise AssertionError("network access while downloads are disabled")


def _go_offline(mp: pytest.MonkeyPatch, torch_home: Path) -> Path:
    mp.setenv("TORCH_HOME", str(torch_home))
    mp.setenv("QUALITEACHER_OFFLINE", "1")
    mp.setattr(socket.socket, "connect", _no_network)
    mp.setattr(socket, "getaddrinfo", _no_network)
    return torch_home / "hub"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Downloads disabled, an empty ``$TORCH_HOME`` and no network; returns ``$TORCH_HOME/hub``."""
    return _go_offline(monkeypatch, tmp_path / "torch")


@pytest.fixture(scope="module")
def offline_auto(tmp_path_factory: pytest.TempPathFactory) -> tuple[MetricSet, Path]:
    with pytest.MonkeyPatch.context() as mp:
        hub_dir = _go_offline(mp, tmp_path_factory.mktemp("torch"))
        return resolve_metrics(), hub_dir


def test_catalogue_and_labels() -> None:
    assert set(DEFAULT_METRICS) | set(OFFLINE_METRICS) <= set(list_eval_metrics())
    assert set(OFFLINE_SUBSTITUTES.values()) <= set(OFFLINE_METRICS)
    for name, metric in EVAL_METRICS.items():
        assert metric.name == name
        if metric.kind == "pyiqa":
            assert metric.metric in METRIC_WEIGHT_FILES
    assert metric_label("niqe") == "NIQE ↓" and metric_label("musiq") == "MUSIQ ↑"
    assert metric_label("brisque_live").endswith("↓")


def test_weight_table_matches_pyiqa_defaults() -> None:
    import timm
    import torchvision
    from pyiqa.archs.clip_model import _MODELS
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    for metric, (module, keys) in PYIQA_DEFAULT_KEYS.items():
        urls = importlib.import_module(f"pyiqa.archs.{module}").default_model_urls
        expected = {os.path.basename(urls[k]) for k in keys}
        assert {f.name for f in METRIC_WEIGHT_FILES[metric] if f.store == "pyiqa"} == expected, metric
    opts = {m: DEFAULT_CONFIGS[m]["metric_opts"] for m in PYIQA_DEFAULT_KEYS}
    assert opts["cnniqa"]["pretrained"] == opts["musiq"]["pretrained"] == "koniq10k"
    assert opts["nima"]["base_model_name"] == "inception_resnet_v2" and "train_dataset" not in opts["nima"]
    assert opts["topiq_nr"]["model_name"] == "cfanet_nr_koniq_res50"
    assert opts["maniqa"]["train_dataset"] == "koniq"
    # CLIPIQA: default backbone RN50 and no checkpoint of its own
    assert DEFAULT_CONFIGS["clipiqa"]["metric_opts"] == {"type": "CLIPIQA"}
    (clip_file,) = METRIC_WEIGHT_FILES["clipiqa"]
    assert clip_file.source == _MODELS["RN50"] and clip_file.name == "RN50.pt"
    for metric, arch in TIMM_BACKBONES.items():
        (hf,) = [f for f in METRIC_WEIGHT_FILES[metric] if f.store == "hf"]
        assert hf.source == timm.models.get_pretrained_cfg(arch).hf_hub_id, metric
    (vgg,) = [f for f in METRIC_WEIGHT_FILES["dbcnn"] if f.store == "torch"]
    assert vgg.source == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    assert METRIC_WEIGHT_FILES["piqe"] == () and metric_available("piqe") == (True, "")


def test_auto_mode_offline_gives_the_offline_set(offline_auto: tuple[MetricSet, Path]) -> None:
    metric_set, hub_dir = offline_auto
    assert list(metric_set.modules) == ["piqe", "brisque_live", "niqe_fit"]
    assert set(metric_set.skipped) == set(MISSING_OFFLINE)
    for name, (file_name, folder) in MISSING_OFFLINE.items():
        reason = metric_set.skipped[name]
        assert file_name in reason and str(hub_dir / folder) in reason, reason
    for module in metric_set.modules.values():
        assert not module.training and not any(p.requires_grad for p in module.parameters())


def test_auto_mode_failed_downloads_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import pyiqa.utils.download_util as du

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(du, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    from qualiteacher.iqa import pyiqa_adapter

    monkeypatch.setattr(pyiqa_adapter, "_REACHABLE", {})  # the hosts are probed once, then nothing is downloaded
    metric_set = resolve_metrics(allow_download=True)
    assert list(metric_set.modules) == ["piqe", "brisque_live", "niqe_fit"]
    assert all("Download failed" in reason or "not reachable" in reason for reason in metric_set.skipped.values())


def test_explicit_missing_metric_raises_with_file_and_folder(hub: Path) -> None:
    start = time.monotonic()
    with pytest.raises(MissingWeightsError) as info:
        resolve_metrics(["piqe", "musiq"])
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "musiq_koniq_ckpt-e95806b9.pth" in message and str(hub / "pyiqa") in message
    assert "brisque_live" in message and "niqe_fit" in message


def test_unknown_metric_name() -> None:
    with pytest.raises(ValueError, match="niqe_fit"):
        resolve_metrics(["piqe", "ssim"])


def test_weight_file_put_in_place_is_loaded(hub: Path) -> None:
    reference = build_pyiqa_member("cnniqa", "cnniqa", pretrained=False)
    state = reference.net.state_dict()
    state["fc3.bias"] = state["fc3.bias"] + 1.5  # the score is fc3's output: shifts by exactly 1.5
    path = pyiqa_weights_dir() / default_weight_file("cnniqa")
    assert path == hub / "pyiqa" / "CNNIQA_koniq10k-e6f14c91.pth"
    assert metric_available("cnniqa")[0] is False and metric_weight_files("cnniqa") == [path]
    path.parent.mkdir(parents=True)
    torch.save({"params": state}, path)  # pyiqa's layout: weights under 'params'
    assert metric_available("cnniqa") == (True, "")
    images = torch.rand(2, 3, 64, 64)
    scores = score_images(resolve_metrics(["cnniqa"]), images)
    with torch.no_grad():
        expected = reference(images).numpy() + 1.5
    np.testing.assert_allclose(scores["cnniqa"].to_numpy(), expected, rtol=1e-5, atol=1e-5)
    assert "cnniqa" in resolve_metrics().modules  # auto mode picks it up as well


def test_scores_equal_the_offline_ensemble(offline_auto: tuple[MetricSet, Path]) -> None:
    from qualiteacher.iqa.presets import build_ensemble

    metric_set, _ = offline_auto
    images = torch.rand(2, 3, 64, 64)
    scores = score_images(metric_set, images)
    assert scores.shape == (2, 3) and list(scores.columns) == ["piqe", "brisque_live", "niqe_fit"]
    assert np.isfinite(scores.to_numpy()).all()
    raw = build_ensemble("offline").scores(images).raw  # upsamples to each member's min size, as we do
    for column, member in (("piqe", "piqe"), ("brisque_live", "brisque"), ("niqe_fit", "niqe")):
        np.testing.assert_allclose(scores[column].to_numpy(), raw[member].double().numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        score_images(metric_set, torch.rand(3, 64, 64))
