"""The package's layers (docs/layout.md): every import of ``hmt_runtime.*`` -- at module level or inside a
function, read from the source's syntax tree -- points to the same subpackage or a lower layer, no two modules
import each other (directly or round a circle), and every module imports cleanly on its own."""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hmt_runtime"

# The layer order, lowest first.  Subpackages of one layer stand side by side and do not import each other;
# "" is the package's top: hmt_runtime/__init__.py (the public API), the CLI and the ``python -m`` entry points.
LAYERS = (("core",), ("native",), ("incremental",), ("model",), ("training", "serving"), ("",))
EXTENSION = ("_C", "native")  # the compiled extension hmt_runtime._C belongs to the native layer


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _group(name: str) -> str:
    """The subpackage a module name of hmt_runtime belongs to ("" for the package's top-level modules)."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] == EXTENSION[0]:
        return EXTENSION[1]
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return ""


def _rank(group: str) -> int:
    for rank, groups in enumerate(LAYERS):
        if group in groups:
            return rank
    raise AssertionError(f"subpackage {group!r} of hmt_runtime has no place in LAYERS")


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of hmt_runtime in the module's source, wherever it stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                target = f"{module}.{alias.name}"
                found.append((node.lineno, target if target in MODULES or target == "hmt_runtime._C" else module))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.JoinedStr) or (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                text = "".join(v.value for v in getattr(arg, "values", [arg]) if isinstance(v, ast.Constant))
                found.append((node.lineno, text.rstrip(".")))
    return [(line, module) for line, module in found if module.split(".")[0] == "hmt_runtime"]


def test_every_subpackage_has_a_layer():
    for name in MODULES:
        _rank(_group(name))


def test_imports_point_down():
    wrong = []
    for name, path in MODULES.items():
        mine = _group(name)
        for line, target in _imports(name, path):
            theirs = _group(target)
            if theirs == mine:
                continue
            if _rank(theirs) >= _rank(mine):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {name} ({mine or 'top'}) imports {target} "
                             f"({theirs or 'top'})")
    assert not wrong, "imports that do not point down a layer:\n" + "\n".join(wrong)


def test_no_import_circles_lazy_imports_included():
    graph = {name: {t for _, t in _imports(name, path) if t in MODULES and t != name}
             for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_import_circles_and_kernels_stand_alone():
    """Every module imports cleanly on its own in a fresh interpreter, and hmt_kernels imports no hmt_runtime."""
    modules = sorted(name for name in MODULES if name != "hmt_runtime")
    modules += sorted(f"hmt_kernels.{p.stem}" for p in (ROOT / "hmt_kernels").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    for m in [k for k in sys.modules if k.startswith(('hmt_runtime', 'hmt_kernels'))]:\n"
            "        del sys.modules[m]\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ModuleNotFoundError as err:  # an optional third-party dependency (e.g. fastapi)\n"
            "        if err.name.startswith(('hmt_runtime', 'hmt_kernels')):\n"
            "            raise\n"
            "        continue\n"
            "    if name.startswith('hmt_kernels'):\n"
            "        assert not [k for k in sys.modules if k.startswith('hmt_runtime')], name\n")
    subprocess.run([sys.executable, "-c", code, "hmt_kernels", *modules], check=True, cwd=ROOT,
                   env={**os.environ, "TRITON_INTERPRET": "1"})
    for path in (ROOT / "hmt_kernels").glob("*.py"):
        assert "hmt_runtime" not in "".join(l for l in path.read_text().splitlines(True)
                                            if l.lstrip().startswith(("import", "from"))), path
