"""Notebook 01's GPU steps: the sparse vs dense pathway MLP, and the fine-tune at GPU size in chunks.

Each step calls the study's own functions at a size whose estimated H100/H200 device time fits one
slot (``routelib.gpu.plan.MAX_STEP_S``), and at toy sizes with ``smoke`` (CPU, CI) through the same code;
:mod:`routelib.gpu.steps` puts every study's steps in one ordered plan.
"""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import torch

from routelib.gpu.plan import WEIGHTS, Context, Estimate, Step
from routelib.gpu.sizing import BF16_PEAK, counts, full_size, keeps, timing_s, write_csv


# ------------------------------------------------------------------- 2a. pathway MLP speed
NB01 = "01_train_pathway_llm"
SMOLLM2 = dict(params=134.5e6, layers=30, hidden=576, intermediate=1536, vocab=49152)  # notebook 01's base model
_nb01 = full_size(NB01)
PATHWAY_MLP = dict(hidden=SMOLLM2["hidden"], intermediate=SMOLLM2["intermediate"], num_pathways=_nb01["num_pathways"],
                   top_k=_nb01["top_k_pathways"], tokens=tuple(int(_nb01["bench_tokens"] * f) for f in (1 / 4, 1, 4)),
                   dtype="bf16", rounds=3, min_time_s=0.3)  # one SmolLM2 MLP with notebook 01's GPU routing
PATHWAY_MLP_SMOKE = dict(hidden=64, intermediate=128, num_pathways=16, top_k=4, tokens=(256,), dtype="bf16",
                         rounds=1, min_time_s=0.01)
SMALL_GEMM_UTIL = 0.3  # assumed share of the bf16 peak for the pathway MLP's small GEMMs (576 x 1536)


def pathway_mlp_estimate() -> Estimate:
    p = PATHWAY_MLP
    rate = SMALL_GEMM_UTIL * BF16_PEAK
    work = 0.0
    for n in p["tokens"]:
        dense = 6 * p["hidden"] * p["intermediate"] * n
        for flops in (dense, dense, dense * p["top_k"] / p["num_pathways"]):  # dense_masked, dense_mlp, sparse
            for passes in (1, 3):  # forward; forward + backward
                work += p["rounds"] * timing_s(flops * passes / rate, p["min_time_s"])
    setup = 15.0
    return Estimate(work + setup, f"3 implementations x {len(p['tokens'])} token counts x (forward, forward+backward) x "
                    f"{p['rounds']} rounds, FLOPs at an assumed {SMALL_GEMM_UTIL:.0%} of the 989 TFLOP/s bf16 peak, "
                    f"{p['min_time_s']} s timing windows: {work:.0f} s; set-up (imports, CUDA context) {setup:.0f} s")


def run_pathway_mlp(ctx: Context) -> dict:
    from routelib.models.pathways import RoutingConfig, bench_pathway_mlp

    p = PATHWAY_MLP_SMOKE if ctx.smoke else PATHWAY_MLP
    rcfg = RoutingConfig(num_pathways=p["num_pathways"], top_k_pathways=p["top_k"])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[p["dtype"]]
    frames = []
    for n in p["tokens"]:
        for backward in (False, True):
            df = bench_pathway_mlp(p["hidden"], p["intermediate"], rcfg, n_tokens=n, device=ctx.device, dtype=dtype,
                                   backward=backward, rounds=p["rounds"], min_time_s=p["min_time_s"])
            t = df.set_index("name")["median_ms"]
            frames.append(df.assign(tokens=n, passes="forward+backward" if backward else "forward",
                                    speedup_vs_dense_mlp=t["dense_mlp"] / df["median_ms"]))
    out = pd.concat(frames, ignore_index=True)
    write_csv(out, ctx, "pathway_mlp.csv")
    big = out[out["tokens"] == max(p["tokens"])].set_index(["passes", "name"])
    ctx.summary.update({"tokens": max(p["tokens"]),
                        "sparse_vs_dense_mlp_forward": float(big.loc[("forward", "sparse"), "speedup_vs_dense_mlp"]),
                        "sparse_vs_dense_masked_forward": float(big.loc[("forward", "sparse"), "speedup"]),
                        "sparse_vs_dense_mlp_training":
                            float(big.loc[("forward+backward", "sparse"), "speedup_vs_dense_mlp"])})
    return {"benchmark": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()}}



# ------------------------------------------------------------------ 5. notebook 01 fine-tune
PATHWAY_CHANGES = dict(compare_switch=False, unrouted_control=False, probe_windows=0)  # this chain: the GLBL arm only
PATHWAY_GPU = full_size(NB01, PATHWAY_CHANGES)
PATHWAY_SMOKE = dict(num_pathways=16, top_k_pathways=4, routed_layers="14", train_scope="router+mlp", seq_len=16,
                     batch_size=2, steps=2, lr=1e-3, warmup_steps=1, eval_windows=1, eval_batch_size=1, probe_windows=0)
PATHWAY_UTIL = 0.15  # assumed share of the bf16 peak for the 135M model's fine-tune (small GEMMs, grouped pathways)
PATHWAY_CHUNKS = 2  # the fine-tune is split into this many steps that resume from a checkpoint


def _pathway_train_s(steps: int) -> float:
    p, m = PATHWAY_GPU, SMOLLM2
    fwd = 2 * m["params"]
    routed_mlp = 3 * m["hidden"] * m["intermediate"] * len(range(0, m["layers"], p["route_every_n_layers"]))
    per_token = fwd + 2 * fwd + 2 * routed_mlp  # forward, activation gradients, weight gradients of the routed MLPs
    return per_token * steps * p["batch_size"] * p["seq_len"] / (PATHWAY_UTIL * BF16_PEAK)


def pathway_chunk_estimate() -> Estimate:
    p = PATHWAY_GPU
    steps, tokens = math.ceil(p["steps"] / PATHWAY_CHUNKS), p["batch_size"] * p["seq_len"]
    train = _pathway_train_s(steps)
    per_token = _pathway_train_s(1) * PATHWAY_UTIL * BF16_PEAK / tokens
    fixed = 60.0
    return Estimate(train + fixed, f"{steps} of {p['steps']} steps x {tokens} tokens through SmolLM2-135M (forward + "
                    f"activation gradients + routed-MLP weight gradients, ~{per_token / 1e9:.2f} GFLOP/token) at an assumed {PATHWAY_UTIL:.0%} of the bf16 peak: {train:.0f} s; model load "
                    f"(GGUF conversion ~25 s), held-out passes and checkpoint {fixed:.0f} s")


def _pathway_cfg(ctx: Context):
    from routelib.studies.pathways import PathwayStudyConfig

    p = PATHWAY_SMOKE if ctx.smoke else PATHWAY_GPU
    return PathwayStudyConfig(**p, device=ctx.device, out_dir=str(ctx.checkpoints / "pathways"))


def pathway_step(part: int) -> Step:
    """Part ``part`` (1-based) of notebook 01's GLBL fine-tune; the last part also evaluates."""
    last = part == PATHWAY_CHUNKS

    def run(ctx: Context) -> dict:
        from routelib.studies import pathways as study

        cfg = _pathway_cfg(ctx)
        model, tok = study.load_base(cfg)
        eval_data = study.domain_eval_data(cfg, tok) if last else None
        base = study.evaluate(model, eval_data) if last else None
        routed = study.build_routed(model, cfg)  # wraps ``model`` in place
        untrained = study.evaluate(routed, eval_data) if last else None
        stop = None if last else math.ceil(cfg.steps * part / PATHWAY_CHUNKS)
        result = study.fine_tune(routed, cfg, study.training_batches(cfg, tok), stop_step=stop)
        pd.DataFrame(result.history).to_csv(ctx.out / "history.csv", index=False)
        ctx.summary["steps_done"] = result.step
        if last:
            tuned = study.evaluate(routed, eval_data)
            table = study.perplexity_table({"base": base, "routed, untrained router": untrained, "routed, fine-tuned": tuned})
            write_csv(table, ctx, "perplexity.csv", index=True)
            vocab = model.config.vocab_size
            routers = study.control_selections(tuned.sample, untrained.sample, cfg.num_pathways, seed=cfg.seed)
            per_router = study.router_metrics(tuned.sample, routers, cfg.num_pathways, vocab, cfg.min_load, cfg.top_tokens)
            headline = study.headline_purity(study.summary_table(per_router))
            write_csv(headline, ctx, "purity.csv", index=True)
            ctx.summary.update({f"ppl {k}": float(v) for k, v in table["ppl_overall"].items()})
            ctx.summary["purity fine-tuned"] = float(headline.loc["fine-tuned", "mean_purity"])
            ctx.summary["purity permuted"] = float(headline.loc["permuted", "mean_purity"])
        return {"study_config": dataclasses.asdict(cfg), "stop_step": stop}

    name = f"05_pathways_finetune_{part}of{PATHWAY_CHUNKS}"
    return Step(name, f"notebook 01: GLBL fine-tune of SmolLM2-135M, part {part} of {PATHWAY_CHUNKS}"
                + (" + evaluation" if last else ""),
                keeps=keeps(NB01, PATHWAY_CHANGES, "the Switch arm, the un-routed control and the per-layer probes "
                            "are not in the plan (the notebook with the yaml runs them)"),
                estimate=pathway_chunk_estimate, run=run,
                after=() if part == 1 else (f"05_pathways_finetune_{part - 1}of{PATHWAY_CHUNKS}",),
                checkpoint=None if last else "pathways", needs=(WEIGHTS,))  # fine-tunes SmolLM2-135M


# ------------------------------------------------------------------------------ its steps
def mlp_step() -> Step:
    pm = PATHWAY_MLP
    return Step("02_pathway_mlp", f"sparse vs dense pathway MLP (SmolLM2 shape, {pm['num_pathways']} pathways, "
                f"top-{pm['top_k']}), {counts(pm['tokens'])} tokens, {pm['dtype']}",
                keeps=f"notebook 01's GPU yaml: num_pathways, top_k_pathways and bench_tokens (with a quarter and 4x as "
                      f"many tokens); SmolLM2-135M's MLP shape ({SMOLLM2['hidden']} x {SMOLLM2['intermediate']})",
                estimate=pathway_mlp_estimate, run=run_pathway_mlp)


def fine_tune_steps() -> list[Step]:
    return [pathway_step(part) for part in range(1, PATHWAY_CHUNKS + 1)]
