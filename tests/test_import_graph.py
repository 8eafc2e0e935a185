"""The import structure of tpr_core: every module imports alone, the config schema reaches no
model code, and no two modules import each other at module level (directly or round about).

The graph is read from the sources (``ast``), so it covers modules whether or not a test
imports them; the modules are collected by walking the package folders.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "tpr_core"


def _modules() -> dict[str, Path]:
    """Dotted name -> source file of every module of the package."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        out[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST, module_level: bool = True) -> list[tuple[ast.AST, bool]]:
    """Every import statement (and ``import_module("...")`` call) with whether it runs when the
    module is imported: not inside a function, not under ``if TYPE_CHECKING``."""
    out = []
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            out.append((child, module_level))
        elif isinstance(child, ast.Call) and getattr(child.func, "attr", getattr(child.func, "id", "")) == "import_module":
            out.append((child, module_level))
        inner = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        out += _imports(child, inner and not _is_type_checking(child))
    return out


def _owner(dotted: str) -> str | None:
    """The package module that ``dotted`` (a module or a name in one) lives in, if any."""
    while dotted:
        if dotted in MODULES:
            return dotted
        dotted = dotted.rpartition(".")[0]
    return None


def _targets(node: ast.AST, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{a.name}" for a in node.names]  # a submodule, or a name in ``base``
    else:
        arg = node.args[0] if node.args else None  # type: ignore[attr-defined]
        names = [arg.value] if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else []
    return [t for t in map(_owner, names) if t and t != module]


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = {
            t for node, at_import in _imports(tree) if at_import or not module_level_only for t in _targets(node, module)
        }
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def _third_party() -> list[str]:
    """Every non-package, non-stdlib module that a package module imports at module level."""
    out = set()
    for path in MODULES.values():
        for node, at_import in _imports(ast.parse(path.read_text())):
            if not at_import or not isinstance(node, (ast.Import, ast.ImportFrom)) or getattr(node, "level", 0):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            out |= {n for n in names if n and n.split(".")[0] not in sys.stdlib_module_names | {PACKAGE}}
    return sorted(out)


# Pre-import the libraries once, then fork one child per module: each child starts with no
# tpr_core module loaded and imports only its own (the cost of torch is paid once).
_ISOLATED = """
import importlib, os, sys, traceback
for lib in {libs!r}:
    importlib.import_module(lib)
assert not [m for m in sys.modules if m == {pkg!r} or m.startswith({pkg!r} + ".")]
failed = []
for name in {mods!r}:
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            print(f"--- import {{name}} alone:", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_every_module_imports_alone() -> None:
    code = _ISOLATED.format(libs=_third_party(), pkg=PACKAGE, mods=sorted(MODULES))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-6000:]}"
    assert "FAILED []" in r.stdout


def test_config_reaches_no_model_code() -> None:
    # Function-level imports count too: the schema must not need the method table even lazily.
    reached = _reachable(_graph(module_level_only=False), f"{PACKAGE}.config")
    assert not {m for m in reached if m.startswith(f"{PACKAGE}.models")}, sorted(reached)


def test_module_level_imports_have_no_cycle() -> None:
    assert _cycle(_graph(module_level_only=True)) is None, _cycle(_graph(module_level_only=True))


def test_the_graph_sees_what_it_checks() -> None:
    # The checks above would pass on an empty graph; these edges exist in the sources.
    full, top = _graph(module_level_only=False), _graph(module_level_only=True)
    assert f"{PACKAGE}.models.registry" in top[f"{PACKAGE}.models.methods.irra"]
    assert f"{PACKAGE}.models.methods" in top[f"{PACKAGE}.models"]
    assert f"{PACKAGE}.models" in full[f"{PACKAGE}.export"] - top[f"{PACKAGE}.export"]  # a function-level import
    assert f"{PACKAGE}.models.registry" in _reachable(top, f"{PACKAGE}.experiment")
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
