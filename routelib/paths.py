"""Where the repository keeps things. Every path a notebook or test needs is resolved here, so
notebooks run the same from any working directory (papermill, nbval, JupyterLab)."""

from __future__ import annotations

import os
from pathlib import Path

#: The repository root (the folder holding ``routelib/``).
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Small assets the project made and ships (tokenizer, small checkpoints, model cards).
DATA_DIR = REPO_ROOT / "data"
#: Shipped routing traces and their manifests.
TRACES_DIR = REPO_ROOT / "routing_data_collected"
#: The numbered notebooks.
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
#: Outputs of runs (executed notebooks, checkpoints, metrics); git-ignored.
RUNS_DIR = Path(os.environ.get("ROUTELIB_RUNS", REPO_ROOT / "runs"))
#: Derived data that is cheap to rebuild (tokenised corpora); git-ignored.
CACHE_DIR = Path(os.environ.get("ROUTELIB_CACHE", REPO_ROOT / ".cache"))


def in_repo(path: str | os.PathLike) -> Path:
    """``path`` as given when absolute, else relative to the repository root (notebook parameters
    such as ``out_dir="runs/03_moe_speedup"`` mean the same from any working directory)."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p
