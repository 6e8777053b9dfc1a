"""What the pipeline prints: one line per stage, a step progress bar with ETA, each stage's key
numbers when it ends, and a final summary (results, where MLflow stored everything, how to look).

Three verbosities: ``quiet`` (a line per finished stage and the summary), ``normal`` (plus what each
stage does and a progress bar) and ``verbose`` (plus Lightning's and MLflow's info messages, model
summaries and the known harmless warnings). Known harmless messages are silenced where they arise
(logger levels, Trainer options, explicit arguments) or, for warnings raised inside libraries, by
their exact text listed in :data:`KNOWN_HARMLESS`; every other warning stays visible.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.utilities.model_helpers import is_overridden
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# say, Verbosity and verbosity live in qualiteacher.say (every layer may print); re-exported here
from qualiteacher.say import Verbosity, main_process, say, set_verbosity, verbosity  # noqa: F401

STAGE_PURPOSE: dict[str, str] = {
    "data": "demo data (built if missing) and the quality grades of the labeled clean images",
    "stage1": "codebook: the VQ autoencoder learns its dual codebook from clean images",
    "stage2": "code prediction: the student learns to predict clean codes from degraded images (the teacher's warm-up)",
    "warmup": "supervised warm-up of the U-Net student on the synthetic pairs (the teacher's start)",
    "fidelity": "fidelity path: fusion blocks learn to bring the input's detail back (the w dial)",
    "stage3": "QualiTeacher: the EMA teacher's graded pseudo-labels teach the student every quality level",
    "eval": "evaluation: input vs teacher vs student on the held-out test images",
    "register": "registration: the final student goes into the MLflow model registry",
}

# key numbers shown when a training stage ends: metric names (after "<prefix>/") averaged over the
# last steps, in this order; metrics a module does not log are left out
KEY_NUMBERS: dict[str, tuple[str, ...]] = {
    "stage1": ("total", "l1", "ssim", "perceptual", "codebook_common", "perplexity_common", "hq_fraction", "val_l1"),
    "stage2": ("total", "ce_common", "ce_hq", "feature", "l1", "val_l1"),
    "warmup": ("total", "l1", "ssim"),
    "fidelity": ("total", "l1", "ssim", "perceptual", "prior_l1", "val_l1"),
    "stage3": ("total", "sup", "pl", "pref", "crop"),
}
WINDOW = 20  # steps averaged for the key numbers

# Warnings raised inside libraries that are harmless here: (message regex, why). Ignored unless
# --verbose. Everything else stays visible.
KNOWN_HARMLESS: tuple[tuple[str, str], ...] = (
    (r".*isinstance\(treespec, LeafSpec\).*", "Lightning calls a torch API that torch has deprecated"),
    (r".*Total length of .* across ranks is zero.*", "Lightning's CombinedLoader length check on empty val sets"),
    (r".*module\(s\) in eval mode at the start of training.*", "teacher and IQA ensemble are frozen on purpose"),
    (r".*does not have many workers.*", "the demo's tiny images load faster in the main process"),
    (r".*Using ModelCheckpoint with manual optimization.*",
     "resume checkpoints hold the state after the step on purpose: a resumed run continues at the next"),
)
VAL_WITHOUT_STEP = r"You passed in a `val_dataloader` but have no `validation_step`.*"

_QUIET_INFO_LOGGERS = ("lightning.pytorch", "lightning.fabric", "mlflow.store.db.utils", "alembic")


class _State:
    numbers: dict[str, str] = {}
    started: dict[str, float] = {}


def setup(verbosity: Verbosity = "normal") -> None:
    """Set the verbosity: logger levels of the chatty libraries and the known-harmless warnings."""
    set_verbosity(verbosity)
    _State.numbers, _State.started = {}, {}
    level = logging.INFO if verbosity == "verbose" else logging.WARNING
    for name in _QUIET_INFO_LOGGERS:  # info lines only ("GPU available", tips, table creation): warnings pass
        logging.getLogger(name).setLevel(level)
    if verbosity != "verbose":
        for pattern, _why in KNOWN_HARMLESS:
            warnings.filterwarnings("ignore", message=pattern)


def show_progress(enabled: bool = True) -> bool:
    """Progress bars: on unless the config turns them off (``enabled``: its ``progress``), the
    console is quiet or the output is not a terminal (a log file gets the stage lines only)."""
    return enabled and verbosity() != "quiet" and sys.stdout.isatty()


@contextlib.contextmanager
def fit_warnings(model: L.LightningModule, data: Any, val_used: bool = False) -> Iterator[None]:
    """Around ``trainer.fit``: Lightning's "val_dataloader but no validation_step" warning is ignored
    when it is known to be empty talk (the module has no validation step and no validation folder
    was configured, or a callback reads the folder: ``val_used``, e.g. stage 3's reward guard probes
    its pairs); otherwise, with a validation folder, the warning stays (its images would be unused)."""
    harmless = not is_overridden("validation_step", model) and (getattr(data, "val_root", None) is None
                                                                 or val_used)
    with warnings.catch_warnings():
        if harmless and verbosity() != "verbose":
            warnings.filterwarnings("ignore", message=VAL_WITHOUT_STEP)
        yield


def stage_start(task: str, stage: str, student: str = "iqpir") -> None:
    _State.started[stage] = time.perf_counter()
    key = "warmup" if stage == "stage2" and student == "unet" else stage
    say(f"▶ {task} · {stage}: {STAGE_PURPOSE.get(key, stage)}")


def stage_numbers(stage: str, text: str) -> None:
    """Key numbers of a stage, printed with its end line."""
    _State.numbers[stage] = text


def stage_done(task: str, stage: str) -> None:
    seconds = time.perf_counter() - _State.started.pop(stage, time.perf_counter())
    numbers = _State.numbers.pop(stage, "")
    say(f"✓ {task} · {stage} done in {format_seconds(seconds)}" + (f" · {numbers}" if numbers else ""), "quiet")


def stage_skipped(task: str, stage: str) -> None:
    say(f"· {task} · {stage}: done earlier, skipped", "quiet")


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def key_numbers(prefix: str, means: dict[str, float], last: dict[str, float]) -> str:
    """``"total 0.123 · sup 0.05 … · bank 24 images, mean score 0.61, mean PL level 5.2"``."""
    parts = [f"{k} {_fmt(means[k])}" for k in KEY_NUMBERS.get(prefix, ("total",)) if k in means]
    text = " · ".join(parts)
    hist = {int(k.rsplit("_", 1)[1]): v for k, v in last.items() if k.startswith("pl_level_")}
    if "bank_images" in last:
        bank = f"bank {int(last['bank_images'])} images"
        if "bank_mean_score" in last:
            bank += f", mean score {last['bank_mean_score']:.3f}"
        if sum(hist.values()) > 0:
            mean_level = sum(q * c for q, c in hist.items()) / sum(hist.values())
            bank += f", mean PL level {mean_level:.2f}"
        text += " · " + bank
    return text


def eval_numbers(table: Any, rho: float) -> str:
    """``"fused: input 0.456 · teacher 0.616 · student@7 0.625 · level dial ρ 0.76"``; the rows of
    the unseen photos (``unseen:NAME``, ``unseen-clean:NAME``) by their PSNR, after it."""
    if "fused" not in getattr(table, "columns", ()):
        return f"level dial ρ {rho:.2f}"
    names = [str(n) for n in table.index]
    fused = " · ".join(f"{n} {float(table['fused'][n]):.3f}" for n in names if not n.startswith("unseen"))
    text = f"fused: {fused} · level dial ρ {rho:.2f}"
    unseen = [n for n in names if n.startswith("unseen")]
    if unseen and "psnr" in table.columns:
        text += " · PSNR on unseen photos: " + " · ".join(
            f"{n.removeprefix('unseen:').replace('unseen-clean:', 'clean:')} {float(table['psnr'][n]):.2f}"
            for n in unseen)
    return text


class StageNumbers(L.Callback):
    """Collects a stage's logged metrics over the last :data:`WINDOW` steps; at the end of training
    hands its key numbers to the console (printed with the stage's end line)."""

    def __init__(self, stage: str, window: int = WINDOW) -> None:
        self.stage, self.window = stage, window
        self.history: dict[str, deque[float]] = {}
        self.last: dict[str, float] = {}
        self.prefix = ""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        for name, value in trainer.callback_metrics.items():
            prefix, _, key = name.partition("/")
            if not key or getattr(value, "numel", lambda: 1)() != 1:
                continue
            self.prefix = self.prefix or prefix
            v = float(value)
            self.last[key] = v
            self.history.setdefault(key, deque(maxlen=self.window)).append(v)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        means = {k: sum(h) / len(h) for k, h in self.history.items() if h}
        for name, value in trainer.callback_metrics.items():  # validation metrics come once per check
            _, _, key = name.partition("/")
            if key.startswith("val_"):
                means[key] = float(value)
        text = key_numbers(self.prefix, means, self.last)
        steps = f"{trainer.global_step} steps"
        n = max((len(h) for h in self.history.values()), default=0)
        stage_numbers(self.stage, f"{steps} · {text} (mean of the last {n} batches)" if text else steps)


class StepProgressBar(ProgressBar):
    """One bar per training stage counting optimizer steps (``global_step`` of ``max_steps``) with
    elapsed time, ETA and the running loss; no epoch counter, no validation bars."""

    def __init__(self, stage: str, console: Any = None) -> None:
        super().__init__()
        self.stage, self.console = stage, console  # console: a rich Console (default: stdout)
        self._enabled = True
        self._progress: Any = None
        self._task: Any = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _total(self, trainer: L.Trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        total = trainer.estimated_stepping_batches
        return int(total) if total != float("inf") else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled:
            return

        self._progress = Progress(
            TextColumn(f"  {self.stage}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[loss]}"),
            transient=True, console=self.console)
        self._progress.start()
        self._task = self._progress.add_task(self.stage, total=self._total(trainer),
                                             completed=trainer.global_step, loss="")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._progress is None:
            return
        loss = trainer.progress_bar_metrics.get("loss")
        self._progress.update(self._task, completed=trainer.global_step,
                              loss="" if loss is None else f"loss {float(loss):.4g}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress.console.print(*args, **kwargs)
        else:
            print(*args, **kwargs)


# ---------------------------------------------------------------------------- final summary
def _shown(path: str | Path) -> str:
    """A path relative to the working directory when it lies below it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def cli_prefix() -> str:
    """How this process's ``qualiteacher`` command is spelled from here (``qualiteacher`` when it is
    on PATH, ``.venv/bin/qualiteacher`` from the repository, else ``python -m qualiteacher.cli``)."""
    exe = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if exe is not None and exe.name == "qualiteacher":
        on_path = shutil.which("qualiteacher")
        if on_path and Path(on_path).resolve() == exe.resolve():
            return "qualiteacher"
        return _shown(exe)
    return f"{_shown(sys.executable)} -m qualiteacher.cli"


def mlflow_ui_command(uri: str) -> str:
    """The command (or address) that shows the runs of tracking store ``uri``."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    mlflow = Path(sys.executable).with_name("mlflow")
    exe = _shown(mlflow) if mlflow.is_file() else "mlflow"
    return f"{exe} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def _run_tag(uri: str, run_id: str | None, tag: str) -> str | None:
    if not run_id:
        return None
    try:
        # lazy: mlflow takes 1.5 s to import; only the closing summary asks the tracking store
        from mlflow import MlflowClient

        return MlflowClient(uri).get_run(run_id).data.tags.get(tag)
    except Exception:  # noqa: BLE001  the summary must not fail on a tracking problem
        return None


def registered_version(uri: str, name: str, run_id: str | None) -> str | None:
    """Version of model ``name`` registered by run ``run_id`` (the newest if the run is unknown)."""
    try:
        # lazy: mlflow takes 1.5 s to import; only the closing summary asks the registry
        from mlflow import MlflowClient

        versions = MlflowClient(uri).search_model_versions(f"name = '{name}'")
    except Exception:  # noqa: BLE001  the summary must not fail on a registry problem
        return None
    mine = [v for v in versions if run_id is None or v.run_id == run_id] or versions
    return str(max(int(v.version) for v in mine)) if mine else None


def app_command(source: str, host: str = "127.0.0.1", port: int = 7860) -> str:
    """The command line that opens the app on ``source`` (a checkpoint path or a models:/ URI)."""
    flag = "--model" if source.startswith("models:/") else "--checkpoint"
    extra = "" if (host, port) == ("127.0.0.1", 7860) else f" --host {host} --port {port}"
    return f"qualiteacher app {flag} {source}{extra}"


def final_summary(cfg: dict[str, Any], state: dict[str, Any], uri: str, seconds: float | None = None) -> str:
    """The closing text of a pipeline: results table, files, MLflow, the UI and app commands."""
    import pandas as pd  # lazy: pandas and the eval modules (scipy) serve the closing summary only

    from qualiteacher.eval.report import format_table  # lazy: see final_summary's first import

    task, out = cfg["task"], Path(cfg["out_dir"])
    lines = [f"━━ {task} · {cfg.get('preset', '')} · done" + (f" in {format_seconds(seconds)}" if seconds else "") + " ━━"]
    flag = _run_tag(uri, state.get("parent_run_id"), "iqa_scores")
    if flag:  # e.g. stand-in IQA weights: every score below is not a measurement
        lines.append(f"!!! IQA SCORES ARE {flag} !!!")
    results = out / "eval" / "results.csv"
    if results.is_file():
        table = pd.read_csv(results, index_col=0)
        brief = [c for c in ("images", "fused", "iqa_level", "psnr", "ssim") if c in table.columns]
        has_images = "images" in table.columns and len(table)
        n = int(table["images"].iloc[0]) if has_images else "the"  # the test rows; unseen:* count their own
        new = table.index.astype(str).str.startswith("unseen:")
        also = f"; unseen:* rows: {int(table.loc[new, 'images'].max())} images of photos no split is cut from" \
            if has_images and new.any() else ""
        lines += [f"Results on {n} held-out {task} test images{also} (fused IQA score: higher is better):",
                  format_table(table[brief])]
        levels = out / "eval" / "score_vs_level.csv"
        if levels.is_file():
            from qualiteacher.eval.nriqa import level_spearman  # lazy: see final_summary's first import

            lines.append(f"Quality dial: ensemble score vs requested level, Spearman ρ = "
                         f"{level_spearman(pd.read_csv(levels)):.3f}")
    else:
        lines.append("No evaluation results yet (run the eval stage).")
    final = out / "stage3" / "final.ckpt"
    stages = state.get("stages", {})
    lines.append(f"Files:   {_shown(out)} (final checkpoint {_shown(final)}; evaluation in {_shown(out / 'eval')})")
    lines.append(f"MLflow:  {uri} · experiment {cfg.get('experiment', 'qualiteacher')} · parent run "
                 f"{state.get('parent_run_id', '?')}")
    name = f"qualiteacher-{task}"
    version = registered_version(uri, name, stages.get("register", {}).get("run_id")) if stages.get("register", {}).get("done") else None
    if version:
        lines.append(f"Model:   models:/{name}/{version} in the registry")
    lines.append(f"See all: {mlflow_ui_command(uri)}   (then http://127.0.0.1:5000)")
    if final.is_file():
        lines.append(f"Try it:  {cli_prefix()} {app_command(_shown(final)).removeprefix('qualiteacher ')}"
                     f"   (then http://127.0.0.1:7860)")
    return "\n".join(lines)
