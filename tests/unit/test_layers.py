"""The package's imports follow the data flow: no module imports from a stage later in the flow
(foundation < data < cf < model < train < eval < pipeline < cli / testing), model code imports neither DeepSpeed nor
Ray, and neither the package nor the benchmarks import from tests/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Shared foundation modules (config, task names, pure metric functions) sit below every stage.
LAYERS = {"config": 0, "tasks": 0, "metrics": 0, "netbind": 0, "comm": 0, "data": 1, "cf": 2, "model": 3, "train": 4, "eval": 5,
          "pipeline": 6, "cli": 7, "testing": 7}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, function-local ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _layer(package: str, module: str) -> int | None:
    parts = module.split(".")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts[0] != package or len(parts) == 1:
        return None
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: no layer assigned; add it to LAYERS in {Path(__file__).name}")
    return LAYERS[parts[1]]


def layer_violations(package_dir: Path) -> list[str]:
    """Every import of `package_dir` that points to a later stage, or model code importing deepspeed / ray."""
    package = package_dir.name
    problems = []
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent)
        own = ".".join(rel.with_suffix("").parts)
        mine = _layer(package, own)
        for line, module in _imports(path):
            theirs = _layer(package, module)
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{rel}:{line}: imports {module} (a later stage)")
            if own.startswith(f"{package}.model") and module.split(".")[0] in ("deepspeed", "ray"):
                problems.append(f"{rel}:{line}: model code imports {module}")
            if module.split(".")[0] == "tests":
                problems.append(f"{rel}:{line}: imports {module} from tests/")
    return problems


def test_package_imports_follow_the_flow() -> None:
    assert layer_violations(ROOT / "ckf_dist") == []


def test_benchmarks_and_launchers_do_not_import_tests() -> None:
    bad = [f"{p.relative_to(ROOT)}:{line}: {m}" for folder in ("benchmarks", "launchers", "ckf_dist")
           for p in sorted((ROOT / folder).rglob("*.py")) for line, m in _imports(p) if m.split(".")[0] == "tests"]
    assert bad == []


def test_test_modules_do_not_import_each_other() -> None:
    # Shared helpers live in ckf_dist/testing/, so that no test depends on another test module.
    bad = [f"{p.relative_to(ROOT)}:{line}: {m}" for p in sorted((ROOT / "tests").rglob("*.py"))
           for line, m in _imports(p) if m.split(".")[0] == "tests"]
    assert bad == []


def test_the_check_catches_a_backward_import(tmp_path: Path) -> None:
    pkg = tmp_path / "ckf_dist"
    for sub in ("data", "train", "model"):
        (pkg / sub).mkdir(parents=True)
    (pkg / "data" / "ok.py").write_text("from ckf_dist.config import RunConfig\n")
    (pkg / "data" / "bad.py").write_text("def f():\n    from ckf_dist.train.loop import finetune\n")
    (pkg / "model" / "bad.py").write_text("import deepspeed\nfrom tests.helpers import x\n")
    assert layer_violations(pkg) == [
        "ckf_dist/data/bad.py:2: imports ckf_dist.train.loop (a later stage)",
        "ckf_dist/model/bad.py:1: model code imports deepspeed",
        "ckf_dist/model/bad.py:2: imports tests.helpers from tests/",
    ]
