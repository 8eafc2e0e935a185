"""tpr_core is a pure-PyTorch library: it must never import Ray, DeepSpeed, MLflow or pipelines."""

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = {"ray", "deepspeed", "mlflow", "pipelines"}
ROOT = Path(__file__).resolve().parents[1]


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                roots.add(node.args[0].value.split(".")[0])
    return roots


def test_tpr_core_sources_import_nothing_forbidden():
    offenders = {}
    files = sorted((ROOT / "tpr_core").rglob("*.py"))
    assert files, "no tpr_core sources found"
    for f in files:
        bad = _imported_roots(f) & FORBIDDEN
        if bad:
            offenders[str(f.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"tpr_core imports forbidden packages: {offenders}"


def test_importing_every_tpr_core_module_loads_no_forbidden_package():
    # Catches indirect imports too (a dependency that pulls in ray, say).
    mods = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in sorted((ROOT / "tpr_core").rglob("*.py"))
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"bad = sorted(k for k in sys.modules if k.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"forbidden modules loaded: {r.stdout} {r.stderr[-2000:]}"


def test_the_guard_itself_detects_a_forbidden_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import os\nfrom ray import train\nimport importlib\nimportlib.import_module('mlflow.pyfunc')\n")
    assert _imported_roots(f) & FORBIDDEN == {"ray", "mlflow"}
