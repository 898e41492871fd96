"""The package's structure, checked: one import name, layers without cycles, no private imports.

The layers (ARCHITECTURE.md), lowest first; a module may import its own layer and the ones below:

0. core services: errors, files, IR helpers, the pass base, sessions, metrics, the weight view,
   calibration and collection, verification, analysis, benchmarking, progress;
1. the passes (``onnxcc.passes``) and the sample builders (``onnxcc.models``);
2. the registry and the pipeline;
3. the Python API;
4. the CLI and the reports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"onnxcc": "onnxcc", "compiler": "onnxcc.compiler", "passes": "onnxcc.passes", "models": "onnxcc.models"}
CORE = {"errors", "files", "ir_utils", "passbase", "sessions", "metrics", "weights", "calibration", "verify",
        "analysis", "bench", "speed", "progress"}
UPPER = {"registry": 2, "pipeline": 2, "api": 3, "search": 3, "cli": 4, "report_html": 4}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in FOLDERS.items():
        for p in sorted((ROOT / folder).rglob("*.py")):
            rel = p.relative_to(ROOT / folder).with_suffix("").parts
            parts = [package, *rel]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def layer(module: str) -> int:
    if module in ("onnxcc", "onnxcc.compiler"):
        return 5  # the facade and the empty package: above everything, imported by nobody
    if module.startswith(("onnxcc.passes", "onnxcc.models")):
        return 1
    name = module.removeprefix("onnxcc.compiler.")
    if name in CORE:
        return 0
    if name in UPPER:
        return UPPER[name]
    raise AssertionError(f"{module} has no layer: add it to CORE or UPPER in this test and to ARCHITECTURE.md")


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only: no runtime dependency)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every onnxcc import, top-level or inside a function
    (``if TYPE_CHECKING:`` imports, for annotations only, excepted)."""
    out = []
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "onnxcc":
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "onnxcc")
    return out


def _target(module: str, name: str | None) -> str:
    """The module an import really loads: ``from onnxcc.compiler import verify`` loads onnxcc.compiler.verify."""
    if name and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    return module


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, p in MODULES.items():
        for module, names, _ in _imports(p):
            for t in {_target(module, n) for n in names} or {module}:
                if t != m and t in MODULES:
                    graph[m].add(t)
    return graph


def test_every_package_folder_is_installed():
    """pyproject lists each package explicitly (package-dir mapping); a new subpackage must be added."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    on_disk = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert on_disk == listed
    assert {k.split(".")[0] for k in listed} == {"onnxcc"}
    assert conf["package-dir"] == {"onnxcc": "onnxcc", "onnxcc.compiler": "compiler", "onnxcc.passes": "passes", "onnxcc.models": "models"}


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = []
    for m, p in MODULES.items():
        for module, names, line in _imports(p):
            for t in {_target(module, n) for n in names} or {module}:
                if t in MODULES and t != m and layer(t) > layer(m):
                    bad.append(f"{p.relative_to(ROOT)}:{line}: {m} (layer {layer(m)}) imports {t} (layer {layer(t)})")
    assert bad == []


@pytest.mark.parametrize("folder", ["compiler", "passes", "models", "onnxcc", "tests", "benchmarks"])
def test_no_private_name_imported_from_another_module(folder):
    """Neither ``from m import _x`` nor ``m._x`` on an onnxcc module (tests and benchmarks included)."""
    bad = []
    for p in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(p.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "onnxcc":
                for a in node.names:
                    if a.name.startswith("_"):
                        bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: from {node.module} import {a.name}")
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "onnxcc" and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert bad == []


def test_low_level_modules_do_not_import_onnxruntime_or_passes():
    core = sorted(m for m in MODULES if m.startswith("onnxcc.compiler.") and layer(m) == 0)
    code = ("import sys\n" + "".join(f"import {m}\n" for m in core)
            + "import onnxcc\n"
            + "print(sorted(m for m in sys.modules if m == 'onnxruntime' or m.startswith('onnxcc.passes')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "[]"


def test_optional_extras_are_imported_only_where_they_are_used():
    """optuna and ray only in compiler/search.py (inside its functions), torch only in the training
    backend (passes/training: the bridge, its op table and the loop import it; the distill pass only
    when it runs); importing every other module and running the CLI's help loads none of them."""
    torch_users = {"onnxcc.passes.training.bridge", "onnxcc.passes.training.ops", "onnxcc.passes.training.trainer",
                   "onnxcc.passes.training.distill"}
    allowed = {"optuna": {"onnxcc.compiler.search"}, "ray": {"onnxcc.compiler.search"}, "torch": torch_users}
    bad = []
    for m, p in MODULES.items():
        for module, _names, line in _imports(p):
            top = module.split(".")[0]
            if top in allowed and m not in allowed[top]:
                bad.append(f"{p.relative_to(ROOT)}:{line} imports {module}")
    assert bad == []
    code = ("import sys\n" + "".join(f"import {m}\n" for m in sorted(MODULES)
                                    if not m.startswith("onnxcc.models.make") and m not in torch_users - {"onnxcc.passes.training.distill"})
            + "from onnxcc.compiler.registry import get_pass\nget_pass('distill')\n"
            + "from onnxcc.compiler.cli import main\n"
            + "try:\n    main(['search', '--help'])\nexcept SystemExit:\n    pass\n"
            + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('optuna', 'ray', 'torch')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_public_api_names_resolve():
    import onnxcc

    for name in onnxcc.__all__:
        assert getattr(onnxcc, name) is not None, name
    with pytest.raises(AttributeError):
        onnxcc.no_such_name  # noqa: B018


def test_registry_lists_every_shipped_pass_and_nothing_registers_on_import():
    from onnxcc.compiler.registry import registered_passes
    from onnxcc.passes import PASSES

    assert len(registered_passes()) == len(PASSES)
    assert all(cls.__module__ == entry.partition(":")[0] for cls, entry in zip(
        sorted(registered_passes().values(), key=lambda c: c.__module__ + c.__name__),
        sorted(PASSES, key=lambda e: e.replace(":", "")),
    ))
