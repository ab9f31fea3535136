"""The package's rooms and the one-way arrows between them, read from the source with `ast`.

ARCHITECTURE.md's table of rooms says which modules live in each room and which rooms each
may import; the imports found in the source must be exactly those (so the document cannot go
stale). No import cycle, counting function-level (lazy) imports too, with no exceptions: data
never imports views (views register their renderers). Outside magics/ and views/ nothing
imports IPython, ipywidgets or traitlets; `formatting` and `_torch_compat` are leaves. No
function is longer than 60 lines.

Also: a built wheel contains every subpackage.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path


try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "amp_magics"
SOURCE = ROOT / PACKAGE

GUI_PACKAGES = ("IPython", "ipywidgets", "traitlets")
ADAPTERS = ("amp_magics.magics", "amp_magics.views")  # may import the GUI packages
ENTRY_POINT = PACKAGE  # amp_magics/__init__.py: lazily imports magics for load_ipython_extension
LEAVES = ("amp_magics.formatting", "amp_magics._torch_compat")
LOOP = ("amp_magics.training.engine",)


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # absolute: a module of this package, or an outside package's dotted name
    lazy: bool  # inside a function body: runs when called, not when the module is imported
    typing_only: bool  # under `if TYPE_CHECKING:`: never runs
    line: int

    def __str__(self):
        kind = "lazy " if self.lazy else "typing-only " if self.typing_only else ""
        path = (MODULES[self.importer].relative_to(ROOT).as_posix() if self.importer in MODULES
                else self.importer)
        return f"{path}:{self.line}: {kind}import {self.imported}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _internal(name: str) -> str | None:
    """The package's module that importing `name` binds: itself, else its longest parent."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports_of(module: str) -> list[Import]:
    return _imports_in(MODULES[module].read_text(), module, _is_package(module), MODULES)


def _imports_in(source: str, module: str, is_package: bool, modules) -> list[Import]:
    """Every import in `source`, as absolute names; `modules`: the package's module names."""
    tree = ast.parse(source)
    found: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]

    def add(name, node, lazy, typing_only):
        found.append(Import(module, name, lazy, typing_only, node.lineno))

    def visit(node, lazy, typing_only):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy = True
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, lazy, True)
            for child in node.orelse:
                visit(child, lazy, typing_only)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, lazy, typing_only)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[:-(node.level - 1)]
                assert base_parts, f"{module}: relative import beyond the package"
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from . import x` imports the submodule x when there is one
                add(sub if sub in modules else base, node, lazy, typing_only)
        for child in ast.iter_child_nodes(node):
            visit(child, lazy, typing_only)

    visit(tree, False, False)
    return found


IMPORTS = [imp for module in MODULES for imp in _imports_of(module)]


def _in(module: str, *rooms: str) -> bool:
    return any(module == r or module.startswith(r + ".") for r in rooms)


def _graph(include_lazy: bool) -> dict[str, dict[str, Import]]:
    graph: dict[str, dict[str, Import]] = {m: {} for m in MODULES}
    for imp in IMPORTS:
        target = _internal(imp.imported) if imp.imported.startswith(PACKAGE) else None
        if target is None or target == imp.importer or imp.typing_only:
            continue
        if imp.lazy and not (include_lazy and imp.importer != ENTRY_POINT):
            continue
        graph[imp.importer].setdefault(target, imp)
    return graph


def _cycles(graph: dict[str, dict[str, Import]]) -> list[list[Import]]:
    """One concrete cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        start = min(component)
        paths = {start: []}  # breadth-first: the shortest way back to `start`
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w, imp in sorted(graph[v].items()):
                if w not in component:
                    continue
                if w == start:
                    queue = []
                    cycles.append(paths[v] + [imp])
                    break
                if w not in paths:
                    paths[w] = paths[v] + [imp]
                    queue.append(w)
    return cycles


def _report(cycles):
    return "\n\n".join(" -> ".join([c[0].importer] + [i.imported for i in c]) + "\n  "
                       + "\n  ".join(map(str, c)) for c in cycles)


# --- the graph itself is read right -----------------------------------------------------------

def test_the_import_reader_resolves_relative_and_submodule_imports():
    source = """
from typing import TYPE_CHECKING
import torch.nn
from . import alarms, CONSTANT
from .. import precision, __version__
from ..formatting import format_bytes
from .run import Run
if TYPE_CHECKING:
    from ..views.dashboard import Dashboard
class Engine:
    import math
    def show(self):
        from ..views import reporter
        return lambda: __import__("x")
"""
    modules = {"amp_magics", "amp_magics.precision", "amp_magics.training",
               "amp_magics.training.alarms", "amp_magics.training.run", "amp_magics.views",
               "amp_magics.formatting", "amp_magics.views.reporter"}
    found = {(i.imported, i.lazy, i.typing_only)
             for i in _imports_in(source, "amp_magics.training.engine", False, modules)}
    assert found == {
        ("typing", False, False), ("torch.nn", False, False),
        ("amp_magics.training.alarms", False, False),  # `from . import x`: the submodule
        ("amp_magics.training", False, False),  # `from . import CONSTANT`: the package
        ("amp_magics.precision", False, False), ("amp_magics", False, False),
        ("amp_magics.formatting", False, False), ("amp_magics.training.run", False, False),
        ("amp_magics.views.dashboard", False, True),
        ("math", False, False),  # a class body runs at import time
        ("amp_magics.views.reporter", True, False),
    }
    # a package's own `from . import x` is relative to itself
    assert [i.imported for i in _imports_in("from . import run", "amp_magics.training", True,
                                             modules)] == ["amp_magics.training.run"]
    assert len(MODULES) >= 30 and "amp_magics.magics.train" in MODULES
    assert any(i.imported.startswith("IPython") for i in IMPORTS)  # the real package is read


def test_the_cycle_finder_finds_a_planted_cycle():
    a = Import("a", "b", False, False, 1)
    b = Import("b", "c", False, False, 1)
    c = Import("c", "a", False, False, 1)
    d = Import("d", "a", False, False, 1)
    graph = {"a": {"b": a}, "b": {"c": b}, "c": {"a": c}, "d": {"a": d}}
    assert _cycles(graph) == [[a, b, c]]
    assert _cycles({"a": {"b": a}, "b": {}}) == []


# --- the rules ----------------------------------------------------------------------------------

def test_no_import_cycle_at_module_level():
    cycles = _cycles(_graph(include_lazy=False))
    assert not cycles, "module-level import cycles:\n" + _report(cycles)


def test_no_import_cycle_counting_lazy_imports():
    cycles = _cycles(_graph(include_lazy=True))
    assert not cycles, "import cycles through function-level imports:\n" + _report(cycles)


def test_gui_packages_only_in_magics_and_views():
    offending = [str(i) for i in IMPORTS
                 if i.imported.split(".")[0] in GUI_PACKAGES
                 and not _in(i.importer, *ADAPTERS) and i.importer != ENTRY_POINT]
    assert not offending, "IPython/ipywidgets/traitlets outside magics/ and views/:\n" + "\n".join(
        offending)


def test_views_dashboard_is_the_only_widget_user_in_views():
    offending = [str(i) for i in IMPORTS
                 if _in(i.importer, "amp_magics.views")
                 and i.importer != "amp_magics.views.dashboard"
                 and i.imported.split(".")[0] in GUI_PACKAGES]
    allowed_in_dashboard = {"ipywidgets", "IPython.display"}
    offending += [str(i) for i in IMPORTS if i.importer == "amp_magics.views.dashboard"
                  and i.imported.split(".")[0] in GUI_PACKAGES
                  and i.imported not in allowed_in_dashboard]
    assert not offending, "\n".join(offending)


def test_the_leaves_import_nothing_of_the_package():
    offending = [str(i) for i in IMPORTS if i.importer in LEAVES and _internal(i.imported)]
    assert not offending, "\n".join(offending)


def test_views_never_depend_on_the_training_loop():
    """Not even through data modules: whatever views import never reaches the engine."""
    graph = _graph(include_lazy=True)

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in graph[todo.pop()]:
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    offending = [f"{m} reaches {sorted(reaches(m) & set(LOOP))}" for m in MODULES
                 if _in(m, "amp_magics.views") and reaches(m) & set(LOOP)]
    assert not offending, "views/ depending on the loop:\n" + "\n".join(offending)


def test_lower_rooms_never_import_magics():
    offending = [str(i) for i in IMPORTS if _in(_internal(i.imported) or "", "amp_magics.magics")
                 and not _in(i.importer, "amp_magics.magics") and i.importer != ENTRY_POINT]
    assert not offending, "\n".join(offending)


# --- the rooms, as ARCHITECTURE.md declares them -------------------------------------------------

def declared_rooms() -> dict[str, tuple[list[str], set[str]]]:
    """room -> (its modules as written: `training/`, `cli`, `system/host`; the rooms it may
    import), from the table under "## Rooms" in ARCHITECTURE.md."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    table = text.split("## Rooms", 1)[1].split("\n\n", 2)[1]
    rooms = {}
    for row in table.splitlines()[2:]:
        room, modules, imports = [c.strip() for c in row.strip().strip("|").split("|")]
        rooms[room] = (re.findall(r"`([^`]+)`", modules),
                       set() if imports == "-" else {r.strip() for r in imports.split(",")})
    return rooms


def _room_of(module: str, rooms) -> str | None:
    """The room whose most specific pattern holds `module` (`system/host` before `system/`)."""
    best = None
    for room, (patterns, _) in rooms.items():
        for pattern in patterns:
            name = f"{PACKAGE}.{pattern.rstrip('/').replace('/', '.')}" if pattern != "__init__" \
                else PACKAGE
            inside = module == name or (pattern.endswith("/") and module.startswith(name + "."))
            if inside and (best is None or len(name) > best[1]):
                best = (room, len(name))
    return best and best[0]


def test_every_module_is_in_a_declared_room():
    rooms = declared_rooms()
    homeless = [m for m in MODULES if _room_of(m, rooms) is None]
    assert not homeless, f"modules in no room of ARCHITECTURE.md: {homeless}"


def test_the_rooms_import_exactly_what_architecture_md_says():
    """Every arrow between rooms, lazy ones included, is declared, and every declared arrow is
    used. (Importing the package itself, `from .. import __version__`, is no arrow: it is
    loaded before anything else.)"""
    rooms = declared_rooms()
    found: dict[str, set[str]] = {room: set() for room in rooms}
    examples: dict[tuple[str, str], Import] = {}
    for imp in IMPORTS:
        target = _internal(imp.imported) if imp.imported.startswith(PACKAGE) else None
        if target is None or target == ENTRY_POINT or imp.typing_only:
            continue
        a, b = _room_of(imp.importer, rooms), _room_of(target, rooms)
        if a != b:
            found[a].add(b)
            examples.setdefault((a, b), imp)
    extra = [f"{a} -> {b}: {examples[a, b]}" for a in rooms for b in sorted(found[a] - rooms[a][1])]
    unused = [f"{a} -> {b}" for a in rooms for b in sorted(rooms[a][1] - found[a])
              if b != "*"]
    assert not extra, "imports ARCHITECTURE.md does not declare:\n" + "\n".join(extra)
    assert not unused, "ARCHITECTURE.md declares arrows nothing uses:\n" + "\n".join(unused)


def test_the_declared_rooms_form_no_cycle():
    rooms = declared_rooms()
    graph = {a: {b: Import(a, b, False, False, 0) for b in imports if b in rooms}
             for a, (_, imports) in rooms.items()}
    assert not _cycles(graph)


def test_no_function_is_longer_than_60_lines():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} ({lines})")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


# --- packaging ----------------------------------------------------------------------------------

DISTRIBUTION = {"IPython": "ipython", "pynvml": "nvidia-ml-py", "yaml": "pyyaml",
                "sklearn": "scikit-learn"}  # import name -> the distribution that provides it
OPTIONAL = {"psutil"}  # imported in try/except, with a fallback


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[;@ ]", requirement.strip(), maxsplit=1)[0].lower()


def _is_stdlib(top: str) -> bool:
    if hasattr(sys, "stdlib_module_names"):  # Python >= 3.10
        return top in sys.stdlib_module_names or top == "__future__"
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        return False
    return spec.origin in ("built-in", "frozen") or (
        spec.origin.startswith(sysconfig.get_paths()["stdlib"]) and "-packages" not in spec.origin)


def test_every_third_party_import_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {_requirement_name(r) for r in project["dependencies"]}
    extras = {_requirement_name(r) for rs in project.get("optional-dependencies", {}).values()
              for r in rs}
    undeclared = []
    for imp in IMPORTS:
        top = imp.imported.split(".")[0]
        if top == PACKAGE or _is_stdlib(top) or top in OPTIONAL:
            continue
        name = DISTRIBUTION.get(top, top).lower()
        # module-level imports need a dependency; a lazy one may come from an extra
        if name not in required and (not imp.lazy or name not in extras):
            undeclared.append(f"{imp}  (distribution {name!r})")
    assert not undeclared, "imported but not declared in pyproject.toml:\n" + "\n".join(undeclared)


def _source_version() -> str:
    return ast.literal_eval(next(
        n.value for n in ast.parse((SOURCE / "__init__.py").read_text()).body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "__version__"))


def test_version_is_written_once():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    # the JupyterLab extension, source and prebuilt, carries the same version
    for package in ("labextension/package.json", "amp_magics/lab/labextension/package.json"):
        assert json.loads((ROOT / package).read_text())["version"] == _source_version(), package
    assert project["tool"]["hatch"]["version"] == {"path": "amp_magics/__init__.py"}


# --- the wheel ----------------------------------------------------------------------------------

WHEEL_MUST_HOLD = ["amp_magics/training/engine.py", "amp_magics/formatting.py",
                   "amp_magics/magics/train.py", "amp_magics/system/host.py",
                   "amp_magics/diagnostics/memory.py", "amp_magics/tensors.py",
                   "amp_magics/distributed/launcher.py", "amp_magics/tuning/sweep.py",
                   "amp_magics/py.typed"]


def test_wheel_contains_every_subpackage(tmp_path):
    # Built from a copy of the sources, so that nothing a build leaves behind reaches the repository.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("jupyter-config", "labextension"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("node_modules"))
    shutil.copytree(SOURCE, src / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "dist"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in WHEEL_MUST_HOLD if n not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    subpackages = {p.parent.relative_to(ROOT).as_posix() for p in SOURCE.rglob("__init__.py")}
    assert {f"{s}/__init__.py" for s in subpackages} <= names
    # the version comes from amp_magics/__init__.py, and the licence travels with the wheel
    version = _source_version()
    assert wheel.name.startswith(f"amp_magics-{version}-")
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
               for n in names), sorted(names)
    # the JupyterLab half lands where Jupyter looks: the prebuilt extension and the server setting
    data = f"amp_magics-{version}.data/data/"
    assert {data + "share/jupyter/labextensions/amp-magics/package.json",
            data + "share/jupyter/labextensions/amp-magics/install.json",
            data + "etc/jupyter/jupyter_server_config.d/amp_magics.json"} <= names, sorted(names)
    assert any(n.startswith(data + "share/jupyter/labextensions/amp-magics/static/remoteEntry.")
               for n in names)
