"""Views of the pathway study (notebook 01): the original project's 4-panel monosemanticity figure, with the
controls drawn beside the fine-tuned router, purity per domain, and the pathway explorer.

Every figure takes tables computed by :mod:`routelib.studies.pathways` and only draws them; it
returns the figure. The explorer (ipywidgets) picks a routed layer and a pathway and shows its top
tokens (count, share, lift over the corpus), the domains it serves and held-out contexts in which it
fired; its HTML is built by :func:`pathway_html`, a plain function tested without a browser, and
:func:`pathway_explorer` only wires controls to it.
"""

from __future__ import annotations

import html
from typing import Callable, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from routelib.errors import ConfigError
from routelib.metrics import PathwayMetrics
from routelib.studies.pathways import RoutingSample, pathway_contexts, pathway_domains

# One colour per router, the fine-tuned one first (routelib.studies.pathways.ROUTERS order).
ROUTER_COLOURS = {"fine-tuned": "#1f77b4", "untrained": "#ff7f0e", "random top-k": "#7f7f7f", "permuted": "#2ca02c"}


def _colour(name: str, i: int) -> str:
    return ROUTER_COLOURS.get(name, sns.color_palette()[i % 10])


def plot_purity_across_layers(summary: pd.DataFrame, ax=None):
    """Mean (load-weighted) purity per routed layer, one line per router (``summary`` from
    :func:`routelib.studies.pathways.summary_table`), with the purity of the whole token stream."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for i, (name, g) in enumerate(summary.groupby("router", sort=False)):
        ax.plot(g["layer"], g["mean_purity"], marker="o", ms=4, label=name, color=_colour(name, i))
    ax.axhline(summary["corpus_purity"].iloc[0], color="black", ls=":", lw=1, label="all tokens together")
    ax.set(xlabel="layer", ylabel="purity 1 - H / log V", title="(a) pathway purity across layers")
    ax.legend(fontsize=7)
    return ax.figure


def plot_purity_distribution(purities: pd.DataFrame, ax=None, bins: int = 30):
    """Histogram of per-pathway purity (all layers pooled), one outline per router (``purities``
    from :func:`routelib.studies.pathways.pathway_purities`)."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    used = purities[purities["selections"] > 0]
    edges = np.histogram_bin_edges(used["purity"], bins=bins)
    for i, (name, g) in enumerate(used.groupby("router", sort=False)):
        ax.hist(g["purity"], bins=edges, histtype="step", lw=1.5, label=name, color=_colour(name, i))
    ax.set(xlabel="purity of one pathway", ylabel="pathways", title="(b) distribution of purity")
    ax.legend(fontsize=7)
    return ax.figure


def plot_top_pathways(top: pd.DataFrame, ax=None, control: str = "permuted", max_label: int = 38):
    """Horizontal bars: purity of the most specialised pathways (``top`` from
    :func:`routelib.studies.pathways.specialised_pathways`), a tick at the same pathway's purity under
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


def plot_utilisation_by_layer(summary: pd.DataFrame, ax=None):
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


def plot_monosemanticity(summary: pd.DataFrame, purities: pd.DataFrame, top: pd.DataFrame):
    """The original project's 4-panel figure -- purity across layers, distribution of purity, top specialised
    pathways with their tokens, utilisation by layer -- every panel with the controls."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    plot_purity_across_layers(summary, axes[0, 0])
    plot_purity_distribution(purities, axes[0, 1])
    plot_top_pathways(top, axes[1, 0])
    plot_utilisation_by_layer(summary, axes[1, 1])
    fig.tight_layout()
    return fig


def plot_purity_by_domain(table: pd.DataFrame, ax=None):
    """Grouped bars: mean purity on each domain's tokens (rows) for each router (columns), the
    table of :func:`routelib.studies.pathways.purity_per_domain`."""
    long = table.reset_index().melt(id_vars="domain", var_name="router", value_name="purity")
    ax = ax or plt.subplots(figsize=(7, 3.2))[1]
    sns.barplot(data=long, x="domain", y="purity", hue="router", ax=ax,
                palette=[_colour(n, i) for i, n in enumerate(table.columns)])
    ax.set_ylim(max(0.0, long["purity"].min() - 0.05), min(1.0, long["purity"].max() + 0.03))
    ax.set(title="purity of the pathways on each domain's tokens (mean over layers)")
    ax.legend(fontsize=7)
    return ax.figure


# ------------------------------------------------------------------------------ reference run
RUN_STYLES = {"glbl": "-", "switch": "--"}  # line style per arm; colour per grouping, shade per seed


def _run_style(run: str, arm: str, grouping: str, seed: int) -> dict:
    """Line style of one reference run: colour by grouping (shade by seed), dash by arm, labelled by name."""
    palette = {"coactivation": sns.color_palette("Blues_r", 4), "contiguous": sns.color_palette("Oranges_r", 4),
               "weights": sns.color_palette("Greens_r", 4)}.get(grouping, sns.color_palette("Greys_r", 4))
    return dict(color=palette[min(int(seed), 3)], ls=RUN_STYLES.get(arm, ":"), marker=".", label=run)


def plot_recovery_curves(curves: pd.DataFrame, base_ppl: float, target: float, scale: str = "log"):
    """Held-out perplexity (log axis) and the share of the gap closed (on ``scale``) against training
    tokens, one line per reference run (``curves`` from
    :func:`routelib.studies.pathways.reference.recovery_curves`), with the base model and the target."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    for run, g in curves.groupby("run", sort=False):
        style = _run_style(run, g["arm"].iloc[0], g["grouping"].iloc[0], g["seed"].iloc[0])
        axes[0].plot(g["tokens"] / 1e3, g["ppl"], **style)
        axes[1].plot(g["tokens"] / 1e3, g[f"recovery_{scale}"], **style)
    axes[0].axhline(base_ppl, color="black", ls=":", lw=1, label=f"base model {base_ppl:.1f}")
    axes[0].set_yscale("log")
    axes[1].axhline(target, color="black", ls=":", lw=1, label=f"target {target:.0%}")
    axes[0].set(xlabel="training tokens (k)", ylabel="held-out perplexity (curve windows)",
                title="perplexity while the routed model trains")
    axes[1].set(xlabel="training tokens (k)", ylabel=f"share of the gap closed ({scale})", ylim=(-0.05, 1.05),
                title="recovery of the gap untrained routing -> base")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_purity_intervals(purity: pd.DataFrame, run: str, by: str = "layer"):
    """One reference run per routed layer (``by="layer"``, every position) or per domain (``by="domain"``,
    mean over layers), 95 % bootstrap intervals over held-out windows (``purity`` from
    :func:`routelib.studies.pathways.reference.purity_intervals`): (left) the purity of the trained
    router and each control; (right) trained minus each control, paired on the same resamples -- the
    interval that decides whether the trained router is purer."""
    if by not in ("layer", "domain"):
        raise ConfigError(f"purity_intervals: by={by!r}: choose 'layer' or 'domain'")
    other = "domain" if by == "layer" else "layer"
    rows = purity[(purity["run"] == run) & (purity[other] == "all") & (purity[by] != "all")]
    if rows.empty:
        raise ConfigError(f"purity_intervals: no rows for run {run!r} by {by}")
    fig, axes = plt.subplots(1, 2, figsize=(14, 3.6))
    names = list(dict.fromkeys(rows["router"]))
    keys = list(dict.fromkeys(rows[by]))
    for ax, stat, shown in ((axes[0], "purity", names), (axes[1], "trained_minus", names[1:])):
        width = 0.8 / len(shown)
        for i, name in enumerate(shown):
            g = rows[rows["router"] == name].set_index(by).loc[keys]
            x = np.arange(len(keys)) + (i - (len(shown) - 1) / 2) * width
            ax.errorbar(x, g[stat], yerr=[g[stat] - g[f"{stat}_low"], g[f"{stat}_high"] - g[stat]], fmt="o", ms=3,
                        capsize=2, color=_colour(name, names.index(name)), label=name)
        ax.set_xticks(np.arange(len(keys)), keys)
        ax.legend(fontsize=7)
    axes[1].axhline(0, color="black", lw=0.8)
    axes[0].set(xlabel=by, ylabel="purity 1 - H / log V", title=f"{run}: purity by {by} (95 % intervals)")
    axes[1].set(xlabel=by, ylabel="trained - control", title="trained router minus each control, paired (95 %)")
    fig.tight_layout()
    return fig


def plot_balance_over_training(histories: Mapping[str, pd.DataFrame], runs: pd.DataFrame):
    """Held-out utilisation and load balance (mean over routed layers) at every evaluation of each
    reference run (``histories`` and ``runs`` of :func:`routelib.studies.pathways.reference.load_reference`)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.4))
    for run, h in histories.items():
        g = h.dropna(subset=["eval_load_balance"])
        style = _run_style(run, *runs.loc[run, ["arm", "grouping", "seed"]])
        axes[0].plot(g["tokens"] / 1e3, g["eval_utilisation"], **style)
        axes[1].plot(g["tokens"] / 1e3, g["eval_load_balance"], **style)
    axes[0].set(xlabel="training tokens (k)", ylabel="share of pathways used", title="utilisation (held out)", ylim=(0, 1.05))
    axes[1].set(xlabel="training tokens (k)", ylabel="H(load) / log N", title="load balance (held out)", ylim=(0, 1.05))
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ pathway explorer
DecodeIds = Callable[[list[int]], str]  # token ids -> text


def _token(decode_ids: DecodeIds, token_id: int) -> str:
    return html.escape(repr(decode_ids([token_id])))


def pathway_html(sample: RoutingSample, per_layer: Mapping[int, PathwayMetrics], layer: int, pathway: int,
                 decode_ids: DecodeIds, control: Mapping[int, PathwayMetrics] | None = None, n_tokens: int = 10,
                 n_examples: int = 4, window: int = 12, seed: int = 0) -> str:
    """One pathway as HTML: load and purity (beside ``control``'s purity for the same pathway, if
    given), a table of its ``n_tokens`` most frequent tokens with their share of the pathway's
    selections and lift over their share of all held-out tokens, its domain shares, and
    ``n_examples`` contexts (``window`` tokens) with the routed token highlighted."""
    if layer not in per_layer:
        raise ConfigError(f"layer {layer} is not routed; routed layers: {sorted(per_layer)}")
    m = per_layer[layer]
    if not 0 <= pathway < m.num_pathways:
        raise ConfigError(f"pathway {pathway} out of range [0, {m.num_pathways})")
    head = (f"<b>layer {layer}, pathway {pathway}</b>: {int(m.selections[pathway])} selections "
            f"({100 * m.load[pathway]:.1f} % of the layer's; uniform {100 / m.num_pathways:.1f} %), "
            f"{int(m.distinct[pathway])} distinct tokens")
    if m.selections[pathway] == 0:
        return f"<div>{head}: never selected on the held-out text.</div>"
    pur = f"purity {m.purity[pathway]:.3f}"
    if control is not None:
        pur += f" (same pathway under the control: {control[layer].purity[pathway]:.3f})"
    corpus_share = m.corpus_counts / max(m.corpus_counts.sum(), 1)  # (V,)
    rows = []
    for tid, count in m.top_tokens[pathway][:n_tokens]:
        share = count / m.selections[pathway]
        lift = share / corpus_share[tid] if corpus_share[tid] > 0 else float("nan")
        rows.append(f"<tr><td><code>{_token(decode_ids, tid)}</code></td><td>{count}</td>"
                    f"<td>{100 * share:.1f} %</td><td>{lift:.1f}x</td></tr>")
    table = ("<table><tr><th>token</th><th>count</th><th>share</th><th>lift</th></tr>"
             + "".join(rows) + "</table>")
    doms = pathway_domains(sample, layer, m.num_pathways).loc[pathway]
    dom = ", ".join(f"{c[6:]} {100 * doms[c]:.0f} % ({doms['lift_' + c[6:]]:.2f}x)"
                    for c in doms.index if c.startswith("share_"))
    examples = []
    for ex in pathway_contexts(sample, layer, pathway, decode_ids, n_examples, window=window, seed=seed):
        examples.append(f"<li><i>{html.escape(ex['domain'])}</i>: <code style='white-space:pre-wrap'>"
                        f"{html.escape(ex['context'])}<mark><b>{html.escape(ex['token'])}</b></mark></code></li>")
    return (f"<div>{head}; {pur}</div><div>domains (share, lift): {dom}</div>{table}"
            f"<div>contexts (routed token highlighted):</div><ul>{''.join(examples)}</ul>")


def pathway_explorer(sample: RoutingSample, per_layer: Mapping[int, PathwayMetrics], decode_ids: DecodeIds,
                     control: Mapping[int, PathwayMetrics] | None = None, start: tuple[int, int] | None = None):
    """Layer dropdown + pathway slider + example seed -> :func:`pathway_html`; starts on ``start``
    = (layer, pathway), by default the pathway with the highest purity."""
    import ipywidgets as W

    if not per_layer:
        raise ConfigError("pathway_explorer: no routed layers to explore")
    layers = sorted(per_layer)
    start_layer, start_pathway = purest_pathway(per_layer) if start is None else (int(start[0]), int(start[1]))
    if start_layer not in per_layer:
        raise ConfigError(f"pathway_explorer: start layer {start_layer} is not routed; routed layers: {layers}")
    layer = W.Dropdown(options=layers, value=start_layer, description="layer")
    pathway = W.IntSlider(value=start_pathway, min=0, max=per_layer[layers[0]].num_pathways - 1, description="pathway")
    seed = W.IntSlider(value=0, min=0, max=20, description="examples")
    view = W.HTML()

    def refresh(*_):
        view.value = pathway_html(sample, per_layer, layer.value, pathway.value, decode_ids, control,
                                  seed=seed.value)

    for control_widget in (layer, pathway, seed):
        control_widget.observe(refresh, names="value")
    refresh()
    return W.VBox([W.HBox([layer, pathway, seed]), view])


def purest_pathway(per_layer: Mapping[int, PathwayMetrics]) -> tuple[int, int]:
    """(layer, pathway) with the highest purity among pathways selected at least once."""
    best = max(((np.nan_to_num(m.purity[p], nan=-1.0), layer, p) for layer, m in per_layer.items()
                for p in range(m.num_pathways) if m.selections[p] > 0), default=None)
    if best is None:
        raise ConfigError("purest_pathway: no pathway was selected")
    return best[1], best[2]


__all__ = ["balance_over_training", "monosemanticity_figure", "pathway_explorer", "pathway_html", "purest_pathway",
           "purity_across_layers", "purity_by_domain", "purity_distribution", "purity_intervals", "recovery_curves",
           "top_pathways", "utilisation_by_layer"]
