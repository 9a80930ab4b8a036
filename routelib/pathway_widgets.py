"""Pathway explorer for notebook 01 (ipywidgets): pick a routed layer and a pathway, see its top
tokens (count, share, lift over the corpus), the domains it serves and held-out contexts in which
it fired. The HTML is built by :func:`pathway_html`, a plain function tested without a browser;
:func:`pathway_explorer` only wires controls to it (the convention of :mod:`routelib.widgets`)."""

from __future__ import annotations

import html
from typing import Callable, Mapping

import numpy as np

from routelib.errors import ConfigError
from routelib.metrics import PathwayMetrics
from routelib.pathway_study import RoutingSample, pathway_contexts, pathway_domains

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


__all__ = ["pathway_explorer", "pathway_html", "purest_pathway"]
