"""Views of notebook 02 (dynamic GDN/softmax routing): training and routing curves, the alpha
sweep, inference throughput, held-out text coloured by each token's routing, and the reference run's
figures. Every function takes what :mod:`routelib.studies.attention_routing` computed and only draws it."""

from __future__ import annotations

import html

import matplotlib.pyplot as plt
import pandas as pd

from routelib.studies.attention_routing import ARMS, HybridStudyConfig, StudyRuns, main_runs
from routelib.studies.attention_routing.reference import curve_bands, reference_numbers
from routelib.plots import PALETTE

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


# ------------------------------------------------------------------------------ reference run
def _bands(ax, bands: pd.DataFrame, label: str = "{arm}", ls: str = "-"):
    """Mean line and min-max seed band per arm of :func:`curve_bands` (tokens in millions)."""
    for arm, grp in bands.groupby("arm", sort=False):
        colour = PALETTE[list(ARMS).index(arm)]
        ax.plot(grp["tokens"] / 1e6, grp["mean"], color=colour, ls=ls, label=label.format(arm=arm))
        ax.fill_between(grp["tokens"] / 1e6, grp["low"], grp["high"], color=colour, alpha=0.2, lw=0)


def plot_reference_curves(ref: dict):
    """The shared-rate runs over training, mean over seeds with the min-max band: held-out loss on the
    curve windows against the unigram model (and the 1-nat line below it); the dynamic arm's share of
    tokens to softmax and router entropy per routed layer (training forwards, Gumbel noise)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    _bands(axes[0], curve_bands(ref, "eval_loss"))
    unigram = ref["summary"]["unigram_val_loss"]
    axes[0].axhline(unigram, color="gray", ls=":", label=f"unigram {unigram:.2f}")
    axes[0].axhline(unigram - 1, color="gray", ls="--", label="unigram − 1 nat")
    layers = sorted({c[len("softmax_frac_"):] for h in ref["histories"].values() for c in h.columns
                     if c.startswith("softmax_frac_")})  # routed layers: "L1", "L2"
    for j, layer in enumerate(layers):
        share = curve_bands(ref, f"softmax_frac_{layer}")
        share[["mean", "low", "high"]] *= 100
        _bands(axes[1], share, label=f"{{arm}} {layer}", ls="-" if j == 0 else ":")
        _bands(axes[2], curve_bands(ref, f"entropy_{layer}"), label=f"{{arm}} {layer}", ls="-" if j == 0 else ":")
    axes[0].set(xlabel="training tokens (M)", ylabel="held-out loss (nats)", title="validation loss (shared rate)")
    axes[1].set(xlabel="training tokens (M)", ylabel="% tokens to softmax", title="routing split over training", ylim=(-2, 102))
    axes[2].set(xlabel="training tokens (M)", ylabel="bits", title="router entropy over training", ylim=(-0.02, 1.02))
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_reference_delta(ref: dict):
    """Validation loss dynamic − static per seed at the shared rate, their mean with the 95 % t-interval,
    and the gap at the original project's unequal rates (one seed)."""
    v = reference_numbers(ref)
    d, per_seed = v["delta"], ref["delta"]["delta"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.scatter(per_seed, range(len(per_seed)), color=PALETTE[0], label="per seed (shared rate)")
    y = len(per_seed)
    ax.errorbar([d["mean"]], [y], xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o", color="black",
                capsize=4, label="mean, 95 % t-interval")
    ax.scatter([v["seed_lrs_delta"]], [y + 1], marker="s", color=PALETTE[3], label="original project's unequal rates")
    ax.axvline(0, color="gray", ls=":")
    ax.set_yticks(range(y + 2), [f"seed {s}" for s in per_seed.index] + ["mean", "unequal rates"])
    ax.set(xlabel="validation loss dynamic − static (nats; < 0: dynamic better)", title="the difference that decides")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_reference_routing(ref: dict, run: str):
    """Held-out share of tokens to softmax per routed layer of ``run`` (a dynamic run of the reference)
    by domain, token type and position bucket."""
    rows = ref["routing"][ref["routing"]["run"] == run]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), gridspec_kw={"width_ratios": [2, 3, 3]})
    for ax, by in zip(axes, ("domain", "type", "position")):
        table = rows[rows["by"] == by].pivot_table(index="group", columns="layer", values="softmax_share", sort=False)
        (100 * table).plot.bar(ax=ax, rot=30, width=0.8)
        ax.axhline(50, color="gray", ls=":")
        ax.set(xlabel=by, ylabel="% tokens to softmax", title=f"by {by}", ylim=(0, 100))
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(run, fontsize=9)
    fig.tight_layout()
    return fig
