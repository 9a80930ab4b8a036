"""Executing, refreshing and inspecting the numbered notebooks (docs/design.md §4).

    python -m routelib.notebooks run              # every notebook -> runs/, then its headline metrics
    python -m routelib.notebooks run 03           # only notebooks whose name starts with 03
    python -m routelib.notebooks refresh          # re-execute in place (the nbval references)

A notebook's last cell calls :func:`report`, which prints the headline metrics rounded and writes
them to ``runs/metrics/<notebook>.json``; ``run`` prints those files after executing.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from routelib import paths
from routelib.errors import ConfigError
from routelib.io import atomic_write_bytes

#: papermill's kernel; every committed notebook declares it (checked by tests/test_notebooks.py).
KERNEL = "python3"
#: Seconds one cell may run before papermill/nbval give up.
CELL_TIMEOUT_S = 1200


def list_notebooks(prefixes: Iterable[str] = ()) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in ``notebooks/``, optionally filtered by prefix."""
    found = sorted(p for p in paths.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    prefixes = tuple(prefixes)
    return [p for p in found if not prefixes or p.name.startswith(prefixes)]


def parameter_names(nb_path: Path) -> list[str]:
    """Names assigned in the notebook's cell tagged ``parameters`` (there must be exactly one)."""
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{nb_path.name}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    names = []
    for node in ast.parse(cells[0].source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def hygiene_problems(nb_path: Path) -> list[str]:
    """What is wrong with a committed notebook (empty when nothing): kernelspec ``python3``,
    exactly one ``parameters`` cell, no papermill leftovers (injected cell, timestamps), and
    every key of ``notebooks/params/<name>*.yaml`` a parameter of the notebook."""
    import nbformat
    import yaml

    nb = nbformat.read(nb_path, as_version=4)
    problems = []
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != KERNEL:
        problems.append(f"kernelspec is {kernel!r}, not {KERNEL!r}")
    if "papermill" in nb.metadata:
        problems.append("papermill metadata in the notebook (strip it: python -m routelib.notebooks refresh)")
    for i, cell in enumerate(nb.cells):
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            problems.append(f"cell {i} is papermill's injected-parameters cell")
        if "papermill" in cell.metadata or "execution" in cell.metadata:
            problems.append(f"cell {i} carries execution timestamps")
    try:
        names = set(parameter_names(nb_path))
    except ValueError as exc:
        return problems + [str(exc)]
    for params_file in sorted((nb_path.parent / "params").glob(f"{nb_path.stem}.*yaml")):
        keys = set(yaml.safe_load(params_file.read_text()) or {})
        if keys - names:
            problems.append(f"{params_file.name} sets {sorted(keys - names)}, not parameters of the notebook")
    return problems


def strip_volatile(nb: Any) -> Any:
    """Remove what changes on every execution but means nothing: papermill's run metadata and
    timestamps, per-cell timings and the injected-parameters cell. Execution counts and tags stay."""
    nb.metadata.pop("papermill", None)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if not cell.metadata.get("tags"):
            cell.metadata.pop("tags", None)
    return nb


def execute(nb_path: Path, out_path: Path, params_file: Path | None = None, **parameters: Any) -> Path:
    """Execute ``nb_path`` with papermill into ``out_path`` (cwd = notebooks/, kernel python3)."""
    import papermill as pm
    import yaml

    params = dict(yaml.safe_load(params_file.read_text()) or {}) if params_file else {}
    params.update(parameters)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(
        str(nb_path),
        str(out_path),
        parameters=params,
        kernel_name=KERNEL,
        cwd=str(paths.NOTEBOOKS_DIR),
        execution_timeout=CELL_TIMEOUT_S,
        progress_bar=False,
    )
    return out_path


def refresh(nb_path: Path) -> None:
    """Re-execute a committed notebook at its committed parameters and write it back in place,
    stripped of volatile metadata: one command to refresh the nbval references."""
    import nbformat

    with tempfile.TemporaryDirectory() as tmp:
        out = execute(nb_path, Path(tmp) / nb_path.name)
        nb = strip_volatile(nbformat.read(out, as_version=4))
    nbformat.write(nb, nb_path)


def _rounded(value: Any, digits: int) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    if isinstance(value, Mapping):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def metrics_path(name: str) -> Path:
    return paths.RUNS_DIR / "metrics" / f"{name}.json"


def report(name: str, metrics: Mapping[str, Any], digits: int = 4) -> dict[str, Any]:
    """Print a notebook's headline metrics rounded to ``digits`` significant digits and write them
    to ``runs/metrics/<name>.json`` (atomically). Returns the rounded dict."""
    rounded = _rounded(dict(metrics), digits)
    path = metrics_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(rounded, indent=2, sort_keys=True).encode())
    for key, value in rounded.items():
        print(f"{key}: {value}")
    return rounded


def _selected(only: list[str]) -> list[Path]:
    """The notebooks a command names by prefix; a prefix that names none is an error."""
    notebooks = list_notebooks(only)
    if not notebooks and only:
        raise ConfigError(f"no notebook in {paths.NOTEBOOKS_DIR} starts with {' or '.join(only)}; "
                          f"there are: {', '.join(p.name for p in list_notebooks()) or 'none'}")
    return notebooks


def _cmd_run(args: argparse.Namespace) -> int:
    notebooks = _selected(args.only)
    if not notebooks:
        print(f"no notebooks in {paths.NOTEBOOKS_DIR} yet: nothing to run")
        return 0
    out_dir = Path(args.out)
    failed = []
    for nb in notebooks:
        print(f"== {nb.name}", flush=True)
        try:
            execute(nb, out_dir / nb.name)
        except Exception as exc:  # keep going: one broken notebook should not hide the others' results
            failed.append(nb.name)
            print(f"   FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
            continue
        path = metrics_path(nb.stem)
        if path.exists():
            for key, value in json.loads(path.read_text()).items():
                print(f"   {key}: {value}")
        else:
            print(f"   (no headline metrics written to {path})")
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)} (executed copies in {out_dir})")
        return 1
    return 0


def _cmd_refresh(args: argparse.Namespace) -> int:
    notebooks = _selected(args.only)
    if not notebooks:
        print(f"no notebooks in {paths.NOTEBOOKS_DIR} yet: nothing to refresh")
    for nb in notebooks:
        print(f"refreshing {nb.name}", flush=True)
        refresh(nb)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m routelib.notebooks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="execute notebooks into runs/ and print their headline metrics")
    run.add_argument("only", nargs="*", help="name prefixes, e.g. 03")
    run.add_argument("--out", default=str(paths.RUNS_DIR / "notebooks"), help="folder for executed copies")
    run.set_defaults(func=_cmd_run)
    ref = sub.add_parser("refresh", help="re-execute committed notebooks in place, volatile metadata stripped")
    ref.add_argument("only", nargs="*", help="name prefixes, e.g. 03")
    ref.set_defaults(func=_cmd_refresh)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    from routelib import cli

    raise SystemExit(cli.run(main))
