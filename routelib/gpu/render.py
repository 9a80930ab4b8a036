"""README's "GPU results" section, rendered from the plan's result files only (no number typed by
hand): which steps ran (GPU, wall time, date) against their estimates and which run from the carry
bundle alone (the others need SmolLM2's weights), the MoE kernel table at
Mixtral shapes, and each step's headline numbers. With no results it says that no GPU run exists
and every cell reads "not run". Results made with ``--smoke`` are never shown as GPU results."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pandas as pd

from routelib.errors import ConfigError
from routelib.gpu.plan import WEIGHTS, Step
from routelib.reference import MANIFEST, load_manifest

START = "<!-- gpu-results:start (rendered by `python -m routelib.gpu --render`; do not edit by hand) -->"
END = "<!-- gpu-results:end -->"
NOT_RUN = "not run"

#: routelib.moe_bench's implementation names -> the kernel table's row labels
KERNEL_ROWS = {
    "moe_naive": "naive (loop over experts)",
    "moe_padded": "padded (capacity, batched matmul)",
    "moe_grouped": "grouped (sorted + `grouped_mm`)",
    "grouped_mm_alone": "`torch._grouped_mm` alone on the routed work",
    "dense_equal_total": "dense FFN, equal total parameters",
    "dense_equal_active": "dense FFN, equal active parameters",
    "transformers_eager": "transformers `MixtralSparseMoeBlock`, eager",
    "transformers_grouped_mm": "transformers `MixtralSparseMoeBlock`, grouped_mm experts",
}
KERNEL_TOKENS = (4096, 8192, 16384)
ASSET_LABELS = {WEIGHTS: "SmolLM2-135M's weights"}  # what an asset package of ``Step.needs`` holds, for the plan table


def _from_bundle(step: Step) -> str:
    """The plan table's cell: whether the step runs from the carry bundle alone (routelib.gpu.bundle)."""
    from routelib.data.assets import requirement_for

    if not step.needs:
        return "yes"
    return "no: needs " + ", ".join(f"{ASSET_LABELS.get(m, m)} (`{requirement_for(m)}`)" for m in step.needs)


def load_results(results: str | os.PathLike, include_smoke: bool = False) -> dict[str, dict]:
    """{step name: {"manifest", "summary", "dir"}} for every finished step folder (hash-checked);
    smoke results are left out unless ``include_smoke``."""
    out = {}
    root = Path(results)
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file()):
        manifest = load_manifest(folder)
        if manifest.get("smoke") and not include_smoke:
            continue
        summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
        out[folder.name] = {"manifest": manifest, "summary": summary, "dir": folder}
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _kernel_table(found: dict) -> list[str]:
    """Median ms and TFLOP/s per implementation and token count (the counts the results hold, else
    the plan's 4k/8k/16k)."""
    df, tokens = None, KERNEL_TOKENS
    if "01_moe_kernels" in found:
        df = pd.read_csv(found["01_moe_kernels"]["dir"] / "moe_bench.csv")
        tokens = tuple(sorted(int(n) for n in df["tokens"].unique()))
        df = df.set_index(["name", "tokens"])
    head = "| MoE FFN layer at Mixtral shapes, bf16 | " + " | ".join(f"{n:,} tokens" for n in tokens) + " |"
    lines = [head, "|---|" + "---:|" * len(tokens)]
    for name, label in KERNEL_ROWS.items():
        cells = []
        for n in tokens:
            if df is not None and (name, n) in df.index:
                r = df.loc[(name, n)]
                cells.append(f"{r['median_ms']:.3g} ms, {r['tflops']:.3g} TFLOP/s")
            else:
                cells.append(NOT_RUN)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def render(results: str | os.PathLike, plan: list[Step], include_smoke: bool = False) -> str:
    """The section's Markdown (without the marker lines)."""
    found = load_results(results, include_smoke)
    lines = []
    if not found:
        lines += [textwrap.fill(
            "No GPU run exists yet: no GPU has been lent to a session of this project, so every result below "
            f"reads \"{NOT_RUN}\". On a GPU machine, `python -m routelib.gpu --budget 540` runs the plan's steps "
            "that fit 540 s, in order, skipping finished ones; `make gpu` runs it and re-renders this section.",
            width=100, break_on_hyphens=False), ""]
    else:
        gpus = sorted({str(r["manifest"].get("gpu") or r["manifest"]["environment"]["device"]) for r in found.values()})
        lines += [textwrap.fill(f"{len(found)} of {len(plan)} plan steps have results, on {', '.join(gpus)} "
                                f"(each step's folder holds its manifest); the others read \"{NOT_RUN}\".",
                                width=100, break_on_hyphens=False), ""]
    lines += ["| step | what | estimated device time (H100/H200) | runs from the carry bundle | result |",
              "|---|---|---:|---|---|"]
    for step in plan:
        r = found.get(step.name)
        if r is None:
            result = NOT_RUN
        else:
            m = r["manifest"]
            env = m["environment"]
            result = (f"{m.get('gpu') or env['device']}, torch {env['torch']}, CUDA {m.get('cuda')}: "
                      f"{m['wall_s']:.0f} s, {m.get('finished_utc', '')[:10]}")
        lines.append(f"| `{step.name}` | {step.title} | {step.estimate().seconds / 60:.1f} min | {_from_bundle(step)} "
                     f"| {result} |")
    lines += ["", *_kernel_table(found), "", "| step | headline numbers |", "|---|---|"]
    for step in plan:
        r = found.get(step.name)
        text = "; ".join(f"{k} {_fmt(v)}" for k, v in r["summary"].items()) if r else NOT_RUN
        lines.append(f"| `{step.name}` | {text or '(none)'} |")
    return "\n".join(lines) + "\n"


def update_readme(readme: str | os.PathLike, section: str) -> bool:
    """Replace the text between :data:`START` and :data:`END` in ``readme``; True if it changed."""
    path = Path(readme)
    text = path.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ConfigError(f"{path}: needs exactly one pair of GPU-results markers ({START!r} ... {END!r})")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    new = f"{head}{START}\n{section}{END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text
