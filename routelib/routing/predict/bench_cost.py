"""Benchmark: what a next-expert prediction costs against one Mixtral-8x7B MoE layer on the same machine.

    python -m routelib.routing.predict.bench_cost                   # bf16 layer, batches 1, 8, 64, one thread
    python -m routelib.routing.predict.bench_cost --dtype fp32 --out runs/bench_prefetch.json

Prefetching pays only if predicting the next layer's experts costs a small share of the layer it
hides (docs/design.md §5: <= 1 %). The layer here is transformers' own ``MixtralSparseMoeBlock`` at
Mixtral-8x7B's shapes (hidden 4096, 8 experts of width 14336, top-2; router included; the eager
experts forward, a loop over the experts the batch hits) with random
weights (N(0, 0.02)) in ``--dtype``; the predictors are routelib's, fitted on synthetic traces of
Mixtral's routing layout (32 MoE layers, top-2 of 8; :func:`routelib.routing.predict.bench_scale.synthetic_routing`)
-- their cost depends on that layout, not on what the routing means. For each batch size B, the layer
on B random hidden states and each predictor's ``predict_scores`` for B tokens (source layer 0,
hop 1) are timed round-robin in one run (:func:`routelib.bench.compare`: warm-up, medians, several
rounds), and each predictor's median is given as a share of the layer's median measured beside it.

The hidden-state predictors (``hidden_router``, ``hidden_probe``, ``pre_attn_probe``) read a hidden
state of Mixtral's width instead of the routing: they are fitted on :func:`hidden_data`, synthetic
routing of ``max(hidden_hops) + 1`` MoE layers with random N(0, 1) hidden and pre-attention states
(float16, as :func:`~routelib.routing.predict.dataset.attach_hidden_states` stores them) and the
benchmarked layer's own router as every layer's router; their cost per call depends on the hidden
size and E, not on the number of layers. They are timed at every hop of ``hidden_hops`` (hop h: layer
l+h's router or probe on layer l's state; the table's ``hop`` column).
Not a test: a benchmark, run by hand; its table goes into docs/05_next_expert_mlp.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from routelib.bench import compare
from routelib.errors import ConfigError
from routelib.routing import predict as P
from routelib.routing.predict.bench_scale import SyntheticConfig, synthetic_routing
from routelib.routing.predict.dataset import HiddenStates, RoutingData

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class PrefetchBenchConfig:
    hidden_size: int = 4096  # Mixtral-8x7B's hidden size
    intermediate_size: int = 14336  # width of each expert
    num_experts: int = 8  # experts per layer
    top_k: int = 2  # experts per token
    num_layers: int = 32  # MoE layers of the traces the predictors read (Mixtral-8x7B: 32)
    dtype: str = "bf16"  # the layer's weights and inputs: bf16 (Mixtral's own) or fp32
    batch_sizes: str = "1,8,64"  # tokens per call, comma-separated
    predictors: str = ("prior,lookup,ngram,history,mlp,mlp_history,"  # from routelib.routing.predict.predictors
                       "hidden_router,hidden_probe,pre_attn_probe")  # .PREDICTORS
    train_tokens: int = 50_000  # synthetic tokens the predictors are fitted on (500 per problem)
    hidden_tokens: int = 1500  # synthetic tokens with hidden states (500 per problem; the last problem timed)
    hidden_hops: str = "1,2,3"  # hops the hidden-state predictors are timed at
    mlp_steps: int = 200  # MLP training steps (its cost per prediction does not depend on them)
    probe_steps: int = 20  # linear-probe training steps (likewise)
    rounds: int = 3  # round-robin rounds of the timing (routelib.bench.compare)
    min_time_s: float = 0.3  # timed time per function and round, at least 5 calls
    threads: int = 1  # torch CPU threads
    seed: int = 0  # weights, inputs and traces

    def batches(self) -> list[int]:
        try:
            out = [int(b) for b in self.batch_sizes.split(",") if b.strip()]
        except ValueError:
            raise ConfigError(f"batch_sizes={self.batch_sizes!r}: expected integers like '1,8,64'") from None
        if not out or min(out) < 1:
            raise ConfigError(f"batch_sizes={self.batch_sizes!r}: need integers >= 1")
        return out

    def hops(self) -> list[int]:
        try:
            out = [int(h) for h in self.hidden_hops.split(",") if h.strip()]
        except ValueError:
            raise ConfigError(f"hidden_hops={self.hidden_hops!r}: expected integers like '1,2,3'") from None
        if not out or min(out) < 1:
            raise ConfigError(f"hidden_hops={self.hidden_hops!r}: need integers >= 1")
        return out


def mixtral_layer(cfg: PrefetchBenchConfig) -> torch.nn.Module:
    """transformers' ``MixtralSparseMoeBlock`` at ``cfg``'s shapes, random N(0, 0.02) weights in
    ``cfg.dtype``, created in that dtype (no float32 copy of a bf16 layer)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                           num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                           experts_implementation="eager")  # transformers' loop over the experts hit
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[cfg.dtype])
    try:
        block = MixtralSparseMoeBlock(config).eval()
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for param in block.parameters():
            if param.dim() == 3:  # (E, 2I, H) or (E, H, I): the experts
                _fill_normal(param, gen)
            else:  # the router (E, H)
                param.copy_(torch.randn(param.shape, generator=gen).mul_(0.02))
    return block


def _fill_normal(param: torch.Tensor, gen: torch.Generator, rows: int = 256) -> None:
    """N(0, 0.02) into a large parameter, a slice of its first dimension at a time (no full fp32 copy)."""
    for expert in param:  # (2I, H) or (H, I)
        for start in range(0, expert.shape[0], rows):
            part = expert[start:start + rows]
            part.copy_(torch.randn(part.shape, generator=gen, dtype=torch.float32).mul_(0.02))


def synthetic_data(cfg: PrefetchBenchConfig) -> RoutingData:
    """Routing of Mixtral's layout for the predictors to fit on: problems of 500 tokens (the first
    100 prompt tokens), the structure of :func:`routelib.routing.predict.bench_scale.synthetic_routing`."""
    syn = SyntheticConfig(tokens=cfg.train_tokens, num_layers=cfg.num_layers, num_experts=cfg.num_experts,
                          top_k=cfg.top_k, states=cfg.num_experts, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    L, S, E, k = syn.num_layers, syn.states, syn.num_experts, syn.top_k
    tables = (np.argsort(rng.random((L, S, E)), axis=2)[..., :k].astype(np.int16),  # (L, S, k)
              np.stack([rng.permutation(S) for _ in range(L)]))  # (L, S)
    length, n = 500, cfg.train_tokens - cfg.train_tokens % 500
    if n < 1000:
        raise ConfigError(f"train_tokens={cfg.train_tokens}: need at least 1000 (two problems of 500)")
    experts, weights = synthetic_routing(syn, rng, n, tables)
    manifest = {"layout": {"num_moe_layers": L, "top_k": k, "num_experts": E}, "tokenizer": {"vocab_size": syn.vocab}}
    return RoutingData(experts=experts.astype(np.int64), weights=weights, token_id=rng.integers(0, syn.vocab, n),
                       problem=np.repeat(np.arange(n // length), length),
                       position=np.tile(np.arange(length), n // length),
                       generated=np.tile(np.arange(length) >= 100, n // length),
                       problems=[("synthetic", f"synthetic/{i}") for i in range(n // length)], num_experts=E,
                       vocab_size=syn.vocab, manifest=manifest)


def hidden_data(cfg: PrefetchBenchConfig, router: torch.nn.Module) -> RoutingData:
    """Synthetic routing of ``max(hidden_hops) + 1`` MoE layers (the first layers of
    :func:`synthetic_data`'s structure) with random N(0, 1) router inputs and pre-attention states of
    Mixtral's hidden size in float16, and ``router`` as every layer's router."""
    layers = max(cfg.hops()) + 1
    if layers > cfg.num_layers:
        raise ConfigError(f"hidden_hops={cfg.hidden_hops!r}: hops up to {cfg.num_layers - 1} for {cfg.num_layers} layers")
    if cfg.hidden_tokens < 1000:
        raise ConfigError(f"hidden_tokens={cfg.hidden_tokens}: need at least 1000 (two problems of 500)")
    small = dataclasses.replace(cfg, train_tokens=cfg.hidden_tokens)
    data = synthetic_data(small)
    data = dataclasses.replace(data, experts=np.ascontiguousarray(data.experts[:, :layers]),
                               weights=np.ascontiguousarray(data.weights[:, :layers]),
                               manifest={**data.manifest, "layout": {**data.manifest["layout"], "num_moe_layers": layers}})
    rng = np.random.default_rng(cfg.seed + 1)
    shape = (len(data), layers, cfg.hidden_size)  # (N, L, H)
    states = [rng.standard_normal(shape, dtype=np.float32).astype(np.float16) for _ in range(2)]
    data.hidden = HiddenStates(states[0], [router] * layers, "synthetic", 1.0, None, states[1])
    return data


def _held_out(data: RoutingData) -> tuple[RoutingData, RoutingData]:
    """(train, test): the last tenth of the problems (at least one) held out whole."""
    cut = len(data) - 500 * max(1, len(data.problems) // 10)
    return data.take(slice(0, cut)), data.take(slice(cut, len(data)))


def cost_table(cfg: PrefetchBenchConfig) -> pd.DataFrame:
    """One row per (batch, name, hop): median ms per call, us per token, and ``pct_of_layer`` = 100 x
    median / the layer's median at that batch, all from one round-robin run (``hop`` is NaN for the layer)."""
    torch.set_num_threads(cfg.threads)
    ecfg = P.EvalConfig(predictors=cfg.predictors, mlp_steps=cfg.mlp_steps, probe_steps=cfg.probe_steps, seed=cfg.seed)
    names = ecfg.predictor_names()
    layer = mixtral_layer(cfg)
    timed = {}  # label -> (fitted predictor, test rows, hop)
    routing = [n for n in names if n not in P.HIDDEN_PREDICTORS]
    if routing:
        train, test = _held_out(synthetic_data(cfg))
        pairs = P.layer_pairs(cfg.num_layers, [1])
        timed |= {(n, 1): (P.make_predictor(n, ecfg).fit(train, pairs), test, 1) for n in routing}
    hidden = [n for n in names if n in P.HIDDEN_PREDICTORS]
    if hidden:
        train, test = _held_out(hidden_data(cfg, layer.gate))
        pairs = P.layer_pairs(train.num_layers, cfg.hops())
        for n in hidden:
            fitted = P.make_predictor(n, ecfg).fit(train, pairs)
            timed |= {(n, h): (fitted, test, h) for h in cfg.hops()}
    gen = torch.Generator().manual_seed(cfg.seed)
    frames = []
    for batch in cfg.batches():
        if batch > 400:
            raise ConfigError(f"batch {batch}: at most 400 (the generated tokens of one held-out problem)")
        x = torch.randn(1, batch, cfg.hidden_size, generator=gen).to(DTYPES[cfg.dtype])  # (1, B, H)

        def run_layer(x=x):
            with torch.no_grad():
                return layer(x)

        fns = {"moe_layer": run_layer}
        for (name, hop), (p, test, _) in timed.items():
            part = test.take(slice(100, 100 + batch))  # B generated tokens of one held-out problem
            fns[f"{name}@{hop}"] = lambda p=p, d=part, h=hop: p.predict_scores(d, 0, h)
        df = compare(fns, baseline="moe_layer", rounds=cfg.rounds, min_time_s=cfg.min_time_s, device="cpu")
        layer_ms = float(df.loc[df["name"] == "moe_layer", "median_ms"].iloc[0])
        label = df["name"].str.split("@")
        frames.append(df.assign(name=label.str[0], hop=pd.to_numeric(label.str[1]), batch=batch,
                                us_per_token=1e3 * df["median_ms"] / batch, pct_of_layer=100 * df["median_ms"] / layer_ms))
    out = pd.concat(frames, ignore_index=True)
    out.attrs["config"] = dataclasses.asdict(cfg)
    return out[["batch", "name", "hop", "median_ms", "p10_ms", "p90_ms", "repeats", "us_per_token", "pct_of_layer"]]


def markdown(table: pd.DataFrame) -> str:
    """The docs table: one row per (name, hop), per batch the median ms and the share of the layer;
    a predictor timed at several hops is named with its hop."""
    batches = sorted(table["batch"].unique())
    head = "| | " + " | ".join(f"B = {b}: ms | % of layer" for b in batches) + " |"
    rule = "|---|" + "---:|---:|" * len(batches)
    lines = [head, rule]
    hops = table.groupby("name", sort=False)["hop"].nunique()
    for name, hop in dict.fromkeys((n, None if pd.isna(h) else int(h)) for n, h in zip(table["name"], table["hop"])):
        cells = []
        for b in batches:
            same = (table["batch"] == b) & (table["name"] == name)
            row = table[same & (table["hop"].isna() if hop is None else table["hop"] == hop)].iloc[0]
            cells += [f"{row['median_ms']:.3g}", f"{row['pct_of_layer']:.3g}"]
        label = f"{name}, hop {hop}" if hops[name] > 1 else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m routelib.routing.predict.bench_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="also write the table and the config as JSON here")
    for f in dataclasses.fields(PrefetchBenchConfig):
        p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    cfg = PrefetchBenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PrefetchBenchConfig)})
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype {cfg.dtype!r}: choose from {', '.join(DTYPES)}")
    table = cost_table(cfg)
    with pd.option_context("display.width", 200, "display.precision", 4):
        print(table.to_string(index=False))
    print(markdown(table))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        command = "python -m routelib.routing.predict.bench_cost " + " ".join(sys.argv[1:] if argv is None else argv)
        from routelib.reference import environment, git_commit

        Path(args.out).write_text(json.dumps({"config": dataclasses.asdict(cfg), "command": command,
                                              "environment": environment(), **git_commit(),
                                              "rows": table.to_dict("records")}, indent=1))
    return 0


if __name__ == "__main__":
    from routelib import cli

    raise SystemExit(cli.run(main))
