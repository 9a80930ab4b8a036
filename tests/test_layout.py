"""The package layout: no import circles anywhere in routelib (module-level or inside functions),
no import from a library module up into a notebook's study (``routelib.studies``, each study one
folder: pipeline, reference run, views, GPU steps), nor from a study into the top layer (the notebook
runner ``routelib.notebooks``, the GPU plan's list of steps ``routelib.gpu.steps`` and its command);
every study's parts inside its folder; no import of another module's private names; every atomic
write through :func:`routelib.io.atomic_write`. Imports are read from the source (AST), so lazy
imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import routelib

PACKAGE = Path(routelib.__file__).parent
UPPER = ("routelib.studies",)  # a notebook's logic, reference run, views and GPU steps: nothing below imports them
TOP = ("routelib.notebooks", "routelib.gpu.steps", "routelib.gpu.__main__")  # the notebook runner, the plan's steps


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


# ------------------------------------------------------------------ one study, one folder
STUDY_PARTS = ("reference", "views", "gpu")  # a study's reference run, figures and dashboards, GPU steps


def studies() -> set[str]:
    return {p.name for p in (PACKAGE / "studies").iterdir() if (p / "__init__.py").is_file()}


GPU_PLAN = {"routelib.gpu", "routelib.gpu.__main__", "routelib.gpu.plan", "routelib.gpu.render", "routelib.gpu.sizing",
            "routelib.gpu.steps", "routelib.gpu.bundle"}  # the plan runner, its ordered list and its carry bundle:
#   every step itself lives in its study
SHARED = {"routelib.reference", "routelib.plots"}  # the reference-run skeleton and the figures every study shares


def misplaced_parts(mods: dict[str, Path], study_names: set[str]) -> list[str]:
    """Modules that hold a study's part outside ``routelib/studies/<study>/``: anything in a ``views``
    package or named ``reference``/``views``/``gpu`` elsewhere (the shared skeleton and the GPU plan
    aside), a module named ``<study>_<part>``, a module of ``routelib.gpu`` beyond the plan, and a study
    that is a lone module instead of a folder."""
    bad = []
    for name, path in mods.items():
        parts = name.split(".")
        if study_of(name) is not None:
            if len(parts) == 3 and path.name != "__init__.py":
                bad.append(f"{name}: a study is a folder (routelib/studies/{parts[2]}/__init__.py), not one module")
            continue
        if name in SHARED or name in GPU_PLAN:
            continue
        if "views" in parts[1:] or parts[-1] in STUDY_PARTS:
            bad.append(f"{name}: a study's {parts[-1]} outside routelib/studies/<study>/")
        elif any(parts[-1] == f"{s}_{part}" for s in study_names for part in STUDY_PARTS):
            bad.append(f"{name}: named after a study's part, outside routelib/studies/<study>/")
        elif parts[:2] == ["routelib", "gpu"]:
            bad.append(f"{name}: GPU steps belong in their study's gpu module")
    return bad


def test_each_study_lives_in_one_folder():
    bad = misplaced_parts(modules(), studies())
    assert not bad, "\n".join(bad)


def test_gpu_steps_are_defined_in_their_study():
    """``Step(...)`` is built only in a study's ``gpu`` module (the plan's list calls those)."""
    bad = []
    for name, path in modules().items():
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
                 and getattr(n.func, "id", getattr(n.func, "attr", None)) == "Step"]
        if calls and not (study_of(name) and name.endswith(".gpu")):
            bad.append(name)
    assert not bad, "GPU steps built outside a study's gpu module: " + ", ".join(bad)


def test_misplaced_parts_are_found():
    mods = {"routelib.views.pathways": Path("views/pathways.py"), "routelib.studies.pathways_reference":
            Path("studies/pathways_reference.py"), "routelib.studies.pathways.views": Path("studies/pathways/views.py"),
            "routelib.reference": Path("reference.py"), "routelib.routing.views": Path("routing/views.py"),
            "routelib.studies.next_expert": Path("studies/next_expert.py"), "routelib.gpu.pathways": Path("gpu/pathways.py"),
            "routelib.models.pathways": Path("models/pathways.py"), "routelib.data.pathways_gpu": Path("data/pathways_gpu.py")}
    found = misplaced_parts(mods, {"pathways", "next_expert"})
    flagged = {line.split(":")[0] for line in found}
    assert flagged == {"routelib.views.pathways", "routelib.studies.pathways_reference", "routelib.routing.views",
                       "routelib.studies.next_expert", "routelib.gpu.pathways", "routelib.data.pathways_gpu"}


# ------------------------------------------------------------------ no private names across modules
def private_imports(path: Path, name: str, known: set[str]) -> list[str]:
    """``from routelib.x import _name`` where ``_name`` is private to another module (dunders aside)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    private = lambda n: n.startswith("_") and not n.startswith("__")  # noqa: E731
    out, aliases = [], {}  # aliases: local name -> routelib module it stands for
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("routelib") and base != name:
                out += [f"{name} imports {base}.{a.name}" for a in node.names if private(a.name)]
                aliases.update({a.asname or a.name: f"{base}.{a.name}" for a in node.names
                                if f"{base}.{a.name}" in known})
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name.startswith("routelib")})
    for node in ast.walk(tree):  # module_alias._private
        if (isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name)
                and aliases.get(node.value.id, name) != name):
            out.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    return sorted(set(out))


def test_no_module_imports_another_modules_private_names():
    mods = modules()
    bad = [line for name, path in mods.items() for line in private_imports(path, name, set(mods))]
    assert not bad, "\n".join(bad)


def test_private_imports_are_found(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from routelib.routing.record.traces import _layout, load_traces\nfrom routelib.x import __version__\n"
                   "from routelib.routing.record import traces as T\nT._check_table(None)\n")
    assert private_imports(src, "routelib.y", {"routelib.routing.record.traces"}) == [
        "routelib.y imports routelib.routing.record.traces._layout", "routelib.y uses routelib.routing.record.traces._check_table"]


# ------------------------------------------------------------------ one atomic-write helper
def hand_rolled_replaces(path: Path) -> list[int]:
    """Lines calling ``os.replace``/``os.rename``/``Path.replace``-style renames outside the helper."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("replace", "rename"):
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id == "os":
                lines.append(node.lineno)
    return lines


def test_every_atomic_write_goes_through_the_helper():
    bad = [f"{name}:{line}" for name, path in modules().items() if name != "routelib.io"
           for line in hand_rolled_replaces(path)]
    assert not bad, "os.replace outside routelib.io.atomic_write: " + ", ".join(bad)


def test_hand_rolled_replaces_are_found(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\ndef w(p):\n    open(p + '.tmp', 'w').write('x')\n    os.replace(p + '.tmp', p)\n")
    assert hand_rolled_replaces(src) == [4]
