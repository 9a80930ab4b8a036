"""MoE FFN kernel benchmark at Mixtral-8x7B's shapes (docs/design.md §5).

    python -m routelib.moe_bench                      # GPU: d 4096, FFN 14336, 8 experts, top-2, bf16
    python -m routelib.moe_bench --hidden 256 --ffn 512 --tokens 512 --dtype fp32   # CPU smoke run

For each token count, timed in one run (``routelib.bench.compare``: CUDA events, warm-up, medians,
round-robin rounds): routelib's ``naive`` / ``padded`` / ``grouped`` MoE layer (router included);
``grouped_mm`` alone on the same routed work (the two grouped GEMMs on tokens already sorted by
expert: the ceiling for the grouped path); dense SwiGLU FFNs with the MoE's total (E*I) and active
(k*I) parameters; and transformers' ``MixtralSparseMoeBlock`` as the peer (its eager loop and its grouped_mm experts). TFLOP/s count the
expert/FFN matmuls only: 6*H*I per token-expert pair (2 FLOPs x 3 matrices).

Targets (MegaBlocks 98.6 % of batched matmul; SonicMoE ~88 %): grouped >= 85 % of grouped_mm
alone, >= 3x naive, and >= 3.2x faster than the equal-total dense FFN (ideal E/k = 4x).
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from routelib.device import resolve_device
from routelib.bench import compare
from routelib.models.moe import DenseFFN, MoEConfig, MoEFFN, grouped_matmul, swiglu_act

HF_IMPLS = ("eager", "grouped_mm")  # transformers' experts implementations we compare with
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _hf_block(layer: MoEFFN, experts_implementation: str = "eager"):
    """transformers' Mixtral sparse MoE block holding ``layer``'s weights with the given experts
    implementation ("eager": a loop over experts; "grouped_mm", "batched_mm"), or None without
    transformers."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    c = layer.cfg
    hf_cfg = MixtralConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_local_experts=c.num_experts, num_experts_per_tok=c.top_k,
                           experts_implementation=experts_implementation)
    block = MixtralSparseMoeBlock(hf_cfg).to(layer.w13.device, layer.w13.dtype).eval()
    block.load_state_dict(layer.hf_state_dict())
    return block


@torch.no_grad()
def benchmark(hidden: int = 4096, ffn: int = 14336, experts: int = 8, top_k: int = 2,
              tokens: tuple[int, ...] = (4096, 8192, 16384), dtype: str = "bf16", device: str | None = None,
              rounds: int = 3, min_time_s: float = 0.5, with_hf: bool = True) -> pd.DataFrame:
    """One row per (tokens, implementation): median ms, TFLOP/s and ratios (see module docstring)."""
    dev = resolve_device(device)
    dt = DTYPES[dtype]
    cfg = MoEConfig(hidden_size=hidden, intermediate_size=ffn, num_experts=experts, top_k=top_k)
    layer = MoEFFN(cfg).to(dev, dt).eval()
    dense_total = DenseFFN.matching(cfg, "total").to(dev, dt).eval()
    dense_active = DenseFFN.matching(cfg, "active").to(dev, dt).eval()
    peers = {f"transformers_{impl}": _hf_block(layer, impl) for impl in HF_IMPLS} if with_hf else {}
    frames = []
    for n in tokens:
        x = torch.randn(n, hidden, device=dev, dtype=dt)  # (N, H)
        router, order = layer.route(x)
        slots = order[router.keep.reshape(-1)[order]]  # (N*k,) sorted by expert
        counts = torch.bincount(router.indices.reshape(-1)[slots], minlength=experts)
        offs = torch.cumsum(counts, 0).to(torch.int32)  # (E,)
        xs = x.index_select(0, slots // top_k).contiguous()  # (N*k, H), the routed work
        w13t, w2t = layer.w13.transpose(1, 2), layer.w2.transpose(1, 2)
        fns = {f"moe_{impl}": (lambda impl=impl: layer(x, impl=impl)) for impl in ("naive", "padded", "grouped")}
        fns["grouped_mm_alone"] = lambda: grouped_matmul(swiglu_act(grouped_matmul(xs, w13t, offs)), w2t, offs)
        fns["dense_equal_total"] = lambda: dense_total(x)
        fns["dense_equal_active"] = lambda: dense_active(x)
        for name, block in peers.items():
            if block is not None:
                fns[name] = lambda block=block: block(x.unsqueeze(0))
        routed = 6 * hidden * ffn * n * top_k
        flops = {name: routed for name in fns}
        flops["dense_equal_total"] = 6 * hidden * ffn * experts * n
        flops["dense_equal_active"] = routed
        df = compare(fns, baseline="moe_naive", flops=flops, rounds=rounds, min_time_s=min_time_s, device=dev)
        t = df.set_index("name")["median_ms"]
        df["tokens"] = n
        df["vs_grouped_mm_alone"] = t["grouped_mm_alone"] / df["median_ms"]  # fraction of the ceiling
        df["speedup_vs_dense_total"] = t["dense_equal_total"] / df["median_ms"]
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out.attrs["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return out[["tokens", "name", "median_ms", "tflops", "speedup", "vs_grouped_mm_alone", "speedup_vs_dense_total"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m routelib.moe_bench", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--tokens", default="4096,8192,16384", help="comma-separated token counts")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min_time_s", type=float, default=0.5)
    p.add_argument("--csv", help="also write the table here")
    a = p.parse_args(argv)
    df = benchmark(a.hidden, a.ffn, a.experts, a.top_k, tuple(int(t) for t in a.tokens.split(",")), a.dtype,
                   rounds=a.rounds, min_time_s=a.min_time_s)
    print(f"device: {df.attrs['device']}; H={a.hidden} I={a.ffn} E={a.experts} k={a.top_k} {a.dtype}")
    print(df.round(3).to_string(index=False))
    if a.csv:
        df.to_csv(a.csv, index=False)
    return 0


if __name__ == "__main__":
    from routelib import cli

    raise SystemExit(cli.run(main))
