"""What the studies' GPU steps share: the rates their estimates use, the notebooks' GPU parameter files
(``notebooks/params/<notebook>.gpu.yaml``) they take their sizes from, and the timing arithmetic.

Estimates use a measured rate where one exists (:data:`GROUPED_MM_RATE`) and otherwise a step's FLOPs
over a stated share of the H100/H200 dense bf16 peak (:data:`BF16_PEAK`); fixed costs (set-up, Triton
autotuning, timing windows, checkpoint writes) are added and named by each step.
"""

from __future__ import annotations


import pandas as pd

from routelib import paths
from routelib.gpu.plan import Context

GROUPED_MM_RATE = 758e12  # FLOP/s, measured: torch._grouped_mm at Mixtral shapes, H100, torch 2.11, 2026-11-23
BF16_PEAK = 989e12  # FLOP/s, H100/H200 SXM dense bf16 (datasheet); utilisations below are shares of it


RUNNER_FIELDS = ("out_dir", "device", "num_threads", "threads")  # where and how to run: set by the plan, not the study


def gpu_yaml(notebook: str) -> dict:
    """The settings of ``notebooks/params/<notebook>.gpu.yaml`` (the full-scale run)."""
    import yaml

    return yaml.safe_load((paths.NOTEBOOKS_DIR / "params" / f"{notebook}.gpu.yaml").read_text())


def full_size(notebook: str, changes: dict | None = None) -> dict:
    """The yaml's study settings (less :data:`RUNNER_FIELDS`) with a step's ``changes`` applied."""
    return {**{k: v for k, v in gpu_yaml(notebook).items() if k not in RUNNER_FIELDS}, **(changes or {})}


def keeps(notebook: str, changes: dict | None = None, note: str = "") -> str:
    """Which settings of the notebook's GPU yaml a step keeps: all of them but ``changes``."""
    yml = gpu_yaml(notebook)
    diff = [f"{k} {v!r} (yaml: {yml[k]!r})" if k in yml else f"{k} {v!r}" for k, v in (changes or {}).items()]
    text = f"every setting of notebooks/params/{notebook}.gpu.yaml" + (f" but {', '.join(diff)}" if diff else "")
    return text + (f"; {note}" if note else "")


def timing_s(call_s: float, min_time_s: float, warmup: int = 3) -> float:
    """Seconds routelib.bench.time_fn spends on one function: warm-up + one trial call + enough
    repeats to fill ``min_time_s`` (at least 5)."""
    return (warmup + 1) * call_s + max(min_time_s, 5 * call_s)


def write_csv(df: pd.DataFrame, ctx: Context, name: str, index: bool = False) -> None:
    df.to_csv(ctx.out / name, index=index)


def counts(tokens) -> str:
    """(4096, 8192) -> "4k/8k"."""
    return "/".join(f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in tokens)
