"""The package layout: no import circles anywhere in routelib (module-level or inside functions),
and no import from a library module up into a notebook's study or view (``routelib.studies``,
``routelib.views``), nor from either into the top layer (``routelib.notebooks``, the GPU plan
``routelib.gpu``). Imports are read from the source (AST), so lazy imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import routelib

PACKAGE = Path(routelib.__file__).parent
UPPER = ("routelib.studies", "routelib.views")  # a notebook's logic and views: nothing below imports them
TOP = ("routelib.notebooks", "routelib.gpu")  # the notebook runner and the GPU plan sit above everything


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """routelib modules that ``path`` imports, resolved to the deepest known module. A package's
    ``__init__`` re-exporting a name lazily (``routelib.lazy``) is not an import of that name."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("routelib") and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(path, name, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as [a, b, ..., a], or None (depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == GREY:
                return stack[stack.index(nxt):] + [nxt]
            if colour.get(nxt) == WHITE and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE and (found := visit(node)):
            return found
    return None


def layer(name: str) -> int:
    if name.startswith(TOP):
        return 2
    return 1 if name.startswith(UPPER) else 0


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_library_module_imports_a_study_or_view():
    upward = sorted(f"{a} -> {b}" for a, bs in import_graph().items() for b in bs if layer(b) > layer(a))
    assert not upward, "library modules import notebook-level modules:\n" + "\n".join(upward)


# Declared exceptions: a study that re-creates another notebook's product when it is missing (none now:
# notebook 06 reads the subject's own training snapshots instead of re-training notebook 03's run).
UPSTREAM: set[tuple[str, str]] = set()


def study_of(name: str) -> str | None:
    """The notebook study a module belongs to: ``routelib.studies.<study>`` or a module of that package
    (``routelib.studies.pathways.reference`` is study ``pathways``); None outside the studies."""
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["routelib", "studies"] else None


def test_studies_do_not_import_each_other():
    sideways = sorted(f"{a} -> {b}" for a, bs in import_graph().items() for b in bs
                      if study_of(a) and study_of(b) and study_of(a) != study_of(b) and (a, b) not in UPSTREAM)
    assert not sideways, "a notebook's study imports another's:\n" + "\n".join(sideways)


def test_each_notebook_imports_only_its_own_study():
    """A notebook's code cells import one study module (the README's notebook table names it)."""
    import json
    import re

    from routelib import paths

    for nb in sorted((paths.REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
        studies = set(re.findall(r"routelib\.studies\.(\w+)", code)) | set(
            re.findall(r"from routelib\.studies import (\w+)", code))
        assert len(studies) == 1, f"{nb.name} imports studies {sorted(studies)}"


@pytest.mark.parametrize("graph, cycle", [
    pytest.param({"a": {"b"}, "b": {"c"}, "c": set()}, None, id="chain"),
    pytest.param({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"], id="two"),
    pytest.param({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, ["a", "b", "c", "a"], id="three"),
])
def test_cycle_finder(graph, cycle):
    assert find_cycle(graph) == cycle


def test_the_walker_sees_lazy_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from routelib.data.corpus import load_corpus\n    import routelib.train\n")
    known = {"routelib.data.corpus", "routelib.train", "routelib.data"}
    assert imported(src, "routelib.x", known) == {"routelib.data.corpus", "routelib.train"}
