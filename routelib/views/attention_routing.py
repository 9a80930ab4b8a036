"""Views of notebook 02 (dynamic GDN/softmax routing): training and routing curves, the alpha
sweep, inference throughput, and held-out text coloured by each token's routing. Every function
takes what :mod:`routelib.studies.attention_routing` computed and only draws it."""

from __future__ import annotations

import html

import matplotlib.pyplot as plt
import pandas as pd

from routelib.studies.attention_routing import HybridStudyConfig, StudyRuns, main_runs

ROUTE_COLOURS = ("#ffffff", "#fdd49e", "#e34a33")  # 0, 1, 2 routed layers on softmax


def routing_html(tokens: pd.DataFrame, title: str = "") -> str:
    """Tokens of one window (rows of :func:`route_tokens`) highlighted by how many routed layers
    sent them to softmax (white: none, light: one, dark: two); hovering shows each layer's decision
    and router probability."""
    layers = [c[len("softmax_"):] for c in tokens.columns if c.startswith("softmax_L")]
    spans = []
    for _, row in tokens.iterrows():
        n = int(sum(bool(row[f"softmax_{layer}"]) for layer in layers))
        tip = "; ".join(f"{layer}: {'softmax' if row[f'softmax_{layer}'] else 'GDN'} (p_softmax={row[f'p_softmax_{layer}']:.2f})"
                        for layer in layers)
        text = html.escape(row["token"]).replace("\n", "↵<br>") or "&nbsp;"
        spans.append(f'<span title="{html.escape(tip)}" style="background:{ROUTE_COLOURS[min(n, 2)]};'
                     f'color:{"white" if n >= 2 else "black"};white-space:pre-wrap;font-family:monospace">{text}</span>')
    legend = " ".join(f'<span style="background:{c};color:{"white" if i == 2 else "black"};padding:0 4px;'
                      f'border:1px solid #ccc">{i} layer(s) on softmax</span>' for i, c in enumerate(ROUTE_COLOURS))
    head = f"<b>{html.escape(title)}</b> " if title else ""
    return f"<div>{head}{legend}</div><div style='line-height:1.6'>{''.join(spans)}</div>"


# ------------------------------------------------------------------------------------- figures
def plot_training(study: StudyRuns, cfg: HybridStudyConfig):
    """Training loss of every main run (static solid, dynamic dashed); the routing of every dynamic
    run (alpha sweep included) over training: share of tokens sent to softmax per routed layer (one
    colour per run, first routed layer solid, later ones dotted) and the balance loss."""
    main = main_runs(study.table, cfg)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for name, spec in main.iterrows():
        hist = study.results[name].history
        axes[0].plot([r["step"] for r in hist], [r["lm_loss"] for r in hist],
                     ls="-" if spec["arm"] == "static" else "--", label=name)
    dynamic = study.table[study.table["arm"] == "dynamic"]
    for k, name in enumerate(dynamic.index):
        hist, colour = study.results[name].history, f"C{k % 10}"
        steps = [r["step"] for r in hist]
        for j, col in enumerate(c for c in hist[-1] if c.startswith("softmax_frac_L")):
            axes[1].plot(steps, [100 * r[col] for r in hist], color=colour, ls="-" if j == 0 else ":",
                         label=f"{name} {col[len('softmax_frac_'):]}")
        axes[2].plot(steps, [r["balance_loss"] for r in hist], color=colour, label=name)
    axes[0].set(xlabel="step", ylabel="train LM loss", title="training loss")
    axes[1].set(xlabel="step", ylabel="% tokens to softmax", title="routing split (training, Gumbel)", ylim=(-2, 102))
    axes[2].set(xlabel="step", ylabel="2 Σ f·P (1 = balanced)", title="balance loss")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def plot_alpha_sweep(sweep: pd.DataFrame):
    """Held-out share of tokens on softmax per routed layer against alpha (symlog x axis)."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for col in [c for c in sweep.columns if c.startswith("softmax_frac_L")]:
        ax.plot(sweep.index, 100 * sweep[col], marker="o", label=col[-2:])
    ax.axhline(50, color="gray", ls=":")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(-0.002, 2 * max(sweep.index.max(), 0.01))
    ax.set(xlabel="load-balancing weight α", ylabel="% tokens to softmax", title="routing split vs α", ylim=(-2, 102))
    ax.legend()
    fig.tight_layout()
    return fig


def plot_speed(speed: pd.DataFrame):
    """Prefill tokens/s against sequence length for every model of :func:`inference_speed`."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, grp in speed.groupby("model", sort=False):
        ax.plot(grp["seq_len"], grp["tokens_per_s"], marker="o", label=name)
    lens = sorted(speed["seq_len"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(lens, [str(t) for t in lens])
    ax.set(xlabel="sequence length", ylabel="prefill tokens/s", title="inference throughput")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
