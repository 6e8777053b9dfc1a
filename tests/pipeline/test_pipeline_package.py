"""The pipeline package: no import cycle, and a typed configuration that fails before anything trains."""
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qualiteacher.pipeline.config import ConfigError, DemoSettings, EvalSettings, PipelineConfig

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "qualiteacher"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _pipeline_modules() -> list[str]:
    return sorted(m for m in _modules() if m == "qualiteacher.pipeline" or m.startswith("qualiteacher.pipeline."))


def _top_level(body: list[ast.stmt]):
    """The statements a module runs on import: its body, into ``if`` / ``try`` / ``with`` blocks,
    not into functions, classes or ``if TYPE_CHECKING:``."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _top_level(node.orelse if "TYPE_CHECKING" in ast.unparse(node.test) else node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_level(node.body + [s for h in node.handlers for s in h.body] + node.orelse + node.finalbody)
        elif isinstance(node, ast.With):
            yield from _top_level(node.body)


def _imports(tree: ast.Module, module: str, is_package: bool, everywhere: bool) -> set[str]:
    """Modules of ``qualiteacher`` that ``module`` imports: on import, or ``everywhere`` (function
    bodies and ``TYPE_CHECKING`` blocks too, so a lazy import cannot hide a cycle)."""
    known = _modules()
    found: set[str] = set()
    for node in ast.walk(tree) if everywhere else _top_level(tree.body):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    out: set[str] = set()
    for name in found:
        parts = name.split(".")
        # importing a.b.c runs a, a.b and a.b.c
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known)
    out.discard(module)
    return out


def import_graph() -> dict[str, set[str]]:
    """Who imports whom among ``qualiteacher``'s modules: every import of a pipeline module, the
    top-level imports of the others; a submodule also depends on its parent package."""
    graph = {}
    for module, path in _modules().items():
        in_pipeline = module in _pipeline_modules()
        tree = ast.parse(path.read_text(), str(path))
        edges = _imports(tree, module, path.name == "__init__.py", everywhere=in_pipeline)
        if "." in module:
            edges.add(module.rsplit(".", 1)[0])
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]], through: set[str]) -> list[list[str]]:
    """The strongly connected groups of ``graph`` (modules importing each other in a circle, at
    any distance) that hold a module of ``through``; Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if (len(group) > 1 or node in graph.get(node, ())) and through & set(group):
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph, {"b"}) == [["a", "b", "c"]]
    assert cycles(graph, {"d"}) == []  # d reaches the circle but is not in it
    assert cycles({"a": {"b"}, "b": set()}, {"a", "b"}) == []
    # a function-level import counts inside the package, so it cannot hide a cycle
    tree = ast.parse("import os\ndef f():\n    from qualiteacher.pipeline.run import run_pipeline\n")
    assert "qualiteacher.pipeline.run" in _imports(tree, "qualiteacher.pipeline.config", False, everywhere=True)
    assert "qualiteacher.pipeline.run" not in _imports(tree, "qualiteacher.pipeline.config", False, everywhere=False)


def test_the_pipeline_package_has_no_import_cycle():
    modules = _pipeline_modules()
    assert {"qualiteacher.pipeline.config", "qualiteacher.pipeline.run", "qualiteacher.pipeline.cli",
            "qualiteacher.pipeline.stages.train"} <= set(modules)
    graph = import_graph()
    assert cycles(graph, set(modules)) == []
    assert graph["qualiteacher.pipeline"] == {"qualiteacher"}  # the package file imports none of its modules
    old = {"qualiteacher.pipeline_config", "qualiteacher.pipeline_stages", "qualiteacher.pipeline_eval"}
    assert not old & set(_modules()), "the old flat modules are gone"


def test_every_pipeline_module_imports_first_in_a_fresh_interpreter():
    # one interpreter; before each module every qualiteacher module is dropped from sys.modules,
    # so each is the first of the package to load (torch and Lightning stay loaded: they are slow)
    script = (
        "import importlib, sys\n"
        f"for name in {_pipeline_modules()!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'qualiteacher' or m.startswith('qualiteacher.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "    print('ok', name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok ") == len(_pipeline_modules())


# ------------------------------------------------------------------------------ typed configuration
def test_defaults_are_typed_and_the_config_is_frozen():
    cfg = PipelineConfig.from_dict({"task": "dehaze", "preset": "demo", "stage3": {"model": {"lr": 1e-4}}})
    assert cfg.checkpoint_every == 50 and cfg.demo == DemoSettings() and cfg.eval == EvalSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.checkpoint_every = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.stage3["model"]["lr"] = 1.0  # type: ignore[index]
    section = cfg.section("stage3")
    section["model"]["lr"] = 1.0  # a copy
    assert cfg.stage3["model"]["lr"] == 1e-4
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg
    assert PipelineConfig.from_dict({**cfg.to_dict(), "eval": {"w": 1, "grid_w": [0, 1]}}).eval.grid_w == (0.0, 1.0)


def test_pipeline_defaults_live_in_one_place():
    # the typed PipelineConfig holds the pipeline-level defaults; the YAML files hold stage recipes
    # and a preset's or task's own choices, never a copy of a default
    base = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    assert set(base) <= {"stage1", "stage2", "fidelity", "stage3"}, sorted(base)
    cfg = PipelineConfig(task="dehaze", preset="demo")
    assert cfg.student == "iqpir" and cfg.out_dir == "outputs/{task}" and cfg.eval.grid_levels == (0, 3, 5, 7)


@pytest.mark.parametrize("override, key", [
    ("--bogus_key=1", "bogus_key"),
    ("--checkpoint_every=often", "checkpoint_every"),
    ("--progress=[1]", "progress"),
    ("--eval.levels=high", "eval.levels"),
    ("--eval.levelz=[1]", "eval.levelz"),
    ("--demo=3", "demo"),
    ("--student=resnet", "student"),
    ("--stage3.modle.lr=1", "stage3.modle"),
])
def test_a_bad_top_level_key_or_value_fails_before_anything_trains(override, key, demo_root, tmp_path,
                                                                   monkeypatch, capsys):
    import qualiteacher.pipeline.cli as pipeline_cli
    import qualiteacher.pipeline.run as pipeline_run
    from qualiteacher.cli import main

    started: list[object] = []
    monkeypatch.setattr(pipeline_cli, "run_pipeline", lambda *a, **k: started.append(a))
    monkeypatch.setattr(pipeline_run, "run_stage", lambda *a, **k: started.append(a))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code = main(["pipeline", "dehaze", "--preset", "tiny", f"--data_root={demo_root}", f"--out_dir={out}", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("configuration error: ") and key in err[0]
    assert started == [] and not out.exists() and not (tmp_path / "mlflow.db").exists()


def test_a_bad_key_in_a_config_file_or_a_callers_dict_is_a_config_error(tmp_path, capsys):
    from qualiteacher.pipeline.cli import run_pipeline_cli

    extra = tmp_path / "extra.yaml"
    extra.write_text("checkpoint_evry: 10\n")
    assert run_pipeline_cli("derain", ["--preset", "tiny", "--config", str(extra), f"--out_dir={tmp_path / 'o'}"]) == 2
    assert "checkpoint_evry" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="'eval.max_images' must be int or null"):
        PipelineConfig.from_dict({"task": "dehaze", "preset": "tiny", "eval": {"max_images": "all"}})


def test_eval_split_selects_the_measured_folder() -> None:
    from qualiteacher.pipeline.config import EvalSettings, PipelineConfig

    assert EvalSettings().split == "test"
    cfg = PipelineConfig.from_dict({"task": "dehaze", "preset": "demo", "eval": {"split": "val"}})
    assert cfg.eval.split == "val" and cfg.task_data / cfg.eval.split == cfg.task_data / "val"


def test_a_missing_eval_split_folder_fails_before_training(tmp_path) -> None:
    import pytest

    from qualiteacher.pipeline.config import ConfigError
    from qualiteacher.pipeline.resolve import resolve_config
    from qualiteacher.pipeline.sections import check_data_folders, plan_run

    for split in ("labeled", "unlabeled", "test"):
        (tmp_path / "dehaze" / split).mkdir(parents=True)
    cfg = resolve_config("dehaze", "demo", overrides=[f"--data_root={tmp_path}", "--eval.split=val",
                                                      "--stage3.data.val_root=null"])
    with pytest.raises(ConfigError, match="eval.split: folder not found"):
        check_data_folders(plan_run(cfg, ["stage3", "eval"], hardware=False), ["stage3", "eval"])
    check_data_folders(plan_run(cfg, ["stage3"], hardware=False), ["stage3"])  # no eval stage: nothing to measure


def test_demo_guard_probes_the_val_split_and_a_missing_one_names_the_way_out(tmp_path) -> None:
    import pytest

    from qualiteacher.pipeline.config import ConfigError
    from qualiteacher.pipeline.resolve import resolve_config
    from qualiteacher.pipeline.sections import check_data_folders, plan_run

    cfg = resolve_config("derain", "demo", overrides=[f"--data_root={tmp_path}"])
    plan = plan_run(cfg, ["stage3", "eval"], hardware=False)
    assert plan.stage("stage3").section["data"]["val_root"] == f"{tmp_path}/derain/val"
    for split in ("labeled", "unlabeled", "test"):
        (tmp_path / "derain" / split).mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"stage3.data.val_root: folder not found: .*val_root=null"):
        check_data_folders(plan, ["stage3", "eval"])
    off = resolve_config("derain", "demo", overrides=[f"--data_root={tmp_path}", "--stage3.data.val_root=null"])
    check_data_folders(plan_run(off, ["stage3", "eval"], hardware=False), ["stage3", "eval"])  # the guard falls back to the labeled pairs


def test_a_setting_added_at_its_neutral_value_keeps_older_checkpoints():
    from qualiteacher.pipeline.resolve import resolve_config
    from qualiteacher.pipeline.sections import ADDED_NEUTRAL, plan_stage, stage_fingerprint

    def fingerprint(*overrides):
        return stage_fingerprint(plan_stage(resolve_config("derain", "demo", overrides=list(overrides)), "stage3"))

    default, neutral = fingerprint(), fingerprint("--stage3.model.strong_aug_target=false")
    on = fingerprint("--stage3.model.strong_aug_target=true")
    assert "model.strong_aug_target" in ADDED_NEUTRAL
    assert "model.strong_aug_target" not in default.settings and default.digest == neutral.digest
    assert on.settings["model.strong_aug_target"] is True and on.digest != default.digest
    assert default.settings["model.strong_aug_p"] == 0.8  # the other settings are all there


def test_unseen_rows_only_where_asked_and_present(tmp_path, demo_root, fast_ensemble_factory):
    import torch

    from qualiteacher.pipeline.stages.evaluate import unseen_pairs, unseen_rows

    restorers = {"input": lambda x: x, "dim": lambda x: x * 0.5}
    ensemble = fast_ensemble_factory()
    cpu = torch.device("cpu")
    task_data = demo_root / "dehaze"
    rows = unseen_rows(restorers, unseen_pairs(task_data, EvalSettings()), ensemble, cpu)
    assert set(rows["restorer"]) == {"unseen:input", "unseen:dim", "unseen-clean:dim"}
    clean = rows[rows["restorer"] == "unseen-clean:dim"]
    assert len(clean) == 3 and (clean["psnr"] < 20).all()  # halving a clean photo is harm, and shows
    assert unseen_pairs(task_data, EvalSettings(unseen=None)) == [] == unseen_pairs(tmp_path, EvalSettings())
    assert unseen_pairs(task_data, EvalSettings(split="unseen")) == []  # measured as the split itself already
    assert unseen_rows(restorers, [], ensemble, cpu).empty
