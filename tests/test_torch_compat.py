"""Every use of torch's private state is in amp_magics/_torch_compat.py, and each is where the
installed torch keeps it: after a torch upgrade this test names what moved."""
import ast
import re
from pathlib import Path

from amp_magics import _torch_compat

SOURCE = Path(__file__).resolve().parents[1] / "amp_magics"
NAMEDTUPLE_API = {"_fields", "_asdict", "_replace", "_make"}  # public, underscored by design
DISPLAY_PROTOCOL = re.compile(r"_(repr|ipython)_\w+_")  # IPython's rich display methods, public


def test_every_private_name_is_where_the_installed_torch_keeps_it():
    assert _torch_compat.missing() == []


def _private_names_used(tree: ast.AST) -> set[str]:
    """`x._name` reads and writes, and getattr/hasattr/setattr(x, "_name")."""
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) in
              ("getattr", "hasattr", "setattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            used.add(node.args[1].value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                node.value.startswith("torch._"):
            used.add(node.value)
    return {n for n in used if n.startswith("_") and not n.endswith("__") or n.startswith("torch._")}


def _names_defined(tree: ast.AST) -> set[str]:
    """Names the package gives things itself: functions, classes, attributes it assigns."""
    defined = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in getattr(node, "targets", [getattr(node, "target", None)]):
                for part in ast.walk(target):
                    if isinstance(part, ast.Attribute):
                        defined.add(part.attr)
                    elif isinstance(part, ast.Name):
                        defined.add(part.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update(alias.asname or alias.name for alias in node.names)
    return defined


def test_no_module_but_torch_compat_touches_private_state():
    trees = {path: ast.parse(path.read_text()) for path in SOURCE.rglob("*.py")}
    ours = set().union(*(_names_defined(tree) for tree in trees.values()))
    offending = []
    for path, tree in trees.items():
        if path.name == "_torch_compat.py":
            continue
        foreign = sorted(n for n in _private_names_used(tree) - ours - NAMEDTUPLE_API
                         if not DISPLAY_PROTOCOL.fullmatch(n))
        if foreign:
            offending.append(f"{path.relative_to(SOURCE.parent)}: {', '.join(foreign)}")
    assert not offending, ("private names of other packages used outside _torch_compat.py "
                           "(move the access there):\n" + "\n".join(offending))


def test_the_scan_finds_a_private_access():
    tree = ast.parse("scaler._scale.clone()\ngetattr(opt, '_opt_called', False)\n"
                     "sys.modules.get('torch._dynamo.utils')\nself._mine = 1\n")
    assert _private_names_used(tree) == {"_scale", "_opt_called", "torch._dynamo.utils", "_mine"}
    assert "_mine" in _names_defined(tree)
