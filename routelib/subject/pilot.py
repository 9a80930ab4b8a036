"""The pilot that chooses the subject's MoE shape: SmolLM2-135M-Instruct MoEfied several ways, measured.

For each variant (experts, top-k, shared-expert size) every MLP of the dense model is split by
co-activation on a sample of the training split and given a router fitted with MoEfication's
objective (:mod:`routelib.subject.router_fit`), with no further training. Held-out loss per domain is
then measured with the dense model, and with each MoE layer's k experts picked by the router, by
chance, and by the oracle (the k largest outputs): how much of the dense function top-k keeps, and
how much of that the router finds. Utilisation statistics tell whether the routers spread tokens.

    python -m routelib.subject pilot --out data/reference/subject_v3_pilot.csv
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from routelib.errors import ConfigError
from routelib.subject.moefy import MoEfiedMLP, SplitConfig, moefy_mlp
from routelib.subject.router_fit import RouterFitConfig, fit_router


@dataclass(frozen=True)
class PilotConfig:
    """What the pilot measures and on how much text."""

    fit_tokens: int = 16384  # training-split tokens (all domains) for the co-activation split and routers
    eval_windows: int = 4  # held-out windows per domain
    seq_len: int = 256  # tokens per window
    batch_size: int = 8  # windows per forward
    seed: int = 0  # window sampling and k-means initialisation


def mlp_inputs(model, input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """One no-grad pass of the dense model -> per layer (n, H) the inputs its MLP received."""
    from routelib.models.pathways import decoder_layers

    layers = decoder_layers(model)
    got: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [blk.mlp.register_forward_pre_hook(lambda m, a, i=i: got[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, blk in enumerate(layers)]
    try:
        with torch.no_grad():
            for b in range(0, len(input_ids), batch_size):
                model(input_ids[b:b + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(g) for g in got]


def moefy_model(model, inputs: list[torch.Tensor], split: SplitConfig, fit: RouterFitConfig = RouterFitConfig(),
                progress=None) -> list[dict]:
    """Replace every MLP of ``model`` (in place) by its :class:`MoEfiedMLP` with a fitted router;
    ``inputs`` from :func:`mlp_inputs`. Returns one dict of router-fit statistics per layer."""
    from routelib.models.pathways import decoder_layers

    stats = []
    for i, blk in enumerate(decoder_layers(model)):
        x = inputs[i]  # (n, H)
        with torch.no_grad():
            h = blk.mlp.act_fn(blk.mlp.gate_proj(x)) * blk.mlp.up_proj(x)  # (n, I)
            moe = moefy_mlp(blk.mlp, h, split)
            norms = moe.expert_outputs(x).norm(dim=-1)  # (n, E)
        weight, st = fit_router(x, norms, split.top_k, fit)
        moe.router.weight.data.copy_(weight)
        blk.mlp = moe
        stats.append({"layer": i, **st})
        if progress is not None:
            progress.update(1)
    return stats


def set_modes(model, mode: str, gating: str = "unit", seed: int = 0) -> None:
    from routelib.models.pathways import decoder_layers

    for i, blk in enumerate(decoder_layers(model)):
        if isinstance(blk.mlp, MoEfiedMLP):
            blk.mlp.set_mode(mode, gating, seed=seed + i)


def domain_losses(model, windows: dict[str, list], usage: bool = False) -> dict:
    """Mean next-token loss (nats) per domain and overall on ``windows`` ({domain: [(x, y), ...]});
    with ``usage``, also the routers' expert shares per layer (L, E) over all tokens."""
    from routelib.models.pathways import decoder_layers

    out, total, count = {}, 0.0, 0
    counts = None
    with torch.no_grad():
        for dom, batches in windows.items():
            s, n = 0.0, 0
            for x, y in batches:
                logits = model(x).logits  # (B, T, V)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
                s, n = s + loss.item(), n + y.numel()
                if usage:
                    per = [torch.bincount(blk.mlp.last_topk.flatten(), minlength=blk.mlp.cfg.num_experts)
                           for blk in decoder_layers(model) if isinstance(blk.mlp, MoEfiedMLP)]
                    c = torch.stack(per).double()  # (L, E)
                    counts = c if counts is None else counts + c
            out[dom] = s / n
            total, count = total + s, count + n
    out["overall"] = total / count
    if usage:
        out["usage"] = (counts / counts.sum(1, keepdim=True)).numpy()
    return out


def parse_variant(text: str) -> tuple[str, SplitConfig]:
    """"name:E,k,S" -> (name, SplitConfig(E, k, S))."""
    try:
        name, spec = text.split(":")
        e, k, s = (int(v) for v in spec.split(","))
    except ValueError:
        raise ConfigError(f"variant {text!r}: write name:experts,top_k,shared_size, e.g. mixtral:8,2,0") from None
    return name, SplitConfig(num_experts=e, top_k=k, shared_size=s)


def run_pilot(variants: list[str], cfg: PilotConfig = PilotConfig(), fit: RouterFitConfig = RouterFitConfig()
              ) -> pd.DataFrame:
    """Every variant's held-out losses (nats/token) per domain and mode -> one row per (variant, mode)."""
    from routelib.data.batching import TokenWindows, domain_streams, eval_batches, token_stream
    from routelib.data.corpus import DOMAINS
    from routelib.data.pretrained import load_pretrained
    from routelib.progress import progress_bar

    parsed = [parse_variant(v) for v in variants]
    stream = token_stream(None, "train", "smollm2")
    n_win = cfg.fit_tokens // cfg.seq_len
    fit_x, _ = TokenWindows(stream, cfg.seq_len, n_win, seed=cfg.seed)(0)  # (n_win, T)
    windows = {d: eval_batches(s, cfg.seq_len, cfg.batch_size, cfg.eval_windows)
               for d, s in domain_streams(DOMAINS, "validation", "smollm2").items()}
    model, _ = load_pretrained("smollm2-135m")
    rows = [{"variant": "dense", "mode": "dense", "gating": "", **domain_losses(model, windows)}]
    inputs = mlp_inputs(model, fit_x, cfg.batch_size)
    for name, split in parsed:
        t0 = time.perf_counter()
        m, _ = load_pretrained("smollm2-135m")
        stats = moefy_model(m, inputs, split, fit, progress=progress_bar(total=len(inputs), desc=f"MoEfy {name}"))
        fit_s = time.perf_counter() - t0
        agree = float(np.mean([s["agreement"] for s in stats]))
        for mode, gating in (("dense", "unit"), ("router", "unit"), ("router", "softmax"), ("random", "unit"),
                             ("oracle", "unit")):
            set_modes(m, mode, gating, seed=cfg.seed)
            res = domain_losses(m, windows, usage=(mode == "router"))
            usage = res.pop("usage", None)
            row = {"variant": name, "mode": mode, "gating": gating, "experts": split.num_experts,
                   "top_k": split.top_k, "shared": split.shared_size, "fit_agreement": agree,
                   "fit_s": fit_s, **res}
            if usage is not None:
                row["usage_max_share"] = float(usage.max(1).mean())  # mean over layers of the busiest expert's share
                row["usage_min_share"] = float(usage.min(1).mean())
            rows.append(row)
            print(row, flush=True)
    return pd.DataFrame(rows)


__all__ = ["PilotConfig", "domain_losses", "mlp_inputs", "moefy_model", "parse_variant", "run_pilot", "set_modes"]
