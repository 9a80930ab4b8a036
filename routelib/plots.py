"""Figures and colours shared by several notebooks (matplotlib + seaborn). Each function draws into
given axes or makes its own figure and returns it; none of them computes the numbers it shows.
Each study's own figures and dashboards sit beside this module, in ``views/<study>.py``."""

from __future__ import annotations

from typing import Mapping

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

# Ten distinguishable colours (matplotlib's tab10), one per expert id modulo 10.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


def plot_training_curves(histories: Mapping[str, list[dict]], key: str = "lm_loss", ax=None):
    """Loss against step for several runs (``TrainResult.history`` each)."""
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    for name, history in histories.items():
        rows = [r for r in history if key in r or "loss" in r]
        ax.plot([r["step"] for r in rows], [r.get(key, r.get("loss")) for r in rows], label=name)
    ax.set(xlabel="step", ylabel=key.replace("_", " "), title="training loss")
    ax.legend()
    return ax.figure


def plot_perplexity_by_domain(table: pd.DataFrame, ax=None):
    """Grouped bars: perplexity per domain (columns ``ppl_<domain>``) for each model (index)."""
    cols = [c for c in table.columns if c.startswith("ppl_")]
    long = table[cols].rename(columns=lambda c: c[4:]).reset_index().melt(id_vars=table.index.name or "index",
                                                                         var_name="domain", value_name="perplexity")
    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    sns.barplot(data=long, x="domain", y="perplexity", hue=table.index.name or "index", ax=ax)
    ax.set(title="held-out perplexity (lower is better)")
    return ax.figure
