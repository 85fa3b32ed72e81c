"""The package's shape: classes keep their private state to themselves, modules stay small.

A collaborator gets what it needs through its constructor or a public method
(``STYLE.md``: "a class that owns its state"); reading ``other._field`` from another
module is the coupling this test keeps out. Plain ``ast``, no imports of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastvec"
MAX_LINES = 550

# Underscored names that are public API of the standard library, not anyone's state, and
# one of gymnasium's: VectorEnv._add_info is how gymnasium batches infos, borrowed
# (contract.InfoBatcher) so that fastvec's infos batch exactly as SyncVectorEnv's do.
STDLIB = {("os", "_exit"), ("sys", "_getframe"), ("VectorEnv", "_add_info"),
          # Stable-Baselines3 has no public way to hand a loaded model the observations its
          # next rollout starts from: learn() reads these (fastvec/sb3.py load_env_state).
          ("model", "_last_obs"), ("model", "_last_original_obs"),
          ("model", "_last_episode_starts")}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def _module_names(tree: ast.Module) -> set[str]:
    """Names the module itself defines at its top level (classes, functions, assignments);
    imported names are someone else's."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def _owned(value: ast.expr, own: set[str]) -> bool:
    """Whether ``value._x`` is the code's own business: ``self``/``cls``, ``super()``, or a
    name this module defines."""
    if isinstance(value, ast.Name):
        return value.id in ("self", "cls") or value.id in own
    return (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            and value.func.id == "super")


def private_accesses(source: str, name: str) -> list[str]:
    """``name:line: expr._x`` for every read or write of another object's private
    attribute in ``source``."""
    tree = ast.parse(source, filename=name)
    own = _module_names(tree)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        if _owned(node.value, own):
            continue
        if isinstance(node.value, ast.Name) and (node.value.id, node.attr) in STDLIB:
            continue
        found.append((node.lineno, f"{name}:{node.lineno}: {ast.unparse(node)}"))
    return [text for _, text in sorted(found)]


def _cases() -> list:
    return [pytest.param(p, id=str(p.relative_to(PACKAGE.parent))) for p in _modules()]


def test_the_package_has_modules_to_check():
    assert len(_modules()) > 10


@pytest.mark.parametrize("path", _cases())
def test_no_module_reaches_into_another_objects_private_attributes(path):
    found = private_accesses(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert not found, ("private attributes used outside their owner (give the owner a public "
                       "method or pass the value in):\n" + "\n".join(found))


@pytest.mark.parametrize("path", _cases())
def test_no_module_is_over_the_line_budget(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, (f"{path.relative_to(PACKAGE.parent)}: {n} lines > {MAX_LINES}: "
                            "split it by idea")


def test_the_lint_sees_what_it_should():
    probe = ("import os\n"
             "class A:\n"
             "    _cache = None\n"
             "    def f(self, other):\n"
             "        self._x = other._y\n"
             "        A._cache = super()._z\n"
             "        other._w = 1\n"
             "        os._exit(0)\n"
             "        return self.__class__, other.__dict__, os._private\n")
    assert private_accesses(probe, "probe.py") == [
        "probe.py:5: other._y", "probe.py:7: other._w", "probe.py:9: os._private"]
