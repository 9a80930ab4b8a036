"""What a next-expert prediction is worth: its latency against one MoE layer, and the expert-cache
hit rate it buys when it decides which experts to fetch ahead of time (notebook 05).

Prediction only pays when it is cheaper than what it hides: an expert offloaded to host memory
must be copied before its layer runs (Eliseev & Mazur 2023; Pre-gated MoE, Hwang et al., ISCA 2024),
so the predictor runs once per token and layer, and must cost a small share of a layer.

Latency (:func:`predictor_latency`, :func:`moe_layer_latency`): the median time of one
``predict_scores`` call for one source layer on a batch of B tokens (B = 1: one decoding step;
larger B: a prefill or a batch of sequences), timed with :func:`routelib.bench.time_fn`, against the
median time of the studied model's own sparse MoE block on the same B tokens (its real inputs).

Prefetch simulation (:func:`prefetch_curves`). Every MoE layer t has a cache of c expert slots
(c = 1..E). With a predictor, before layer t runs for a token the cache is filled with the c experts
the predictor ranks highest from source layer t-h; the hit rate is the fraction of the token's true
top-k experts found in the cache, ``|cache ∩ true top-k| / k``, averaged over tokens and over the
target layers h..L-1. At c = k it equals the set recall; at c = E it is 1. Baselines without a
predictor: ``lru`` keeps the c experts of layer t used most recently by the earlier tokens of the
same sequence (decoding order; within a token the higher gate weight counts as more recent; cold at
the start of each sequence, so even c = E misses each expert's first use), ``prior`` (a predictor)
keeps the c experts most frequent at layer t in training (a static frequency cache), and
``oracle`` holds the true top-k: ``min(c, k) / k``. At c = k the LRU cache holds exactly the previous
token's top-k set, so it equals the ``prev_token`` predictor there on decoded tokens (the locality of
:mod:`routelib.routing.analyse.locality` is what it exploits); ``history`` adds the current token's earlier
layers to it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from routelib.bench import Timing, time_fn
from routelib.routing.predict.dataset import PredictorError, RoutingData, check_pair, sequences
from routelib.routing.predict.metrics import rank_experts
from routelib.routing.predict.predictors import HiddenProbePredictor, HiddenRouterPredictor, MLPPredictor, Predictor


# ----------------------------------------------------------------------------------------------
# latency


def _timing_row(name: str, batch: int, t: Timing) -> dict:
    return {"name": name, "batch": batch, "ms_per_call": t.median_ms, "us_per_token": 1e3 * t.median_ms / batch,
            "p10_ms": t.p10_ms, "p90_ms": t.p90_ms}


def predictor_latency(predictors: Mapping[str, Predictor], data: RoutingData, *, layer: int = 0, hop: int = 1,
                      batch_sizes: Sequence[int] = (1, 256), min_time_s: float = 0.1) -> pd.DataFrame:
    """Median time of ``predict_scores(batch, layer, hop)`` for each predictor and batch size B (the
    first B rows of ``data``). Columns: name, batch, ms_per_call, us_per_token, p10_ms, p90_ms."""
    rows = []
    for batch in batch_sizes:
        if not 1 <= batch <= len(data):
            raise PredictorError(f"batch size {batch} needs 1..{len(data)} rows of data")
        part = data.take(np.arange(batch))
        for name, predictor in predictors.items():
            t = time_fn(lambda p=predictor, x=part: p.predict_scores(x, layer, hop), min_time_s=min_time_s,
                        device="cpu")  # predict_scores returns numpy: it has synchronised
            rows.append(_timing_row(name, batch, t))
    return pd.DataFrame(rows)


def moe_block(model: nn.Module, layer: int) -> nn.Module:
    """The sparse MoE block of MoE layer ``layer``: the module holding that layer's router."""
    from routelib.routing.record.routers import find_routers

    routers = find_routers(model)
    if not 0 <= layer < len(routers.names):
        raise PredictorError(f"MoE layer {layer}: the model has {len(routers.names)} MoE layers")
    return model.get_submodule(routers.names[layer].rsplit(".", 1)[0])


@torch.no_grad()
def moe_layer_latency(model: nn.Module, inputs: np.ndarray, *, layer: int = 0, batch_sizes: Sequence[int] = (1, 256),
                      min_time_s: float = 0.1) -> pd.DataFrame:
    """Median time of the model's MoE block of ``layer`` on B tokens of ``inputs`` (n, H) -- for
    Mixtral, OLMoE and Qwen-MoE the block input is what its router reads
    (``data.hidden.x[:, layer]``). Same columns as :func:`predictor_latency`, name ``moe_layer``."""
    block = moe_block(model, layer)
    param = next(block.parameters())
    rows = []
    for batch in batch_sizes:
        if not 1 <= batch <= len(inputs):
            raise PredictorError(f"batch size {batch} needs 1..{len(inputs)} input rows")
        x = torch.from_numpy(np.asarray(inputs[:batch])).to(param.device, param.dtype)[None]  # (1, B, H)
        t = time_fn(lambda x=x: block(x), min_time_s=min_time_s, device=param.device)
        rows.append(_timing_row("moe_layer", batch, t))
    return pd.DataFrame(rows)


def latency_table(predictor_times: pd.DataFrame, layer_times: pd.DataFrame) -> pd.DataFrame:
    """Predictor timings with ``pct_of_layer`` = 100 * predictor time / MoE-layer time at the same batch."""
    layer_ms = layer_times.set_index("batch")["ms_per_call"]
    out = pd.concat([layer_times, predictor_times], ignore_index=True)
    out["pct_of_layer"] = 100 * out["ms_per_call"] / out["batch"].map(layer_ms)
    return out


def moe_layer_flops(hidden_size: int, intermediate_size: int, top_k: int, num_experts: int) -> float:
    """FLOPs per token of one SwiGLU MoE layer: router 2·H·E + k experts × 3 matmuls × 2·H·I."""
    return 2.0 * hidden_size * num_experts + top_k * 3 * 2.0 * hidden_size * intermediate_size


def layer_flops_from_config(config) -> float:
    """:func:`moe_layer_flops` from a transformers MoE config (Mixtral, OLMoE, Qwen-MoE names)."""
    get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None))  # noqa: E731
    return moe_layer_flops(get("hidden_size"), get("moe_intermediate_size", "intermediate_size"),
                           get("num_experts_per_tok"), get("num_local_experts", "num_experts"))


#: Mixtral-8x7B's MoE layer (Jiang et al. 2024, "Mixtral of Experts"; its config.json): for FLOP ratios.
MIXTRAL_8X7B = {"hidden_size": 4096, "intermediate_size": 14336, "top_k": 2, "num_experts": 8}


def predictor_flops(predictor: Predictor, hidden_size: int | None = None) -> float | None:
    """FLOPs per token and prediction (2 per weight of the matmuls used) of the predictors that are
    networks: the MLP, the probe, and the zero-shot router (which needs ``hidden_size``); None for
    tables and priors (a search or a copy, no arithmetic worth counting)."""
    if isinstance(predictor, MLPPredictor):
        return 2.0 * sum(m.weight.numel() for m in predictor.net.modules() if isinstance(m, nn.Linear))
    if isinstance(predictor, HiddenProbePredictor):
        return 2.0 * predictor.net.weight[0].numel()
    if isinstance(predictor, HiddenRouterPredictor) and hidden_size is not None and hasattr(predictor, "layout"):
        return 2.0 * hidden_size * predictor.layout[2]
    return None


def flops_table(predictors: Mapping[str, Predictor], layer_flops: Mapping[str, float],
                hidden_size: int | None = None) -> pd.DataFrame:
    """FLOPs per token of each network predictor (:func:`predictor_flops`) and their share of the
    MoE layers in ``layer_flops`` (name -> FLOPs per token, e.g. from :func:`moe_layer_flops`).
    Columns: name, mflop_per_token, pct_of_<layer name> for each layer."""
    rows = []
    for name, predictor in predictors.items():
        flops = predictor_flops(predictor, hidden_size)
        if flops is not None:
            rows.append({"name": name, "mflop_per_token": flops / 1e6,
                         **{f"pct_of_{layer}": 100 * flops / total for layer, total in layer_flops.items()}})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# prefetch simulation


def ranking_hit_curve(scores: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """(E,) hit rate of a cache filled with the top-c of ``scores`` (N, E), c = 1..E, against the
    true experts (N, k)."""
    ranked = rank_experts(scores)  # (N, E)
    found = (ranked[:, :, None] == experts[:, None, :]).any(2)  # (N, E): the c-th ranked is a true expert
    return found.cumsum(1).mean(0) / experts.shape[1]


def lru_ranks(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """For one sequence at one layer, tokens in decoding order: (n, k) true experts -> (n, k) the
    position of each in the recency list before that token (0 = most recent; ``num_experts`` =
    never used yet). A cache of c slots holds exactly the experts of rank < c."""
    recent: list[int] = []
    ranks = np.full(experts.shape, num_experts, np.int64)
    for i, row in enumerate(experts.tolist()):
        for j, e in enumerate(row):
            if e in recent:
                ranks[i, j] = recent.index(e)
        recent = row + [e for e in recent if e not in row]  # slot 0 (highest gate weight) most recent
    return ranks


def lru_hit_curve(data: RoutingData, layer: int, mask: np.ndarray | None = None) -> np.ndarray:
    """(E,) hit rate of an LRU cache of c = 1..E experts at ``layer``. Every token of ``data`` passes
    through the cache, sequence by sequence in position order; only the tokens of ``mask`` are counted."""
    counts = np.zeros(data.num_experts + 1)
    for rows in sequences(data):
        ranks = lru_ranks(data.experts[rows, layer], data.num_experts)
        if mask is not None:
            ranks = ranks[mask[rows]]
        counts += np.bincount(ranks.ravel(), minlength=data.num_experts + 1)
    return counts.cumsum()[:-1] / max(counts.sum(), 1)


def prefetch_curves(predictors: Mapping[str, Predictor], data: RoutingData, *, hop: int = 1,
                    mask: np.ndarray | None = None, lru: bool = True, oracle: bool = True,
                    per_layer: bool = False) -> pd.DataFrame:
    """Hit rate against cache size c (module docstring) per predictor and baseline, averaged over the
    target layers hop..L-1 and the tokens of ``mask`` (default all). LRU always runs over whole
    sequences (every token of ``data`` passes through the cache); ``mask`` selects which are counted.
    Columns: name, cache_size, hit_rate; with ``per_layer`` one row per target layer too
    (column target_layer), not averaged."""
    num_layers, num_experts, k = data.num_layers, data.num_experts, data.top_k
    check_pair(num_layers, 0, hop)
    mask = np.ones(len(data), bool) if mask is None else np.asarray(mask, bool)
    if not mask.any():
        raise PredictorError("prefetch_curves: the mask selects no tokens")
    sizes = np.arange(1, num_experts + 1)
    curves: dict[str, list[np.ndarray]] = {}
    for target in range(hop, num_layers):
        truth = data.experts[mask, target]  # (n, k)
        for name, predictor in predictors.items():
            scores = predictor.predict_scores(data, target - hop, hop)[mask]  # (n, E)
            curves.setdefault(name, []).append(ranking_hit_curve(scores, truth))
        if lru:
            curves.setdefault("lru", []).append(lru_hit_curve(data, target, mask))
    if per_layer:
        targets = range(hop, num_layers)
        rows = [{"name": name, "target_layer": t, "cache_size": int(c), "hit_rate": float(v)}
                for name, parts in curves.items() for t, part in zip(targets, parts) for c, v in zip(sizes, part)]
        if oracle:
            rows += [{"name": "oracle", "target_layer": t, "cache_size": int(c), "hit_rate": min(c, k) / k}
                     for t in targets for c in sizes]
        return pd.DataFrame(rows)
    rows = [{"name": name, "cache_size": int(c), "hit_rate": float(v)}
            for name, parts in curves.items() for c, v in zip(sizes, np.mean(parts, 0))]
    if oracle:
        rows += [{"name": "oracle", "cache_size": int(c), "hit_rate": min(c, k) / k} for c in sizes]
    return pd.DataFrame(rows)
