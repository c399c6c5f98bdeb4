"""Import boundaries, layer by layer: what each module may import (read from its source, every
import statement, also those inside functions), and what importing it really loads."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distbp"
HEAVY = ("ray", "pyarrow", "click")
# Which of ray, pyarrow and click each layer may import; every other module imports none.
ALLOWED = {
    "cli": {"click", "ray", "pyarrow"},  # ray: only through the library it calls
    "actors": {"ray"}, "engine": {"ray"}, "recovery": {"ray"}, "trainer": {"ray"}, "cluster": {"ray"},
    "workers": {"ray", "pyarrow"}, "server": {"ray"},
    "bench": {"ray", "pyarrow"},
    "data": {"pyarrow"}, "datasets": {"pyarrow"}, "rundir": {"pyarrow"}, "outputs": {"pyarrow"},
    "api": {"pyarrow"}, "checks": {"pyarrow"}, "raydata": {"ray", "pyarrow"}, "sklearn": {"pyarrow"},
}
RUNTIME = {  # what a fresh interpreter must not have loaded after importing the module
    "distbp.nn": HEAVY, "distbp.activations": HEAVY, "distbp.losses": HEAVY, "distbp.optim": HEAVY,
    "distbp.gradcheck": HEAVY, "distbp.schedule": HEAVY, "distbp.messages": HEAVY, "distbp.job": HEAVY,
    "distbp.sampling": HEAVY, "distbp.stopping": HEAVY,
    "distbp.workers": ("ray", "click"), "distbp.server": ("ray", "click"), "distbp.data": ("ray", "click"),
    "distbp.trainer": ("click",), "distbp.engine": ("ray", "pyarrow", "click"),
}


def imported_packages(path):
    """Top-level names of every package a module's source imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.stem)
def test_each_module_imports_only_what_its_layer_may(path):
    heavy = imported_packages(path) & set(HEAVY)
    assert heavy <= ALLOWED.get(path.stem, set()), f"{path.name} imports {sorted(heavy - ALLOWED.get(path.stem, set()))}"


def test_the_parameter_actor_does_not_import_the_worker():
    source = (PACKAGE / "server.py").read_text()
    assert "workers" not in {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.module}


@pytest.mark.parametrize("module", sorted(RUNTIME))
def test_importing_a_module_loads_none_of_what_it_must_not(module):
    code = f"import sys, {module}; print(' '.join(m for m in {RUNTIME[module]!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
