"""Views of notebook 03 (MoE vs dense): expert share by domain, the capacity sweep, and the expert
dashboard (ipywidgets). The HTML each view shows is built by a plain function (tested without a
browser); the widget only wires controls to it."""

from __future__ import annotations

import html
import math
from typing import Mapping

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

from routelib.studies.moe_vs_dense import ARMS, MATCHED
from routelib.plots import PALETTE

@torch.no_grad()
def token_routes(model, tokenizer, text: str, max_tokens: int = 256) -> list[dict]:
    """Route ``text`` through an MoE LM: per token its text and, per layer, the top-k experts and
    gate weights. Returns [{"token": str, "experts": [[e1, e2], ...], "gates": [[w1, w2], ...]}]."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]  # (1, T)
    device = next(model.parameters()).device
    out = model(ids.to(device), output_router_logits=True)
    experts = torch.stack([r.indices for r in out.router], 1).cpu()  # (T, L, k)
    gates = torch.stack([r.weights.float() for r in out.router], 1).cpu()  # (T, L, k)
    return [dict(token=tokenizer.decode([t]), experts=experts[i].tolist(), gates=gates[i].tolist())
            for i, t in enumerate(ids[0].tolist())]


def routes_html(routes: list[dict], layer: int) -> str:
    """Tokens coloured by their top-1 expert at ``layer``; opacity = its gate weight; hovering
    shows every layer's top-k experts with gates."""
    spans = []
    for r in routes:
        e, g = r["experts"][layer][0], r["gates"][layer][0]
        tip = "; ".join(f"L{l}: " + ", ".join(f"e{x}:{w:.2f}" for x, w in zip(es, gs))
                        for l, (es, gs) in enumerate(zip(r["experts"], r["gates"])))
        text = html.escape(r["token"]).replace("\n", "↵<br>") or "&nbsp;"
        alpha = int(64 + 191 * min(max(g, 0.0), 1.0))
        spans.append(f'<span title="{html.escape(tip)}" style="background:{PALETTE[e % 10]}{alpha:02x};'
                     f'padding:1px 0;white-space:pre-wrap;font-family:monospace">{text}</span>')
    n_exp = max((max(x) for r in routes for x in r["experts"]), default=0) + 1
    legend = " ".join(f'<span style="background:{PALETTE[e % 10]};color:white;padding:0 4px">e{e}</span>'
                      for e in range(n_exp))
    return f"<div><b>layer {layer}</b>: colour = top-1 expert, opacity = its gate. {legend}</div><div>{''.join(spans)}</div>"


def expert_dashboard(model, tokenizer, samples: Mapping[str, str]):
    """The original project's Streamlit dashboard inside the notebook: pick a held-out sample or type text,
    choose a layer, and see each token coloured by its expert (hover for all layers' gates)."""
    import ipywidgets as W

    names = list(samples)
    pick = W.Dropdown(options=names, description="sample")
    text = W.Textarea(value=samples[names[0]], layout=W.Layout(width="100%", height="90px"))
    layer = W.IntSlider(min=0, max=model.config.num_layers - 1, description="layer")
    view = W.HTML()

    def refresh(*_):
        view.value = routes_html(token_routes(model, tokenizer, text.value), layer.value)

    pick.observe(lambda ch: setattr(text, "value", samples[ch["new"]]), names="value")
    text.observe(refresh, names="value")
    layer.observe(refresh, names="value")
    refresh()
    return W.VBox([W.HBox([pick, layer]), text, view])


def plot_expert_heatmaps(records: pd.DataFrame, value: str = "fraction"):
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


def plot_capacity_sweep(sweep: pd.DataFrame):
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


def plot_reference_curves(histories: Mapping[str, pd.DataFrame], key: str = "eval_loss"):
    """Held-out loss of every reference arm (``{"<arm>_seed<s>": history}``) against training tokens
    and against training FLOPs (3x the forward FLOPs per token: the compute-matched view)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for i, (name, h) in enumerate(sorted(histories.items())):
        rows = h.dropna(subset=[key])
        arm = name.rsplit("_seed", 1)[0]
        seed = int(name.rsplit("_seed", 1)[1]) if "_seed" in name else 0
        colour = PALETTE[(*ARMS, MATCHED).index(arm) if arm in (*ARMS, MATCHED) else i % 10]
        style = dict(color=colour, ls=("-", "--", ":", "-.")[seed % 4], label=name)
        axes[0].plot(rows["tokens"] / 1e6, rows[key], **style)
        axes[1].plot(rows["train_flops"] / 1e12, rows[key], **style)
    axes[0].set(xlabel="training tokens (M)", ylabel="held-out loss (nats)", title="loss against tokens")
    axes[1].set(xlabel="training FLOPs (TFLOP)", ylabel="held-out loss (nats)", title="loss against compute")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_specialisation_over_training(summary: pd.DataFrame):
    """Mutual information between a token's domain and its experts (bits) per MoE layer against the
    training step (``summary`` from ``routelib.studies.moe_vs_dense.specialisation_summary``)."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for layer, grp in summary.groupby("layer"):
        ax.plot(grp["step"], grp["mi_bits"], marker="o", label=f"layer {layer}")
    ax.set(xlabel="training step", ylabel="I(domain; expert) (bits)", title="expert specialisation by domain")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
