"""The package's layers (docs/design.md, "Layers"): a module may import from its own layer and the
layers below it, never from a layer above. Every import counts, module-level and inside functions."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qualiteacher"

# lowest first; a subpackage or top-level module of qualiteacher/ -> its layer
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors", "checkpoints", "tasks", "say", "tables", "devices", "downloads"),  # basics: nothing of the package above them
    ("classical", "archs", "losses", "data"),
    ("iqa",),
    ("teacher",),
    ("training",),
    ("tracking",),  # below eval: `qualiteacher evaluate` logs to MLflow; tracking imports only basics
    ("eval",),
    ("registry",),
    ("pipeline", "console"),  # console: the pipeline's stage lines, progress bar and final summary
    ("study",),
    ("app",),
    ("cli",),
)
LAYER_OF: dict[str, int] = {unit: i for i, units in enumerate(LAYERS) for unit in units}

# Known upward imports, each with its reason (module -> imported module). Fix one and take it off;
# a NEW upward import fails the test.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def _unit(module: str) -> str:
    """``qualiteacher.iqa.audit`` -> ``iqa``; ``qualiteacher`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The qualiteacher modules ``path`` imports (module level and inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "qualiteacher":  # from qualiteacher import console
                found.update(f"qualiteacher.{a.name}" for a in node.names)
            else:
                found.add(target)
    return {m for m in found if m == "qualiteacher" or m.startswith("qualiteacher.")}


def upward_imports() -> dict[tuple[str, str], str]:
    """(module, imported module) -> "from layer -> to layer" for every import that goes up."""
    bad: dict[tuple[str, str], str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        src = _unit(module) if path.name != "__init__.py" or "." in module else "__init__"
        for target in _imports(path):
            dst = _unit(target)
            if dst not in LAYER_OF:  # `from qualiteacher import __version__` and the like
                dst = "__init__"
            if LAYER_OF[dst] > LAYER_OF[src]:
                bad[(module, target)] = f"{src} (layer {LAYER_OF[src]}) -> {dst} (layer {LAYER_OF[dst]})"
    return bad


def test_every_unit_of_the_package_has_a_layer() -> None:
    units = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir()
                                                     if p.is_dir() and (p / "__init__.py").is_file()}
    assert units <= set(LAYER_OF), f"give these a layer in LAYERS and docs/design.md: {sorted(units - set(LAYER_OF))}"


def test_no_new_upward_import() -> None:
    new = {k: v for k, v in upward_imports().items() if k not in KNOWN_UPWARD}
    assert not new, "imports from a lower layer to a higher one:\n" + "\n".join(
        f"  {m} imports {t}: {why}" for (m, t), why in sorted(new.items()))


def test_known_exceptions_are_still_needed() -> None:
    gone = set(KNOWN_UPWARD) - set(upward_imports())
    assert not gone, f"fixed: take these off KNOWN_UPWARD: {sorted(gone)}"


@pytest.mark.parametrize("source", [
    "import qualiteacher.cli\n",
    "def f():\n    from qualiteacher.training.restore import restore\n",
    "from qualiteacher import console\n",
])
def test_an_upward_import_is_caught(tmp_path: Path, source: str, monkeypatch) -> None:
    fake = tmp_path / "qualiteacher"
    (fake / "data").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "bad.py").write_text(source)
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert [m for m, _ in upward_imports()] == ["qualiteacher.data.bad"]


# ------------------------------------------------------------------------------ public APIs
# Units above the pipeline that may use it through its public API only (qualiteacher/pipeline/api.py).
PIPELINE_API = "qualiteacher.pipeline.api"
API_USERS = ("study",)


def pipeline_internals_used() -> dict[str, list[str]]:
    """module of an :data:`API_USERS` unit -> the pipeline modules it imports other than the API."""
    bad: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if _unit(module) not in API_USERS:
            continue
        inner = sorted(t for t in _imports(path) if (t == "qualiteacher.pipeline" or t.startswith("qualiteacher.pipeline."))
                       and t != PIPELINE_API)
        if inner:
            bad[module] = inner
    return bad


def test_the_study_uses_the_pipelines_public_api_only() -> None:
    bad = pipeline_internals_used()
    assert not bad, "use qualiteacher.pipeline.api (add the name there if it is public):\n" + "\n".join(
        f"  {m} imports {', '.join(t)}" for m, t in bad.items())


def test_a_pipeline_internal_import_is_caught(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "qualiteacher"
    (fake / "study").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "study" / "__init__.py").write_text("")
    (fake / "study" / "good.py").write_text("from qualiteacher.pipeline.api import run_pipeline\n")
    (fake / "study" / "bad.py").write_text("def f():\n    from qualiteacher.pipeline.sections import parse_stage\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert pipeline_internals_used() == {"qualiteacher.study.bad": ["qualiteacher.pipeline.sections"]}
