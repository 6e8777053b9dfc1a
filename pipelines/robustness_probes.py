"""The probes of `benchmark_robustness.py` (part 2): what a hostile or careless user tries, what
must happen, what happened. Each probe runs the real command line in its own process (tiny
pipelines: U-Net student, ``tiny`` preset, a small demo set) and returns ``(got, passed)``;
:func:`run_probes` prints the table ``probe | expected | got | pass``. docs/safety.md lists the
guarantees these probes check.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CLI = [sys.executable, "-m", "qualiteacher.cli"]
REPO = Path(__file__).resolve().parents[1]
NO_CAP = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]


class _Evil:
    """Unpickling this writes ``marker``: what a crafted weight file or checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


class Probes:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.demo = work / "demo"
        self.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                    "QUALITEACHER_HOME": os.environ.get("QUALITEACHER_HOME", str(work / "home"))}
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.marker = work / "MARKER"

    # ------------------------------------------------------------------ helpers
    def run(self, argv: list[str], cwd: Path | None = None, env: dict | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=cwd or self.work, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    def pipeline(self, out: str, *extra: str, cwd: Path | None = None, env: dict | None = None,
                 prefix: list[str] = ()) -> subprocess.CompletedProcess:
        return self.run([*prefix, *CLI, "pipeline", "dehaze", "--preset", "tiny", "--student=unet",
                         f"--data_root={self.demo}", f"--out_dir={out}", "--quiet", "--stage2.trainer.max_steps=2",
                         *extra], cwd=cwd, env=env)

    @staticmethod
    def lines(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln.strip()]

    def one_line(self, proc: subprocess.CompletedProcess, says: str) -> tuple[str, bool]:
        err = self.lines(proc.stderr)
        got = f"exit {proc.returncode}, {len(err)} stderr line(s): {err[-1][:110] if err else ''}"
        return got, proc.returncode == 2 and len(err) == 1 and says in err[0] and not self.marker.exists()

    def evil(self, path: Path) -> Path:
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"params": _Evil(self.marker), "state_dict": {}}, path)
        return path

    # ------------------------------------------------------------------ 1, 2: no code from files
    def iqa_weight_file(self) -> tuple[str, bool]:
        weights = self.evil(self.work / "weights" / "musiq_koniq_ckpt-e95806b9.pth").parent
        proc = self.run([*CLI, "score", str(self.demo / "dehaze" / "test" / "lq"), "--preset", "paper", "--task",
                         "dehaze", "--weights-dir", str(weights), "--out", str(self.work / "s.csv")],
                        env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
        return self.one_line(proc, "refused")

    def planted_last_checkpoint(self) -> tuple[str, bool]:
        self.evil(self.work / "planted" / "stage2" / "checkpoints" / "last.ckpt")
        proc = self.pipeline(str(self.work / "planted"), "--only-stage", "stage2",
                             env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
        return self.one_line(proc, "refused")

    # ------------------------------------------------------------------ 3: settings of a checkpoint
    def from_stage_with_new_settings(self) -> tuple[str, bool]:
        import torch

        out = self.work / "main"
        first = self.pipeline(str(out), "--stage3.trainer.max_steps=6")
        if first.returncode:
            return f"first run: exit {first.returncode}: {self.lines(first.stderr)[-1:]}", False
        again = self.pipeline(str(out), "--stage3.trainer.max_steps=6", "--from-stage", "stage3",
                              "--stage3.model.w_pref=0.5", "--stage3.model.lr=0.001")
        final = torch.load(out / "stage3" / "final.ckpt", weights_only=True)
        hp = final["hyper_parameters"]
        retrained = "training it from its start" in again.stdout
        got = (f"exit {again.returncode}; retrained from step 0: {retrained}; final.ckpt: step "
               f"{final['global_step']}, lr {hp['lr']}, w_pref {hp['w_pref']}")
        return got, again.returncode == 0 and retrained and final["global_step"] == 6 and hp["lr"] == 0.001 \
            and hp["w_pref"] == 0.5

    def resume_with_other_settings(self) -> tuple[str, bool]:
        out = self.work / "main"
        state = json.loads((out / "state.json").read_text())
        for stage in ("stage3", "eval", "register"):  # stage 3 interrupted
            state["stages"][stage].pop("done", None)
        (out / "state.json").write_text(json.dumps(state))
        proc = self.pipeline(str(out), "--stage3.trainer.max_steps=6", "--stage3.model.w_pref=0.7",
                             "--stage3.model.lr=0.001")
        return self.one_line(proc, "--from-stage stage3")

    # ------------------------------------------------------------------ 4: paired evaluation
    def paired_evaluate_small_images(self) -> tuple[str, bool]:
        import numpy as np
        import pandas as pd
        from PIL import Image

        data = self.work / "paired"
        rng = np.random.default_rng(0)
        for part in ("lq", "gt"):
            (data / part).mkdir(parents=True, exist_ok=True)
            shutil.copy(sorted((self.demo / "dehaze" / "test" / part).glob("*.png"))[0], data / part / "normal.png")
        for name, (h, w) in {"tiny_8px": (8, 8), "strip_20000x8": (8, 20000)}.items():
            pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(data / "lq" / f"{name}.png")
            Image.fromarray(pixels[::-1].copy()).save(data / "gt" / f"{name}.png")
        proc = self.run([*CLI, "evaluate", "--task", "dehaze", "--data", str(data), "--benchmark", "paired",
                         "--checkpoint", str(self.work / "main" / "stage3" / "final.ckpt"), "--metrics", "piqe",
                         "--out", str(self.work / "eval"), "--no-progress", "--device", "cpu"],
                        env={"QUALITEACHER_OFFLINE": "1"})
        csv = self.work / "eval" / "per_image.csv"
        if proc.returncode or not csv.is_file():
            return f"exit {proc.returncode}, per_image.csv: {csv.is_file()}", False
        rows = pd.read_csv(csv)
        odd = rows[rows["id"] != "normal"]
        ok = odd["ssim"].isna().all() and odd["psnr"].notna().all() and odd["note"].str.contains("11-px").all() \
            and rows.loc[rows["id"] == "normal", "ssim"].notna().all()
        return (f"exit 0; per_image.csv {len(rows)} rows; SSIM NaN with a note for "
                f"{odd['ssim'].isna().sum()}/{len(odd)} rows of the odd images; PSNR of all"), bool(ok)

    # ------------------------------------------------------------------ 5: tracking faults
    def _read_only_mid_stage3(self, name: str, what: str) -> tuple[subprocess.Popen, Path]:
        home = self.work / name
        home.mkdir(exist_ok=True)
        cmd = [*NO_CAP, *CLI, "pipeline", "dehaze", "--preset", "tiny", "--student=unet",
               f"--data_root={self.demo}", "--out_dir=out", "--quiet", "--stage2.trainer.max_steps=2",
               "--stage3.trainer.max_steps=40", "--checkpoint_every=5"]
        proc = subprocess.Popen(cmd if os.geteuid() == 0 else cmd[len(NO_CAP):], cwd=home, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        last = home / "out" / "stage3" / "checkpoints" / "last.ckpt"
        while not last.exists() and proc.poll() is None:
            time.sleep(0.1)
        folders = [home] if what == "store" else [p for p in [home / "mlartifacts", *(home / "mlartifacts").rglob("*")]
                                                  if p.is_dir()]
        for folder in folders:
            folder.chmod(0o555)
        return proc, home

    def _restore(self, home: Path) -> None:
        for folder in [home, *home.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o755)

    def _tracked_steps(self, home: Path) -> tuple[list[int], list[str]]:
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        state = json.loads((home / "out" / "state.json").read_text())
        steps = sorted(m.step for m in client.get_metric_history(state["stages"]["stage3"]["run_id"], "stage3/total"))
        ids = [state["parent_run_id"], *(s["run_id"] for s in state["stages"].values())]
        return steps, sorted({client.get_run(i).info.status for i in ids})

    def store_read_only(self) -> tuple[str, bool]:
        if os.geteuid() == 0 and shutil.which("setpriv") is None:
            return "n/a: root without setpriv cannot lose its write permission", True
        proc, home = self._read_only_mid_stage3("ro-store", "store")
        _, err = proc.communicate(timeout=900)
        self._restore(home)
        tracking = [ln for ln in self.lines(err) if "MLflow" in ln or ln.startswith("error")]
        rerun = self.pipeline("out", "--stage3.trainer.max_steps=40", "--checkpoint_every=5", cwd=home)
        steps, statuses = self._tracked_steps(home)
        got = (f"read-only run: exit {proc.returncode}, {len(tracking)} tracking line(s) of {len(self.lines(err))} "
               f"on stderr; rerun: exit {rerun.returncode}, stage-3 steps {steps[0]}..{steps[-1]} "
               f"({len(steps)} values), runs {'/'.join(statuses)}")
        return got, len(tracking) <= 4 and rerun.returncode == 0 and steps == list(range(40)) \
            and statuses == ["FINISHED"]

    def artifact_store_read_only(self) -> tuple[str, bool]:
        if os.geteuid() == 0 and shutil.which("setpriv") is None:
            return "n/a: root without setpriv cannot lose its write permission", True
        proc, home = self._read_only_mid_stage3("ro-artifacts", "artifacts")
        _, err = proc.communicate(timeout=900)
        self._restore(home)
        state = json.loads((home / "out" / "state.json").read_text())
        done = [s for s, v in state["stages"].items() if v.get("done")]
        errors = [ln for ln in self.lines(err) if ln.startswith("error")]
        rerun = self.pipeline("out", "--stage3.trainer.max_steps=40", "--checkpoint_every=5", cwd=home)
        steps, statuses = self._tracked_steps(home)
        got = (f"read-only run: exit {proc.returncode}, done: {', '.join(done)}; {errors[0][:60] if errors else ''}…;"
               f" rerun: exit {rerun.returncode}, runs {'/'.join(statuses)}, {len(steps)} stage-3 steps")
        return got, "eval" in done and len(errors) == 1 and rerun.returncode == 0 and statuses == ["FINISHED"] \
            and steps == list(range(40))

    # ------------------------------------------------------------------ 6: one run per folder
    def two_pipelines_one_folder(self) -> tuple[str, bool]:
        out = self.work / "locked"
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom qualiteacher.pipeline.state import "
                                   "FolderLock\nFolderLock(sys.argv[1], 'first pipeline').acquire()\nprint('ok', "
                                   "flush=True)\ntime.sleep(900)", str(out)], env=self.env, stdout=subprocess.PIPE,
                                  text=True)
        holder.stdout.readline()
        start = time.perf_counter()
        second = self.pipeline(str(out))
        wall = time.perf_counter() - start
        got, ok = self.one_line(second, f"pid {holder.pid}")
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        took = self.run([sys.executable, "-c", "import sys\nfrom qualiteacher.pipeline.state import FolderLock\n"
                         "print(FolderLock(sys.argv[1]).acquire().took_over)", str(out)]).stdout.strip()
        return f"{got} ({wall:.0f} s); after kill -9 of the first: taken over from {took}", \
            ok and str(holder.pid) in took

    # ------------------------------------------------------------------ 9: smaller ones
    def huge_batch_size(self) -> tuple[str, bool]:
        proc = self.pipeline(str(self.work / "batch"), "--only-stage", "stage2", "--stage2.data.batch_size=100000")
        said = [ln.strip() for ln in proc.stdout.splitlines() if "batch_size=100000" in ln]
        return f"exit {proc.returncode}: {said[0] if said else 'nothing said'}", proc.returncode == 0 and bool(said)

    def escaping_mlmodel(self) -> tuple[str, bool]:
        results = []
        for data in ("/etc", "../../outside"):
            model = self.work / "model"
            model.mkdir(exist_ok=True)
            (model / "MLmodel").write_text(f"flavors:\n  python_function:\n    loader_module: qualiteacher.registry\n"
                                           f"    data: {data}\n")
            proc = self.run([sys.executable, "-c", "import sys\nfrom qualiteacher.errors import run_with_contract\n"
                             "from qualiteacher.registry import model_data_folder\nsys.exit(run_with_contract("
                             "lambda: model_data_folder(sys.argv[1]) and 0))", str(model)])
            results.append(self.one_line(proc, "outside the model folder"))
        return "; ".join(f"data: {d}: {g}" for d, (g, _) in zip(("/etc", "../../outside"), results)), \
            all(ok for _, ok in results)

    def auto_metrics_offline(self) -> tuple[str, bool]:
        env = {k: "" for k in ("QUALITEACHER_OFFLINE", "HF_HUB_OFFLINE")}
        start = time.perf_counter()
        proc = self.run([*CLI, "evaluate", "--task", "dehaze", "--data", str(self.demo / "dehaze" / "test"),
                         "--benchmark", "paired", "--checkpoint", str(self.work / "main" / "stage3" / "final.ckpt"),
                         "--out", str(self.work / "eval-auto"), "--no-progress", "--device", "cpu", "--limit", "1"],
                        env=env)
        wall = time.perf_counter() - start
        text = proc.stdout + proc.stderr
        probed = text.count("checked once for this run")
        downloads = text.count("Downloading")
        return f"exit {proc.returncode} in {wall:.0f} s; {downloads} download(s) tried; {probed} metric(s) skipped " \
               f"after one check per host", proc.returncode == 0 and downloads == 0

    def gpu_that_is_not_there(self) -> tuple[str, bool]:
        import torch

        if torch.cuda.is_available():
            return "n/a: this machine has a GPU", True
        out = self.work / "gpu"
        proc = self.pipeline(str(out), "--stage3.trainer.accelerator=gpu")
        got, ok = self.one_line(proc, "no GPU")
        trained = [s for s in ("stage1", "stage2", "fidelity", "stage3") if (out / s).exists()]
        return f"{got}; stage folders: {trained or 'none'}", ok and not trained

    def wrong_invocations(self) -> tuple[str, bool]:
        cases = {"pipeline foo": ["pipeline", "foo"], "score --max-pixels lots": ["score", ".", "--max-pixels", "lots"]}
        got = {name: self.one_line(self.run([*CLI, *argv]), "error:") for name, argv in cases.items()}
        return "; ".join(f"{n}: {g}" for n, (g, _) in got.items()), all(ok for _, ok in got.values())

    # ------------------------------------------------------------------ 10: the study's bank
    def study_bank_folders(self) -> tuple[str, bool]:
        code = ("import sys\nfrom qualiteacher.study.runner import StudySettings, run_config, seed_config\n"
                "from qualiteacher.study.store import RunKey, StudyStore\n"
                "store = StudyStore(sys.argv[1])\n"
                "cfg = seed_config(StudySettings(preset='tiny', data_root=sys.argv[2]), store, 0)\n"
                "for m in ('qualiteacher', 'mean_teacher', 'qualiteacher-mask'):\n"
                "    print(run_config(cfg, store, RunKey(m, 0), 2, None)['stage3']['model']['bank_dir'])\n")
        banks = self.lines(self.run([sys.executable, "-c", code, str(self.work / "study"), str(self.demo)]).stdout)
        return f"{len(set(banks))} folders for {len(banks)} modes of seed 0", len(set(banks)) == len(banks) == 3

    def bank_quarantine(self) -> tuple[str, bool]:
        code = ("import sys, torch\nfrom pathlib import Path\nfrom qualiteacher.teacher.bank import PseudoLabelBank\n"
                "from qualiteacher.teacher.bank_store import DiskStore, QUARANTINE\nroot = Path(sys.argv[1])\n"
                "def offer(b, ids):\n    n = len(ids)\n    b.offer_batch(ids, torch.rand(n, 3, 8, 8), torch.ones(n, 1, 8, 8),"
                " torch.rand(n), torch.full((n,), 3))\n"
                "other, mine = PseudoLabelBank(2, DiskStore(root)), PseudoLabelBank(2, DiskStore(root))\n"
                "offer(other, ['a', 'b']); offer(mine, ['c'])\nresumed = PseudoLabelBank(2, DiskStore(root))\n"
                "resumed.load_state_dict(mine.state_dict())\n"
                "resumed.store.delete(sorted(resumed.store.keys_on_disk() - resumed.live_keys()))\n"
                "kept = {p.stem for p in (root / QUARANTINE).glob('*.npy')}\n"
                "print(len(other.live_keys()), len(kept & other.live_keys()), len(resumed.live_keys() - "
                "resumed.store.keys_on_disk()))\n")
        proc = self.run([sys.executable, "-c", code, str(self.work / "bank")])
        try:
            theirs, quarantined, lost = (int(v) for v in proc.stdout.split())
        except ValueError:
            return f"exit {proc.returncode}: {self.lines(proc.stderr)[-1:]}", False
        return f"{quarantined} of the other run's {theirs} files quarantined, 0 deleted; {lost} own entries lost", \
            quarantined == theirs and lost == 0

    # ------------------------------------------------------------------ 11: the browser test
    def browser_test_without_chromium(self) -> tuple[str, bool]:
        proc = self.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/app/test_app_browser.py"],
                        cwd=REPO, env={"QUALITEACHER_CHROMIUM": str(self.work / "no-chromium")})
        summary = self.lines(proc.stdout)[-1] if proc.stdout.strip() else ""
        reason = "not found: Debian's chromium is needed" in proc.stdout
        installs = "apt-get install -y -qq chromium" in (REPO / "qt").read_text()
        return f"exit {proc.returncode}: {summary}; reason shown: {reason}; ./qt test installs it: {installs}", \
            proc.returncode == 0 and "1 skipped" in summary and reason and installs

    # ------------------------------------------------------------------ the hostile corpus
    def hostile_corpus(self) -> tuple[str, bool]:
        from qualiteacher.data.edge_cases import build_edge_case_folder

        folder = self.work / "hostile"
        build_edge_case_folder(folder)
        codes = {}
        for name, argv in {"data check": ["data", "check", str(folder)],
                           "score": ["score", str(folder), "--task", "dehaze", "--out", str(self.work / "h.csv")],
                           "restore": ["restore", str(folder), "--checkpoint",
                                       str(self.work / "main" / "stage3" / "final.ckpt"), "--out",
                                       str(self.work / "restored")]}.items():
            proc = self.run([*CLI, *argv])
            codes[name] = (proc.returncode, "Traceback" in proc.stderr)
        got = "; ".join(f"{n}: exit {c}{' (traceback)' if t else ''}" for n, (c, t) in codes.items())
        return got, all(c == 0 and not t for c, t in codes.values())


PROBES: list[tuple[str, str, Callable[[Probes], tuple[str, bool]]]] = [
    ("hostile folder (bomb, 1x1, strip, text, folder, link): data check, score, restore",
     "exit 0 each, bad files reported, no traceback", Probes.hostile_corpus),
    ("1 crafted IQA weight file: score --preset paper --weights-dir (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1)",
     "exit 2, one line 'refused', no code ran", Probes.iqa_weight_file),
    ("2 planted stage2/checkpoints/last.ckpt (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1)",
     "exit 2, one line 'refused', no code ran", Probes.planted_last_checkpoint),
    ("3 --from-stage stage3 --stage3.model.w_pref=0.5 --stage3.model.lr=0.001",
     "stage 3 trained from step 0 with the new settings", Probes.from_stage_with_new_settings),
    ("3 rerun of an interrupted stage 3 with other settings, no --from-stage",
     "exit 2, one line naming --from-stage", Probes.resume_with_other_settings),
    ("4 paired evaluate with an 8 px image and a 20000x8 strip",
     "exit 0, per_image.csv, SSIM NaN with a reason", Probes.paired_evaluate_small_images),
    ("5 mlflow.db folder read-only in the middle of stage 3, then a rerun",
     "<= 4 tracking lines; rerun: every step once, FINISHED", Probes.store_read_only),
    ("5 artifact store read-only in the middle of stage 3, then a rerun",
     "eval done, one line at register; rerun FINISHED", Probes.artifact_store_read_only),
    ("6 a second pipeline in the same output folder; then the first is killed",
     "exit 2 at once, one line naming the pid; stale lock taken over", Probes.two_pipelines_one_folder),
    ("9 --stage2.data.batch_size=100000", "clamped to the set's size, said", Probes.huge_batch_size),
    ("9 MLmodel with an absolute or ../ data path", "refused, one line", Probes.escaping_mlmodel),
    ("9 evaluate --metrics auto without network", "no download tried, one check per host",
     Probes.auto_metrics_offline),
    ("9 --stage3.trainer.accelerator=gpu without a GPU", "exit 2, one line, nothing trained",
     Probes.gpu_that_is_not_there),
    ("9 unknown task; score --max-pixels lots", "exit 2, one line each", Probes.wrong_invocations),
    ("10 study: bank folders of the modes of one seed", "one folder per mode", Probes.study_bank_folders),
    ("10 resumed run, bank folder shared with another run", "the other's files quarantined, none deleted",
     Probes.bank_quarantine),
    ("11 browser test without /usr/bin/chromium", "skipped with its reason; ./qt test installs it",
     Probes.browser_test_without_chromium),
]


def run_probes(work: Path) -> bool:
    """Run every probe (in order: later ones reuse the first pipeline's checkpoint); print the
    table; returns whether all passed."""
    from qualiteacher.data.demo import build_demo

    work.mkdir(parents=True, exist_ok=True)
    probes = Probes(work)
    build_demo(probes.demo, seed=0, size=48, n_labeled=8, n_unlabeled=6, n_test=3, n_clean=8, n_val=3, progress=False)
    order = sorted(PROBES, key=lambda p: not p[0].startswith("3 --from-stage"))  # builds work/main first
    results = {}
    for name, expected, probe in order:
        start = time.perf_counter()
        try:
            got, ok = probe(probes)
        except Exception as err:  # noqa: BLE001  a probe that breaks is a failed row, not a crash
            got, ok = f"probe failed: {type(err).__name__}: {str(err)[:150]}", False
        results[name] = (expected, f"{got} [{time.perf_counter() - start:.0f} s]", ok)
        print(f"[probe] {'pass' if ok else 'FAIL'} · {name}", flush=True)
    print("\n| probe | expected | got | pass |\n|---|---|---|---|")
    for name, _, _ in PROBES:
        expected, got, ok = results[name]
        print(f"| {name} | {expected} | {got.replace('|', '/')} | {'yes' if ok else '**no**'} |")
    return all(ok for _, _, ok in results.values())
