"""Interactive views for the notebooks (ipywidgets). The HTML each view shows is built by a plain
function (tested without a browser); the widget only wires controls to it."""

from __future__ import annotations

import html
from typing import Mapping

import torch

# Ten distinguishable colours (matplotlib's tab10), one per expert id modulo 10.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


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
    """The seed's Streamlit dashboard inside the notebook: pick a held-out sample or type text,
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
