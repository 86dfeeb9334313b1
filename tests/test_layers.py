"""Imports point down (DESIGN.md's table): a kt package never imports one above it.

core imports no other kt package; actors, supervisor, local and k8s import only core;
distributed may also import actors; testing imports no other kt package, and nothing
imports it. kubernetes_asyncio is imported only in kt/k8s. Checked on the source with
`ast`, including imports inside functions.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "kt"
ALLOWED = {
    "core": {"core"},
    "actors": {"core", "actors"},
    "supervisor": {"core", "supervisor"},
    "local": {"core", "local"},
    "k8s": {"core", "k8s"},
    "distributed": {"core", "actors", "distributed"},
    "testing": {"testing"},  # the test cluster: a client of the Kubernetes API, not of kt
}


def _kt_imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "kt" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_no_upward_imports() -> None:
    bad = []
    for package, allowed in ALLOWED.items():
        for path in (ROOT / package).rglob("*.py"):
            for target in _kt_imports(path) - allowed:
                bad.append(f"{path.relative_to(ROOT.parent)} imports kt.{target}")
    assert not bad, "\n".join(bad)


def test_kubernetes_asyncio_only_in_k8s() -> None:
    bad = []
    for path in ROOT.rglob("*.py"):
        if path.relative_to(ROOT).parts[0] == "k8s":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            bad += [
                f"{path.relative_to(ROOT.parent)}: {n}" for n in names if n.startswith("kubernetes")
            ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_imports(tmp_path: pathlib.Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from kt.actors import api\nimport kt.core.protocol\n")
    assert _kt_imports(sample) == {"actors", "core"}


def _private_members(package: str) -> set[str]:
    """`_x` names a package's classes define (`self._x = ...`, `def _x`)."""
    names: set[str] = set()
    for path in sorted(pathlib.Path(package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "self" and isinstance(node.ctx, ast.Store):
                    names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_kt_distributed_uses_no_private_member_of_kt_actors() -> None:
    """kt.distributed builds on what kt.actors declares (run_hook, wait_placed, address,
    actor_options, methods), never on its private members."""
    theirs = _private_members("kt/actors") - _private_members("kt/distributed")
    used = []
    for path in sorted(pathlib.Path("kt/distributed").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in theirs:
                if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                    used.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    assert not used, used
