"""The layout of docs/architecture.md, checked against the code: which package may import
which, no process-group lookups or collectives in the math and the method, no process-wide
switches, short functions, typed config parameters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sleeptrain"

# package -> the sleeptrain packages its modules may import (docs/architecture.md). The comm
# layer (parallel.tensors, parallel.seqpar, parallel.context, parallel.state) sits below the
# model: it takes process groups as arguments; launchers and engines above it import the model.
ALLOWED = {
    "config": {"config", "data.tasks"},  # task options are validated by the task's schema
    "data": {"config", "data"},
    "parallel": {"config", "parallel"},
    "model": {"config", "model", "parallel.tensors", "parallel.seqpar", "parallel.context"},
    "sleep": {"config", "model", "sleep"},
    "infer": {"config", "model", "sleep", "infer"},
    "plan": {"config", "model", "sleep", "data", "plan", "parallel"},
    "eval": {"config", "data", "model", "sleep", "infer", "parallel", "eval"},
    "train": {"config", "data", "model", "sleep", "parallel", "eval", "plan", "train"},
    "convert": {"config", "model", "sleep", "infer", "parallel", "train", "convert", "api"},
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG)
        if rel.parts[0] == "convert" and "remote" in rel.parts:
            continue  # the exported model's self-contained code: imports nothing of ours
        out.append((".".join(rel.with_suffix("").parts), p))
    return out


def _imports(path: Path) -> list[str]:
    """Dotted names a module imports (``from a.b import c`` gives ``a.b.c``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def _allowed(target: str, allowed: set[str]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


def test_packages_import_only_downward():
    bad = []
    for mod, path in _modules():
        pkg = mod.split(".")[0]
        if pkg not in ALLOWED:
            continue
        for name in _imports(path):
            if not name.startswith("sleeptrain."):
                continue
            target = name.removeprefix("sleeptrain.")
            top = target.split(".")[0]
            if top in ALLOWED and not _allowed(target, ALLOWED[pkg]):
                bad.append(f"{mod} imports {name}")
            elif top in ("api", "cli", "launch") and not _allowed(target, ALLOWED[pkg]):
                bad.append(f"{mod} imports {name} (an entry point)")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("pkg", ["model", "sleep"])
def test_math_and_method_never_touch_process_groups(pkg):
    # collectives and group lookups live in sleeptrain.parallel; the model gets its groups
    # as arguments
    banned = ("torch.distributed", "megatron.core.parallel_state")
    bad = [f"{mod}: {name}" for mod, path in _modules() if mod.startswith(pkg + ".")
           for name in _imports(path) if name.startswith(banned)]
    text = [f"{mod}: mpu." for mod, path in _modules()
            if mod.startswith(pkg + ".") and "mpu." in path.read_text()]
    assert not bad and not text, bad + text


# module-level mutable objects allowed, with why: caches that change no result
CACHES = {"model.kernels.fused": {"_COMPILED"}}


def test_no_process_wide_mutable_switches():
    bad = []
    for mod, path in _modules():
        if not mod.startswith(("model.", "sleep.", "train.", "infer.")):
            continue
        for node in ast.parse(path.read_text()).body:
            targets = []
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            for t in targets:
                name = getattr(t, "id", None)
                if (name is None or name.isupper() or name == "__all__"
                        or name in CACHES.get(mod, set())):
                    continue
                if isinstance(value, (ast.Dict, ast.List, ast.Set)) or (
                        isinstance(value, ast.Call) and getattr(value.func, "id", "") in (
                            "dict", "list", "set", "OrderedDict")):
                    bad.append(f"{mod}.{name}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Global):
                bad.append(f"{mod}: global {node.names}")
    assert not bad, bad


def test_functions_are_short():
    long = []
    for mod, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{mod}.{node.name}: {n} lines")
    assert not long, long


def test_public_functions_type_their_config():
    bad = []
    for mod, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name.startswith("_"):
                continue
            for a in node.args.args + node.args.kwonlyargs:
                if a.annotation is not None and ast.unparse(a.annotation) == "Any" and (
                        a.arg == "cfg" or a.arg.endswith("_cfg")):
                    bad.append(f"{mod}.{node.name}({a.arg}: Any)")
    assert not bad, bad


def test_architecture_doc_names_every_package():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for pkg in ALLOWED:
        assert f"`{pkg}/`" in doc, pkg
