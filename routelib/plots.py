"""Figures shared by the notebooks (matplotlib + seaborn). Each function draws into given axes or
makes its own figure and returns it; none of them computes the numbers it shows."""

from __future__ import annotations

import math
from typing import Mapping

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns


def training_curves(histories: Mapping[str, list[dict]], key: str = "lm_loss", ax=None):
    """Loss against step for several runs (``TrainResult.history`` each)."""
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    for name, history in histories.items():
        rows = [r for r in history if key in r or "loss" in r]
        ax.plot([r["step"] for r in rows], [r.get(key, r.get("loss")) for r in rows], label=name)
    ax.set(xlabel="step", ylabel=key.replace("_", " "), title="training loss")
    ax.legend()
    return ax.figure


def perplexity_by_domain(table: pd.DataFrame, ax=None):
    """Grouped bars: perplexity per domain (columns ``ppl_<domain>``) for each model (index)."""
    cols = [c for c in table.columns if c.startswith("ppl_")]
    long = table[cols].rename(columns=lambda c: c[4:]).reset_index().melt(id_vars=table.index.name or "index",
                                                                         var_name="domain", value_name="perplexity")
    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    sns.barplot(data=long, x="domain", y="perplexity", hue=table.index.name or "index", ax=ax)
    ax.set(title="held-out perplexity (lower is better)")
    return ax.figure


def expert_heatmaps(records: pd.DataFrame, value: str = "fraction"):
    """One heatmap per layer: domain x expert share of top-k assignments (rows sum to 1)."""
    layers = sorted(records["layer"].unique())
    cols = min(len(layers), 3)
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    vmax = records[value].max()
    for ax, layer in zip(axes.flat, layers):
        grid = records[records["layer"] == layer].pivot(index="domain", columns="expert", values=value)
        sns.heatmap(grid, ax=ax, vmin=0, vmax=vmax, cmap="viridis", annot=grid.shape[1] <= 8, fmt=".2f",
                    cbar=False, annot_kws={"size": 7})
        ax.set(title=f"layer {layer}", xlabel="expert", ylabel="")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(f"expert {value} by domain")
    fig.tight_layout()
    return fig


def capacity_sweep(sweep: pd.DataFrame):
    """Drop rate and perplexity against the capacity factor (the dropless model drawn as a line)."""
    finite = sweep[sweep["capacity_factor"] != float("inf")]
    dropless = sweep[sweep["capacity_factor"] == float("inf")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(finite["capacity_factor"], 100 * finite["drop_rate"], marker="o")
    a.set(xlabel="capacity factor", ylabel="dropped assignments (%)", title="drop rate")
    b.plot(finite["capacity_factor"], finite["perplexity"], marker="o", label="with capacity")
    if len(dropless):
        b.axhline(dropless["perplexity"].iloc[0], color="gray", ls="--", label="dropless")
    b.set(xlabel="capacity factor", ylabel="perplexity", title="held-out perplexity")
    b.legend()
    fig.tight_layout()
    return fig
