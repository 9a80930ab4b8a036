"""Figures of the pathway study (notebook 01): the seed's 4-panel monosemanticity figure, with the
controls drawn beside the fine-tuned router, and purity per domain.

Like :mod:`routelib.plots`, every function takes tables computed by :mod:`routelib.pathway_study`
and only draws them; it returns the figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

# One colour per router, the fine-tuned one first (pathway_study.ROUTERS order).
ROUTER_COLOURS = {"fine-tuned": "#1f77b4", "untrained": "#ff7f0e", "random top-k": "#7f7f7f", "permuted": "#2ca02c"}


def _colour(name: str, i: int) -> str:
    return ROUTER_COLOURS.get(name, sns.color_palette()[i % 10])


def purity_across_layers(summary: pd.DataFrame, ax=None):
    """Mean (load-weighted) purity per routed layer, one line per router (``summary`` from
    :func:`routelib.pathway_study.summary_table`), with the purity of the whole token stream."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for i, (name, g) in enumerate(summary.groupby("router", sort=False)):
        ax.plot(g["layer"], g["mean_purity"], marker="o", ms=4, label=name, color=_colour(name, i))
    ax.axhline(summary["corpus_purity"].iloc[0], color="black", ls=":", lw=1, label="all tokens together")
    ax.set(xlabel="layer", ylabel="purity 1 - H / log V", title="(a) pathway purity across layers")
    ax.legend(fontsize=7)
    return ax.figure


def purity_distribution(purities: pd.DataFrame, ax=None, bins: int = 30):
    """Histogram of per-pathway purity (all layers pooled), one outline per router (``purities``
    from :func:`routelib.pathway_study.pathway_purities`)."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    used = purities[purities["selections"] > 0]
    edges = np.histogram_bin_edges(used["purity"], bins=bins)
    for i, (name, g) in enumerate(used.groupby("router", sort=False)):
        ax.hist(g["purity"], bins=edges, histtype="step", lw=1.5, label=name, color=_colour(name, i))
    ax.set(xlabel="purity of one pathway", ylabel="pathways", title="(b) distribution of purity")
    ax.legend(fontsize=7)
    return ax.figure


def top_pathways(top: pd.DataFrame, ax=None, control: str = "permuted", max_label: int = 38):
    """Horizontal bars: purity of the most specialised pathways (``top`` from
    :func:`routelib.pathway_study.specialised_pathways`), a tick at the same pathway's purity under
    ``control``, labelled with layer, pathway and top tokens."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    rows = top.iloc[::-1]
    y = np.arange(len(rows))
    ax.barh(y, rows["purity"], color=ROUTER_COLOURS["fine-tuned"], label="fine-tuned")
    ax.scatter(rows[f"purity_{control}"], y, marker="|", s=200, color=ROUTER_COLOURS.get(control, "k"),
               label=f"{control} control", zorder=3)
    labels = [f"L{r.layer} P{r.pathway}: {r.top_tokens}" for r in rows.itertuples()]
    ax.set_yticks(y, [lab if len(lab) <= max_label else lab[:max_label - 1] + "…" for lab in labels], fontsize=7)
    lo = float(min(rows["purity"].min(), rows[f"purity_{control}"].min()))
    ax.set_xlim(max(0.0, lo - 0.05), 1.0)
    ax.set(xlabel="purity", title="(c) most specialised pathways (vs control)")
    ax.legend(fontsize=7, loc="lower right")
    return ax.figure


def utilisation_by_layer(summary: pd.DataFrame, ax=None):
    """Utilisation (share of pathways with load >= min_load) as bars and load balance
    H(load)/log N as lines, per layer and router."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    names = list(dict.fromkeys(summary["router"]))
    layers = sorted(summary["layer"].unique())
    width = 0.8 / len(names)
    x = np.arange(len(layers))
    for i, name in enumerate(names):
        g = summary[summary["router"] == name].set_index("layer").loc[layers]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, g["utilisation"], width, color=_colour(name, i), alpha=0.45,
               label=f"{name} utilisation")
        ax.plot(x, g["load_balance"], marker=".", color=_colour(name, i), label=f"{name} load balance")
    ax.set_xticks(x, [str(layer) for layer in layers])
    ax.set_ylim(0, 1.5)  # head room for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set(xlabel="layer", ylabel="fraction", title="(d) utilisation and load balance by layer")
    ax.legend(fontsize=6, ncol=2, loc="upper center")
    return ax.figure


def monosemanticity_figure(summary: pd.DataFrame, purities: pd.DataFrame, top: pd.DataFrame):
    """The seed's 4-panel figure -- purity across layers, distribution of purity, top specialised
    pathways with their tokens, utilisation by layer -- every panel with the controls."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    purity_across_layers(summary, axes[0, 0])
    purity_distribution(purities, axes[0, 1])
    top_pathways(top, axes[1, 0])
    utilisation_by_layer(summary, axes[1, 1])
    fig.tight_layout()
    return fig


def purity_by_domain(table: pd.DataFrame, ax=None):
    """Grouped bars: mean purity on each domain's tokens (rows) for each router (columns), the
    table of :func:`routelib.pathway_study.purity_per_domain`."""
    long = table.reset_index().melt(id_vars="domain", var_name="router", value_name="purity")
    ax = ax or plt.subplots(figsize=(7, 3.2))[1]
    sns.barplot(data=long, x="domain", y="purity", hue="router", ax=ax,
                palette=[_colour(n, i) for i, n in enumerate(table.columns)])
    ax.set_ylim(max(0.0, long["purity"].min() - 0.05), min(1.0, long["purity"].max() + 0.03))
    ax.set(title="purity of the pathways on each domain's tokens (mean over layers)")
    ax.legend(fontsize=7)
    return ax.figure


__all__ = ["monosemanticity_figure", "purity_across_layers", "purity_by_domain", "purity_distribution",
           "top_pathways", "utilisation_by_layer"]
