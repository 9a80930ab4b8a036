"""The routing dashboard of notebook 04's original project (a small public Mixtral routing analysis)
on recorded traces: pick a dataset, a problem and a token, and follow that token through every MoE
layer with the gate's confidence.

The views are plain functions returning HTML (tested without a browser); :func:`routing_dashboard`
only wires ipywidgets controls to them.
"""

from __future__ import annotations

import html
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from routelib.routing.record.traces import TraceArrays, TraceError
from routelib.plots import PALETTE


def journey(df: pd.DataFrame, arrays: TraceArrays, row: int) -> pd.DataFrame:
    """One token's route: a row per MoE layer with its experts (slot order), their gate weights,
    the top-1 expert's weight (``confidence``) and, when the full distribution was recorded, the
    router entropy in bits. ``row`` is a positional index into ``df``/``arrays``."""
    if not 0 <= row < len(df):
        raise IndexError(f"row {row} is outside the {len(df)} traced tokens")
    experts, weights = arrays.experts[row], arrays.weights[row]  # (L, k) each
    table = pd.DataFrame({"layer": np.arange(len(experts)),
                          "experts": [tuple(int(e) for e in es) for es in experts],
                          "weights": [tuple(round(float(w), 3) for w in ws) for ws in weights],
                          "confidence": weights[:, 0].astype(float)})
    if arrays.probs is not None:
        p = arrays.probs[row].astype(np.float64)  # (L, E)
        with np.errstate(divide="ignore", invalid="ignore"):
            table["router_entropy_bits"] = np.where(p > 0, -p * np.log2(p), 0).sum(1)
    return table


def _token_span(text: str, style: str, title: str = "") -> str:
    shown = html.escape(text).replace("\n", "↵<br>") or "&nbsp;"
    return f'<span title="{html.escape(title)}" style="{style}">{shown}</span>'


def journey_html(df: pd.DataFrame, arrays: TraceArrays, row: int, num_experts: int, context: int = 40) -> str:
    """HTML for one token: its problem's text around it (prompt tokens grey, generated black, the
    token boxed) and a layers x experts grid where the chosen experts are coloured with opacity =
    gate weight, annotated with the weight."""
    if not 0 <= row < len(df):
        raise IndexError(f"row {row} is outside the {len(df)} traced tokens")
    token = df.iloc[row]
    same = (df["dataset"].to_numpy() == token["dataset"]) & (df["problem_id"].to_numpy() == token["problem_id"])
    rows = np.flatnonzero(same)
    lo, hi = max(rows[0], row - context), min(rows[-1], row + context)
    spans = []
    for r in range(lo, hi + 1):
        t = df.iloc[r]
        colour = "#999" if t["phase"] == "prompt" else "#000"
        box = "outline:2px solid #d62728;" if r == row else ""
        spans.append(_token_span(t["token_text"], f"color:{colour};{box}white-space:pre-wrap;font-family:monospace",
                                 f"position {t['position']} ({t['phase']})"))
    experts, weights = arrays.experts[row], arrays.weights[row]  # (L, k)
    head = "".join(f"<th>e{e}</th>" for e in range(num_experts))
    grid = []
    for layer in range(len(experts)):
        cells = []
        for e in range(num_experts):
            hit = np.flatnonzero(experts[layer] == e)
            if hit.size:
                w = float(weights[layer, hit[0]])
                alpha = int(48 + 207 * min(max(w, 0.0), 1.0))
                cells.append(f'<td style="background:{PALETTE[e % 10]}{alpha:02x};text-align:center">{w:.2f}</td>')
            else:
                cells.append("<td></td>")
        grid.append(f"<tr><th>L{layer}</th>{''.join(cells)}</tr>")
    title = (f"<b>{html.escape(str(token['dataset']))} · {html.escape(str(token['problem_id']))} · position "
             f"{token['position']} ({token['phase']}) · token {html.escape(repr(token['token_text']))}</b>")
    return (f"<div>{title}</div><div style='margin:4px 0'>{''.join(spans)}</div>"
            f"<table style='border-collapse:collapse'><tr><th></th>{head}</tr>{''.join(grid)}</table>"
            "<div style='color:#666'>cell = gate weight of a chosen expert (opacity follows it)</div>")


def routing_dashboard(df: pd.DataFrame, arrays: TraceArrays, num_experts: int):
    """ipywidgets: dataset -> problem -> token position; shows :func:`journey_html` for the pick."""
    import ipywidgets as W

    if len(df) == 0:
        raise TraceError("the traces hold no tokens: nothing to show")
    index = {key: np.asarray(rows) for key, rows in  # (dataset, problem_id) -> positional rows
             df.reset_index(drop=True).groupby(["dataset", "problem_id"], sort=False).indices.items()}
    datasets = list(dict.fromkeys(df["dataset"]))
    pick_dataset = W.Dropdown(options=datasets, description="dataset")
    pick_problem = W.Dropdown(description="problem")
    pick_token = W.IntSlider(description="position", min=0, continuous_update=False)
    view = W.HTML()

    def rows() -> np.ndarray:
        return index[(pick_dataset.value, pick_problem.value)]

    def show(*_):
        r = rows()
        view.value = journey_html(df, arrays, int(r[min(pick_token.value, len(r) - 1)]), num_experts)

    def on_dataset(*_):
        problems = [p for d, p in index if d == pick_dataset.value]
        pick_problem.options = problems
        pick_problem.value = problems[0]

    def on_problem(*_):
        pick_token.max = len(rows()) - 1
        pick_token.value = min(pick_token.value, pick_token.max)
        show()

    pick_dataset.observe(on_dataset, names="value")
    pick_problem.observe(on_problem, names="value")
    pick_token.observe(show, names="value")
    on_dataset()
    on_problem()
    return W.VBox([W.HBox([pick_dataset, pick_problem]), pick_token, view])


def plot_predictability_heatmaps(matrices: Mapping[str, pd.DataFrame], title: str = "U(layer j | layer i)"):
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


def plot_hop_curves(curves: Mapping[str, pd.DataFrame]):
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


def plot_usage_heatmaps(usage: Mapping[str, np.ndarray]):
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


def plot_locality_curves(table: pd.DataFrame, *, distance: int = 1, group: str = "all",
                    measures: tuple[str, ...] = ("top1_same", "set_shared")):
    """Routing across consecutive tokens per layer (a table of
    :func:`routelib.routing.analyse.locality.consecutive_routing`): one panel per measure, one colour per
    phase; the rate with its bootstrap interval (band), the usage chance (dashed), the in-sequence
    chance (dotted) and uniform routing (grey)."""
    rows = table[(table["distance"] == distance) & (table["group"] == group)]
    fig, axes = plt.subplots(1, len(measures), figsize=(4.8 * len(measures), 3.4), squeeze=False)
    for ax, measure in zip(axes[0], measures):
        part = rows[rows["measure"] == measure]
        for i, (phase, p) in enumerate(part.groupby("phase", sort=False)):
            colour = f"C{i}"
            ax.plot(p["layer"], 100 * p["rate"], marker="o", color=colour, label=f"{phase}")
            ax.fill_between(p["layer"], 100 * p["ci_low"], 100 * p["ci_high"], color=colour, alpha=0.2)
            ax.plot(p["layer"], 100 * p["chance"], ls="--", color=colour, label=f"{phase}: chance (usage)")
            ax.plot(p["layer"], 100 * p["chance_in_sequence"], ls=":", color=colour)
        if len(part):
            ax.axhline(100 * part["chance_uniform"].iloc[0], color="grey", lw=0.8, label="uniform routing")
            ax.set_xticks(sorted(part["layer"].unique()))
        ax.set(title=f"{measure} ({group}, d = {distance})", xlabel="MoE layer", ylabel="% of token pairs")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def plot_locality_decay(table: pd.DataFrame, *, measure: str = "top1_same", group: str = "all", phase: str = "prompt"):
    """The rate at distance d = 1, 2, ... per layer (solid), each layer's in-sequence chance at d = 1
    (dotted): how fast the sharing of experts between tokens d apart fades."""
    rows = table[(table["measure"] == measure) & (table["group"] == group) & (table["phase"] == phase)]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for layer, part in rows.groupby("layer"):
        colour = f"C{layer % 10}"
        ax.plot(part["distance"], 100 * part["rate"], marker=".", color=colour, label=f"layer {layer}")
        ax.axhline(100 * part["chance"].iloc[0], color=colour, ls=":", lw=0.8)
    ax.set(title=f"{measure} at distance d ({group}, {phase} tokens; dotted: usage chance)",
           xlabel="distance d (tokens)", ylabel="% of token pairs")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


#: The panels of :func:`plot_real_moe_comparison`: statistic -> panel title.
REAL_MOE_PANELS = {"usage_entropy": "usage entropy / log E", "max_share": "largest expert's share",
                   "domain_tv": "domain specialization (TV from pooled)",
                   "vocabulary": "vocabulary: occurrences to the token's top expert",
                   "transition_u": "first choice: U(later | earlier)",
                   "repeat_top1": "consecutive tokens: same first choice"}


def _depth_panel(ax, rows: pd.DataFrame, colours: Mapping[str, str]):
    """One statistic against relative depth: a line per model, the range over domains as error bars."""
    for model, part in rows.groupby("model_name", sort=False):
        part = part.sort_values("relative_depth")
        spread = part[["low", "high"]].notna().all(axis=1)
        ax.plot(part["relative_depth"], part["value"], marker="o", color=colours[model], label=model)
        if spread.any():
            err = np.vstack([part["value"] - part["low"], part["high"] - part["value"]])[:, spread.to_numpy()]
            ax.errorbar(part["relative_depth"][spread], part["value"][spread], yerr=err, fmt="none",
                        color=colours[model], capsize=2, lw=0.8)
    ax.set(xlabel="relative depth (layer / last layer)", xlim=(-0.05, 1.05))


def _transition_panel(ax, rows: pd.DataFrame, colours: Mapping[str, str], order: list[str]):
    """The uncertainty coefficient per transition (by depth names), a marker per model."""
    models = list(dict.fromkeys(rows["model_name"]))
    for i, (model, part) in enumerate(rows.groupby("model_name", sort=False)):
        x = np.array([order.index(d) for d in part["depth"]]) + 0.12 * (i - (len(models) - 1) / 2)
        ax.scatter(x, part["value"], color=colours[model], label=model, zorder=3)
    ax.set_xticks(range(len(order)), order, rotation=20, fontsize=7)


def plot_real_moe_comparison(table: pd.DataFrame, transitions: list[str] | None = None):
    """Section 9's figure from a :func:`routelib.studies.routing_traces.real_moe_comparison` table: one
    panel per statistic of :data:`REAL_MOE_PANELS`, a colour per model (the quoted paper figures
    included where they exist); single-layer statistics against relative depth (bars: the range over
    domains), transitions by depth, the consecutive-token rate with each model's chance level."""
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(table["model_name"]))}
    order = transitions or list(dict.fromkeys(table.loc[table["statistic"] == "transition_u", "depth"]))
    fig, axes = plt.subplots(2, 3, figsize=(13.5, 6.6))
    for ax, (statistic, title) in zip(axes.ravel(), REAL_MOE_PANELS.items()):
        rows = table[table["statistic"] == statistic]
        if statistic == "transition_u":
            _transition_panel(ax, rows, colours, order)
        else:
            _depth_panel(ax, rows, colours)
        if statistic == "repeat_top1":  # each model's chance level (its domains' usage), dashed
            for model, part in table[table["statistic"] == "repeat_chance"].groupby("model_name", sort=False):
                part = part.sort_values("relative_depth")
                ax.plot(part["relative_depth"], part["value"], ls="--", lw=0.9, color=colours[model])
            title += " (dashed: chance)"
        ax.set_title(title, fontsize=9)
        ax.set_ylim(bottom=0)
    handles = {label: h for ax in axes.ravel() for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig
