"""Data walks one way, and so do imports: zoo < canon < pca < flow < sample < eval, with the shared modules
below every stage and the orchestration (pipeline, conditional runs, CLI, Serve, analyses) on top."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dwf_ray"
BOTTOM = {"accuracy", "archs", "config", "data", "lease", "presets", "resources", "runtime", "safetensors_header",
          "store", "weights"}
STAGES = ["zoo", "canon", "pca", "flow", "sample", "eval"]
TOP = {"pipeline", "conditional", "cli", "serve", "analysis"}


def unit(module: str) -> str:
    """The layer unit of a dotted dwf_ray module: its first component below dwf_ray."""
    return module.split(".")[1] if module.count(".") else module


def dwf_imports(path: Path) -> set[str]:
    """Every dwf_ray module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dwf_ray.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dwf_ray"):
            if node.module == "dwf_ray":
                found |= {f"dwf_ray.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return found


def rank(name: str) -> int:
    if name in BOTTOM:
        return 0
    if name in STAGES:
        return 1 + STAGES.index(name)
    if name in TOP:
        return len(STAGES) + 1
    raise AssertionError(f"dwf_ray/{name} is in no layer: add it to BOTTOM, STAGES or TOP in {__file__}")


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_no_module_imports_a_later_stage(path):
    rel = path.relative_to(PACKAGE)
    own = unit("dwf_ray." + ".".join(rel.with_suffix("").parts))
    if own == "__init__":
        return
    for module in dwf_imports(path):
        target = unit(module)
        if target == own:
            continue
        assert rank(target) <= rank(own), \
            f"dwf_ray/{rel} ({own}) imports {module} ({target}): a later stage or the orchestration"


def test_the_walk_catches_a_backward_import(tmp_path):
    """The check itself: a stage module importing a later stage is found, at the top or inside a function."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from dwf_ray.eval.run import evaluate\n")
    assert dwf_imports(bad) == {"dwf_ray.eval.run"}
    assert rank(unit("dwf_ray.eval.run")) > rank("flow")
