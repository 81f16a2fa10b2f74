"""Shape rules for the code itself, checked with ``ast`` (fast: no imports of the checked modules, no processes).

- no function or method over 50 lines, from its ``def`` line to the end of its body, docstring included;
- none with more than 8 parameters (positional, keyword-only, ``*args`` and ``**kwargs``; not ``self``/``cls``);
- no import cycles among the modules of ``hf_storage`` (imports inside functions included);
- ``HF_STORAGE_*`` environment variables are read only in ``hf_storage/settings.py``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hf_storage", "launcher")
MAX_LINES = 50
MAX_PARAMS = 8
SETTINGS = "hf_storage/settings.py"
ENV_PREFIX = "HF_STORAGE_"


def _sources() -> Iterator[tuple[str, ast.Module]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method with its dotted name (``Class.method``, ``outer.inner``)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args)]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    names += [p.arg for p in a.kwonlyargs]
    names += [f"*{p.arg}" for p in (a.vararg,) if p is not None]
    names += [f"**{p.arg}" for p in (a.kwarg,) if p is not None]
    return names


def test_no_function_is_longer_than_50_lines():
    long = {
        f"{path}::{name}": fn.end_lineno - fn.lineno + 1
        for path, tree in _sources()
        for name, fn in _functions(tree)
        if fn.end_lineno is not None and fn.end_lineno - fn.lineno + 1 > MAX_LINES
    }
    assert not long, f"functions over {MAX_LINES} lines (split them): {long}"


def test_no_function_takes_more_than_8_parameters():
    wide = {
        f"{path}::{name}": len(_params(fn))
        for path, tree in _sources()
        for name, fn in _functions(tree)
        if len(_params(fn)) > MAX_PARAMS
    }
    assert not wide, f"functions with over {MAX_PARAMS} parameters (group them): {wide}"


# -- import cycles ----------------------------------------------------------------------------------


def _imports(module: str, tree: ast.Module, modules: set[str]) -> set[str]:
    """The ``hf_storage`` modules that ``module`` imports; ``__init__`` stands for the package itself."""
    found: set[str] = set()

    def add(dotted: str, names: list[str]) -> None:
        parts = dotted.split(".") if dotted else []
        if parts:
            found.add(parts[0] if parts[0] in modules else "__init__")
        else:  # ``from . import x``: x is a module, or a name the package defines
            found.update(n if n in modules else "__init__" for n in names)

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 1:
                add(node.module or "", names)
            elif node.level == 0 and node.module and (node.module + ".").startswith("hf_storage."):
                add(node.module.removeprefix("hf_storage").lstrip("."), names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if (a.name + ".").startswith("hf_storage."):
                    add(a.name.removeprefix("hf_storage").lstrip("."), [])
    found.discard(module)  # ``from . import x`` inside x's own package __init__ would be a loop of one
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_hf_storage():
    trees = {Path(p).stem: t for p, t in _sources() if p.startswith("hf_storage/")}
    graph = {m: _imports(m, t, set(trees)) for m, t in trees.items()}
    assert graph["api"] or graph["__init__"], "the import graph came out empty: the scan is broken"
    cycles = _cycles(graph)
    assert not cycles, f"import cycles among hf_storage modules: {cycles}"


# -- environment -------------------------------------------------------------------------------------


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def _env_names(node: ast.AST, constants: dict[str, str]) -> Iterator[str]:
    """The ``HF_STORAGE_*`` names that ``node`` (one expression) reads from the environment."""
    keys: list[ast.AST] = []
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in ("get", "pop", "setdefault") and _is_environ(f.value):
            keys = node.args[:1]
        elif (isinstance(f, ast.Attribute) and f.attr == "getenv") or (isinstance(f, ast.Name) and f.id == "getenv"):
            keys = node.args[:1]
    elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
        keys = [node.slice]
    elif isinstance(node, ast.Compare) and any(isinstance(o, (ast.In, ast.NotIn)) for o in node.ops):
        if any(_is_environ(c) for c in node.comparators):
            keys = [node.left]
    for k in keys:
        value = constants.get(k.id) if isinstance(k, ast.Name) else None
        if isinstance(k, ast.Constant) and isinstance(k.value, str):
            value = k.value
        elif isinstance(k, ast.JoinedStr) and k.values and isinstance(k.values[0], ast.Constant):
            value = str(k.values[0].value)
        if value is not None and value.startswith(ENV_PREFIX):
            yield value


def test_hf_storage_settings_are_read_only_in_settings_py():
    reads = []
    for path, tree in _sources():
        if path == SETTINGS:
            continue
        constants = {
            t.id: n.value.value
            for n in tree.body
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        reads += [f"{path}:{n.lineno} {name}" for n in ast.walk(tree) for name in _env_names(n, constants)]
    assert not reads, f"read HF_STORAGE_* settings through hf_storage.settings instead: {reads}"


def test_the_scans_see_what_they_look_for():
    """The rules would pass vacuously if the scans found nothing; make sure they do find things."""
    probe = ast.parse(
        "import os\nK = 'HF_STORAGE_X'\n"
        "def f(a, b, c, d, e, f, g, h, *i, j, **k):\n    return os.environ.get(K), os.getenv('HF_STORAGE_Y')\n"
        "class C:\n    def m(self, x):\n        from . import api\n        return 'HF_STORAGE_Z' in os.environ\n"
    )
    (_, f), (_, m) = list(_functions(probe))
    assert len(_params(f)) == 11 and _params(m) == ["x"]
    constants = {"K": "HF_STORAGE_X"}
    assert sorted(n for node in ast.walk(probe) for n in _env_names(node, constants)) == [
        "HF_STORAGE_X",
        "HF_STORAGE_Y",
        "HF_STORAGE_Z",
    ]
    assert _imports("x", probe, {"api", "x"}) == {"api"}
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
