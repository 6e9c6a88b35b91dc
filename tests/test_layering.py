"""The package's layering, read from its imports with ``ast`` (nothing is imported).

Every ``import`` / ``from ... import`` of a bigalign module is an arrow, at module level or
inside a function (a deferred import is still a dependency). No arrows may run in a circle;
the maths (bigalign.maths) imports no I/O or execution library; the artefact
(bigalign/transform.py) imports no command and no part of the command line.
Print the graph's circles with ``python tests/test_layering.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bigalign"

#: Circles known today, each through function-level imports only, and why they are left:
#: frozenset of the modules in it -> the reason. A circle not listed fails; a listed one
#: that is gone fails too (remove it from here).
KNOWN_CIRCLES: dict = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, name: str) -> list[tuple[str, bool]]:
    """Every (imported name, at module level?) in ``path``: absolute dotted names, relative
    imports resolved, ``from X import a`` as both ``X`` and ``X.a``. Imports under
    ``if TYPE_CHECKING:`` are left out (they never run)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package
                    for _ in range(child.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = anchor + ("." + child.module if child.module else "")
                found.append((base, top))
                found.extend((f"{base}.{a.name}", top) for a in child.names)
            visit(child, top and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)))
    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def graph(module_level_only: bool = False) -> dict[str, set[str]]:
    """bigalign module -> the bigalign modules it imports."""
    mods = modules()

    def resolve(dotted: str):
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    out = {}
    for name, path in mods.items():
        targets = {resolve(t) for t, top in imports(path, name)
                   if t.split(".")[0] == "bigalign" and (top or not module_level_only)}
        out[name] = {t for t in targets if t and t != name}
    return out


def circles(g: dict[str, set[str]]) -> list[frozenset]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(frozenset(group))

    for v in sorted(g):
        if v not in index:
            connect(v)
    return found


def _describe(group: frozenset, g: dict) -> str:
    arrows = [f"{a} -> {b}" for a in sorted(group) for b in sorted(g[a]) if b in group]
    return "circle: " + "; ".join(arrows)


def test_no_module_level_circle():
    g = graph(module_level_only=True)
    assert not circles(g), "\n".join(_describe(c, g) for c in circles(g))


def test_no_circle_through_deferred_imports_beyond_the_known_ones():
    g = graph()
    found = circles(g)
    new = [c for c in found if c not in KNOWN_CIRCLES]
    assert not new, "\n".join(_describe(c, g) for c in new)
    gone = [sorted(c) for c in KNOWN_CIRCLES if c not in found]
    assert not gone, f"no longer a circle, remove from KNOWN_CIRCLES: {gone}"


def test_the_detector_finds_a_circle_and_a_deferred_import(tmp_path):
    """The test above could not fail if the graph or the detector missed arrows."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        frozenset({"a", "b", "c"})]
    src = tmp_path / "m.py"
    src.write_text("from .x import y\n"
                   "def f():\n    from ..z import w\n"
                   "if TYPE_CHECKING:\n    import bigalign.never\n")
    assert imports(src, "bigalign.p.m") == [
        ("bigalign.p.x", True), ("bigalign.p.x.y", True), ("bigalign.z", False),
        ("bigalign.z.w", False)]
    g = graph()
    assert "bigalign.transform" in g["bigalign.commands.compose"]  # a module-level one
    assert "bigalign.storage.registry_read" in g["bigalign.transform"]  # a deferred one


def test_maths_imports_no_io_or_execution_library():
    banned = ("dask", "zarr", "fsspec", "polars")
    bad = [f"{name} imports {target}" for name, path in modules().items()
           if name.startswith("bigalign.maths")
           for target, _ in imports(path, name) if target.split(".")[0] in banned]
    assert not bad, bad


def test_the_artefact_imports_no_command_and_no_cli():
    path = PACKAGE / "transform.py"
    bad = [t for t, _ in imports(path, "bigalign.transform")
           if t.startswith(("bigalign.commands", "bigalign.cli"))]
    assert not bad, bad
    g = graph()
    assert not {m for m in g["bigalign.transform"]
                if m.startswith(("bigalign.commands", "bigalign.cli"))}


def test_cli_command_modules_import_common_not_app():
    g = graph()
    for name in g:
        if name.startswith("bigalign.cli.") and name not in ("bigalign.cli.app",
                                                              "bigalign.cli.__main__"):
            assert "bigalign.cli.app" not in g[name], name


if __name__ == "__main__":
    full = graph()
    for c in circles(full):
        print(_describe(c, full), "(known)" if c in KNOWN_CIRCLES else "(NEW)")
