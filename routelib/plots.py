"""Figures shared by the notebooks (matplotlib + seaborn). Each function draws into given axes or
makes its own figure and returns it; none of them computes the numbers it shows."""

from __future__ import annotations

import math
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
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


def predictability_heatmaps(matrices: Mapping[str, pd.DataFrame], title: str = "U(layer j | layer i)"):
    """Side-by-side layer x layer heatmaps (rows: from layer i, columns: to layer j), one per entry,
    on one colour scale; the diagonal (trivially 1) is masked."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.6 * len(matrices), 3.9), squeeze=False)
    off = [m.to_numpy()[~np.eye(len(m), dtype=bool)] for m in matrices.values()]
    vmax = max(float(np.nanmax(v)) for v in off if v.size) if any(v.size for v in off) else 1.0
    for ax, (name, m) in zip(axes[0], matrices.items()):
        sns.heatmap(m, ax=ax, mask=np.eye(len(m), dtype=bool), vmin=0, vmax=vmax, cmap="magma",
                    annot=len(m) <= 8, fmt=".2f", annot_kws={"size": 7}, square=True)
        ax.set(title=name, xlabel="to layer j", ylabel="from layer i")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def hop_curves(curves: Mapping[str, pd.DataFrame]):
    """Accuracy of predicting layer l+h's top-1 expert from layer l's against h: the lookup table and
    the prior (most used expert) per curve, and the uncertainty coefficient."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.3))
    for i, (name, c) in enumerate(curves.items()):
        colour = f"C{i}"
        a.plot(c["hop"], 100 * c["lookup_accuracy"], marker="o", color=colour, label=f"{name}: lookup")
        a.plot(c["hop"], 100 * c["prior_accuracy"], ls="--", color=colour, label=f"{name}: prior")
        b.plot(c["hop"], c["uncertainty"], marker="o", color=colour, label=name)
    a.set(xlabel="hop h (layers ahead)", ylabel="top-1 accuracy (%)", title="hop accuracy")
    b.set(xlabel="hop h (layers ahead)", ylabel="U", title="uncertainty coefficient", ylim=(0, None))
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def usage_heatmaps(usage: Mapping[str, np.ndarray]):
    """Per-dataset (L, E) expert usage side by side, plus their difference (first minus second)."""
    names = list(usage)
    grids = [np.asarray(usage[n]) for n in names]
    panels = len(grids) + (len(grids) == 2)
    fig, axes = plt.subplots(1, panels, figsize=(4.3 * panels, 3.2), squeeze=False)
    vmax = max(float(g.max()) for g in grids)
    for ax, name, g in zip(axes[0], names, grids):
        sns.heatmap(g, ax=ax, vmin=0, vmax=vmax, cmap="viridis", annot=g.shape[1] <= 8, fmt=".2f",
                    annot_kws={"size": 6}, cbar=False)
        ax.set(title=f"{name}: share of routing slots", xlabel="expert", ylabel="layer")
    if len(grids) == 2:
        diff = grids[0] - grids[1]
        lim = float(np.abs(diff).max()) or 1.0
        sns.heatmap(diff, ax=axes[0][-1], vmin=-lim, vmax=lim, cmap="RdBu_r", annot=diff.shape[1] <= 8,
                    fmt="+.2f", annot_kws={"size": 6}, cbar=False)
        axes[0][-1].set(title=f"{names[0]} − {names[1]}", xlabel="expert", ylabel="layer")
    fig.tight_layout()
    return fig
