"""Import boundaries, folder by folder: the layers of `ls distbp/` import one way, top to bottom,
each imports only the heavy packages its folder may (read from its source, every import
statement, also those inside functions), nothing dodges the check, and importing a module
really loads no more than that.

    distbp/*.py        front doors: cli, api, sklearn, trainer, and the bench/ package
    distbp/run/        the run folder: outputs, checkpoints, the model, plot, progress
    distbp/runtime/    the Ray side: actors, workers, parameter actors, engines, links
    distbp/data/       the job file and the rows: schema, tables, row math, data sets
    distbp/backprop/   the delta equations: numpy and the standard library only

errors, text and faults (top level) import nothing of distbp's: any layer may use them.

Imports inside functions are for two things only. `import ray` waits until Ray's loopback
mode is chosen (runtime.cluster: Ray reads it when first imported, and it depends on the
job's address), so no module loads ray at import. And the front doors load distbp's heavier
layers when a command needs them, so that `distbp --help` and `import distbp` stay light.
Optional extras (matplotlib, onnx, tensorboardX, tqdm, pandas) load where they are used."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distbp"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
ORDER = ["backprop", "data", "runtime", "run", "top"]  # a layer imports only its own and those before it
LEAVES = {"distbp.errors", "distbp.text", "distbp.faults"}
HEAVY = ("ray", "pyarrow", "click")
MAY = {  # the heavy packages each folder may import
    "top": {"ray", "pyarrow"}, "run": {"pyarrow"}, "runtime": {"ray", "pyarrow"},
    "data": {"pyarrow"}, "backprop": set(),
}
EXCEPTIONS = {"distbp.cli": {"click"}, "distbp.data.raydata": {"ray"}}  # click in cli.py alone; the Ray Data source
RUNTIME = {  # what a fresh interpreter must not have loaded after importing the module
    "distbp.backprop.nn": HEAVY, "distbp.backprop.gradcheck": HEAVY, "distbp.backprop.schedule": HEAVY,
    "distbp.data.job": HEAVY, "distbp.data.sampling": HEAVY, "distbp.data.rowmath": HEAVY,
    "distbp.data.tables": ("ray", "click"), "distbp.data.checks": ("ray", "click"),
    "distbp.runtime.messages": HEAVY, "distbp.run.stopping": HEAVY,
    "distbp.runtime.workers": ("ray", "click"), "distbp.runtime.server": ("ray", "click"),
    "distbp.trainer": ("click",), "distbp.runtime.engine": ("ray", "pyarrow", "click"),
    "distbp.runtime.direct": ("ray", "pyarrow", "click"), "distbp.runtime.actors": ("ray", "click"),
    "distbp.runtime.recovery": ("ray", "click"), "distbp.runtime.cluster": ("ray", "click"),
    "distbp.run.outputs": ("ray", "click"), "distbp.run.plot": ("ray", "click", "matplotlib"), "distbp.cli": ("ray",),
    "distbp": HEAVY,
}


def dotted(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module):
    """A module's folder: one of ORDER's layers, or "top" (the front doors, the bench/ package among them)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else "top"


def imports(path):
    """(top-level package names, distbp modules) that a module's source imports."""
    packages, ours = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                packages.add(a.name.split(".")[0])
                if a.name.startswith("distbp."):
                    ours.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}:{node.lineno}: a relative import (write distbp.<layer>.<module>)"
            packages.add(node.module.split(".")[0])
            if node.module.startswith("distbp"):
                ours |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in KNOWN else node.module for a in node.names}
    return packages, ours


KNOWN = {dotted(p) for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=dotted)
def test_each_module_imports_only_what_its_folder_may(path):
    module = dotted(path)
    packages, _ = imports(path)
    heavy = packages & set(HEAVY)
    allowed = MAY[layer(module)] | EXCEPTIONS.get(module, set())
    assert heavy <= allowed, f"{module} imports {sorted(heavy - allowed)}"
    if layer(module) == "backprop":
        assert packages <= {"numpy", "distbp"} | set(sys.stdlib_module_names), f"{module} imports {sorted(packages - {'numpy', 'distbp'} - set(sys.stdlib_module_names))}"


@pytest.mark.parametrize("path", MODULES, ids=dotted)
def test_layers_import_one_way_top_to_bottom(path):
    module = dotted(path)
    _, ours = imports(path)
    mine = ORDER.index(layer(module))
    for target in ours - LEAVES - {"distbp"}:
        assert ORDER.index(layer(target)) <= mine, f"{module} ({layer(module)}) imports {target} ({layer(target)}), a layer above it"
    if module in LEAVES:
        assert not ours, f"{module} is a leaf, yet imports {sorted(ours)}"


@pytest.mark.parametrize("path", MODULES, ids=dotted)
def test_no_module_dodges_the_import_check(path):
    source = path.read_text()
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "__import__"]
    assert not calls and "importlib" not in source, f"{dotted(path)} imports by __import__ or importlib"


def test_every_folder_is_a_layer():
    """Each folder is a layer, but bench/: a front door in parts (harness, model, report)."""
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(ORDER) - {"top"} | {"bench"}


def _in_functions(tree):
    """The import statements inside functions (not under `if TYPE_CHECKING:`)."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from (n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))


@pytest.mark.parametrize("path", MODULES, ids=dotted)
def test_only_front_doors_import_distbp_inside_functions(path):
    module = dotted(path)
    if layer(module) == "top":
        return
    late = [n for n in _in_functions(ast.parse(path.read_text()))
            if any((a.name if isinstance(n, ast.Import) else n.module).startswith("distbp") for a in n.names)]
    assert not late, f"{module}:{late[0].lineno}: imports distbp inside a function (import it at the top)"


def test_the_parameter_actor_does_not_import_the_worker():
    _, ours = imports(PACKAGE / "runtime" / "server.py")
    assert "distbp.runtime.workers" not in ours


@pytest.mark.parametrize("module", sorted(RUNTIME))
def test_importing_a_module_loads_none_of_what_it_must_not(module):
    code = f"import sys, {module}; print(' '.join(m for m in {RUNTIME[module]!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
