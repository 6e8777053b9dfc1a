"""Shared fixtures: seeded torch, a small demo data set built once per session."""
import os

# Tiny models on few cores: one intra-op thread per process is several times faster than the default
# (thread hand-offs dominate such small tensors) and the multi-process tests (DDP, pipeline
# subprocesses, which inherit the variable) do not oversubscribe the cores. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def qt_home(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """QUALITEACHER_HOME (converted BRISQUE SVR, fitted NIQE) in pytest's cache folder, so the NIQE
    fit is kept between runs; a tmp folder without a cache. Subprocesses inherit it."""
    cache = getattr(request.config, "cache", None)
    path = cache.mkdir("qualiteacher_home") if cache else tmp_path_factory.mktemp("qualiteacher_home")
    old = os.environ.get("QUALITEACHER_HOME")
    os.environ["QUALITEACHER_HOME"] = str(path)
    yield Path(path)
    if old is None:
        os.environ.pop("QUALITEACHER_HOME", None)
    else:
        os.environ["QUALITEACHER_HOME"] = old


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded demo data at 48 px, all four tasks (about 2 s)."""
    from qualiteacher.data.demo import build_demo

    root = tmp_path_factory.mktemp("demo")
    build_demo(root, seed=0, size=48, n_labeled=8, n_unlabeled=6, n_test=3, n_clean=8, n_unseen=3,
               progress=False)
    return root


@pytest.fixture(scope="session")
def fast_ensemble_factory():
    """An offline ensemble without NIQE (the slowest member on CPU) for mechanics tests."""
    from qualiteacher.iqa.presets import ensemble_from_specs, preset_specs

    def make(task: str = "dehaze"):
        specs = [s for s in preset_specs("offline", task) if s.name != "niqe"]
        return ensemble_from_specs(specs, task=task)

    return make



def fit_tiny_stage3(demo_root: Path, ensemble: torch.nn.Module):
    """One stage-3 step of a tiny U-Net student on the demo's dehaze data; returns (module, trainer)."""
    import lightning as L

    from qualiteacher.data.datamodule import RestorationDataModule
    from qualiteacher.training.stage3 import QualiTeacherModule

    module = QualiTeacherModule(preset="tiny", student="unet", ensemble=ensemble, mask_block=16,
                                views=("identity",), n_aug_variants=1, task="dehaze")
    dm = RestorationDataModule(labeled_root=str(demo_root / "dehaze" / "labeled"),
                               unlabeled_root=str(demo_root / "dehaze" / "unlabeled"), crop_size=32, batch_size=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    return module, trainer

@pytest.fixture(scope="session")
def app_checkpoint(tmp_path_factory: pytest.TempPathFactory, demo_root: Path, fast_ensemble_factory) -> Path:
    """A tiny stage-3 checkpoint (U-Net student, one step, task dehaze) whose level embedding is set
    by hand so every quality level gives a visibly different output (app tests)."""
    module, trainer = fit_tiny_stage3(demo_root, fast_ensemble_factory())
    _set_level_ramp_(module.student.level_embedding.embedding.weight)
    path = tmp_path_factory.mktemp("app") / "final.ckpt"
    trainer.save_checkpoint(path)
    return path


def _set_level_ramp_(weight: torch.Tensor, strength: float = 1.5) -> None:
    """Level q adds ``strength * (q / (n-1) - 0.5)`` times an alternating ±1 pattern over channels."""
    n, c = weight.shape
    ramp = (torch.arange(n, dtype=torch.float32) / (n - 1) - 0.5)[:, None]
    signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(c)])[None, :]
    with torch.no_grad():
        weight.copy_(strength * ramp * signs)
