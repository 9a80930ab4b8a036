"""The GPU plan's steps, highest value first (issue 20). Each step calls the studies' own functions
at a size whose estimated H100/H200 device time fits one slot (``plan.MAX_STEP_S``), and at toy
sizes with ``smoke`` (CPU, CI) through the same code.

Estimates use a measured rate where one exists -- ``torch._grouped_mm`` at Mixtral shapes on an
H100 (torch 2.11, 2026-11-23): 758 TFLOP/s (DESIGN.md §2) -- and otherwise the step's FLOPs over a
stated share of the H100/H200 dense bf16 peak (989 TFLOP/s, datasheet); fixed costs (set-up, Triton
autotuning, timing windows, checkpoint writes) are added and named. No step has run on a GPU yet, so
none of these estimates has been checked against a measurement.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import torch

from routelib import paths
from routelib.gpu.plan import Context, Estimate, Step

GROUPED_MM_RATE = 758e12  # FLOP/s, measured: torch._grouped_mm at Mixtral shapes, H100, torch 2.11, 2026-11-23
BF16_PEAK = 989e12  # FLOP/s, H100/H200 SXM dense bf16 (datasheet); utilisations below are shares of it


RUNNER_FIELDS = ("out_dir", "device", "num_threads", "threads")  # where and how to run: set by the plan, not the study


def gpu_yaml(notebook: str) -> dict:
    """The settings of ``notebooks/params/<notebook>.gpu.yaml`` (the full-scale run)."""
    import yaml

    return yaml.safe_load((paths.NOTEBOOKS_DIR / "params" / f"{notebook}.gpu.yaml").read_text())


def full_size(notebook: str, changes: dict | None = None) -> dict:
    """The yaml's study settings (less :data:`RUNNER_FIELDS`) with a step's ``changes`` applied."""
    return {**{k: v for k, v in gpu_yaml(notebook).items() if k not in RUNNER_FIELDS}, **(changes or {})}


def keeps(notebook: str, changes: dict | None = None, note: str = "") -> str:
    """Which settings of the notebook's GPU yaml a step keeps: all of them but ``changes``."""
    yml = gpu_yaml(notebook)
    diff = [f"{k} {v!r} (yaml: {yml[k]!r})" if k in yml else f"{k} {v!r}" for k, v in (changes or {}).items()]
    text = f"every setting of notebooks/params/{notebook}.gpu.yaml" + (f" but {', '.join(diff)}" if diff else "")
    return text + (f"; {note}" if note else "")


def _timing_s(call_s: float, min_time_s: float, warmup: int = 3) -> float:
    """Seconds routelib.bench.time_fn spends on one function: warm-up + one trial call + enough
    repeats to fill ``min_time_s`` (at least 5)."""
    return (warmup + 1) * call_s + max(min_time_s, 5 * call_s)


def _write_csv(df: pd.DataFrame, ctx: Context, name: str, index: bool = False) -> None:
    df.to_csv(ctx.out / name, index=index)


# --------------------------------------------------------------------------- 1. MoE kernels
MOE_KERNELS = dict(hidden=4096, ffn=14336, experts=8, top_k=2, tokens=(4096, 8192, 16384), dtype="bf16",
                   rounds=3, min_time_s=0.5)  # Mixtral-8x7B's MoE FFN layer (DESIGN.md §5)
MOE_KERNELS_SMOKE = dict(hidden=64, ffn=128, experts=4, top_k=2, tokens=(128, 256), dtype="bf16", rounds=1,
                         min_time_s=0.01)
# assumed slowdown of each timed function against grouped_mm on the same FLOPs: the loops over experts
# (routelib's naive path, transformers' eager block) and the capacity padding
MOE_SLOWDOWN = {"moe_naive": 3, "moe_padded": 1.5, "moe_grouped": 1, "grouped_mm_alone": 1, "dense_equal_total": 1,
                "dense_equal_active": 1, "transformers_eager": 3, "transformers_grouped_mm": 1}
HOST_INIT_RATE = 2e8  # parameters/s initialised on the host before the copy to the GPU (assumed)


def moe_kernels_estimate() -> Estimate:
    p = MOE_KERNELS
    work = 0.0
    for n in p["tokens"]:
        routed = 6 * p["hidden"] * p["ffn"] * n * p["top_k"]  # FLOPs of the top-k experts' matmuls
        for name, slow in MOE_SLOWDOWN.items():
            flops = routed * (p["experts"] / p["top_k"] if name == "dense_equal_total" else 1)
            work += p["rounds"] * _timing_s(flops * slow / GROUPED_MM_RATE, p["min_time_s"])
    params = (2 * p["experts"] + p["top_k"] + 2 * p["experts"]) * 3 * p["hidden"] * p["ffn"]  # moe, dense x2, 2 HF copies
    setup = params / HOST_INIT_RATE
    return Estimate(work + setup, f"timing: {len(MOE_SLOWDOWN)} functions x {len(p['tokens'])} token counts x "
                    f"{p['rounds']} rounds, each call's FLOPs at the measured {GROUPED_MM_RATE / 1e12:.0f} TFLOP/s "
                    f"of grouped_mm (H100, 2026-11-23; loops assumed 3x slower) with {p['min_time_s']} s per timing "
                    f"window: {work:.0f} s; "
                    f"set-up: {params / 1e9:.1f} G parameters initialised on the host at an assumed "
                    f"{HOST_INIT_RATE / 1e6:.0f} M/s: {setup:.0f} s")


def run_moe_kernels(ctx: Context) -> dict:
    from routelib.moe_bench import benchmark

    p = MOE_KERNELS_SMOKE if ctx.smoke else MOE_KERNELS
    df = benchmark(**p, device=ctx.device)
    _write_csv(df, ctx, "moe_bench.csv")
    mid = df[df["tokens"] == sorted(p["tokens"])[len(p["tokens"]) // 2]].set_index("name")
    ctx.summary.update({"tokens": int(mid["tokens"].iloc[0]),
                        "grouped_vs_grouped_mm_alone": float(mid.loc["moe_grouped", "vs_grouped_mm_alone"]),
                        "grouped_vs_naive": float(mid.loc["moe_grouped", "speedup"]),
                        "grouped_vs_dense_equal_total": float(mid.loc["moe_grouped", "speedup_vs_dense_total"]),
                        "grouped_tflops": float(mid.loc["moe_grouped", "tflops"])})
    return {"benchmark": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()}}


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
                work += p["rounds"] * _timing_s(flops * passes / rate, p["min_time_s"])
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
    _write_csv(out, ctx, "pathway_mlp.csv")
    big = out[out["tokens"] == max(p["tokens"])].set_index(["passes", "name"])
    ctx.summary.update({"tokens": max(p["tokens"]),
                        "sparse_vs_dense_mlp_forward": float(big.loc[("forward", "sparse"), "speedup_vs_dense_mlp"]),
                        "sparse_vs_dense_masked_forward": float(big.loc[("forward", "sparse"), "speedup"]),
                        "sparse_vs_dense_mlp_training":
                            float(big.loc[("forward+backward", "sparse"), "speedup_vs_dense_mlp"])})
    return {"benchmark": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()}}


# --------------------------------------------------------------- 2b. routed attention speed
NB02 = "02_dynamic_attention_routing"
HYBRID_GPU = full_size(NB02)  # the yaml's model, batches, steps, evaluation and speed settings
HYBRID_SMOKE = dict(hidden_size=32, num_heads=2, intermediate_size=64, softmax_kv="routed", balance_coef=0.5,
                    seq_len=32, batch_size=2, steps=3, warmup_steps=1, eval_every=0, eval_windows=1,
                    speed_seq_lens=[32, 64], speed_batch=2, bench_min_time_s=0.02)
HYBRID_UTIL = 0.10  # assumed share of the bf16 peak for the hybrid models (GDN recurrence, routing gathers)
TRITON_WARMUP_S = 60.0  # the first fla/Triton call compiles and autotunes for about a minute (../shared/gpu/README.md)
VOCAB = 8192  # bpe8k


def _hybrid_flops_per_token(p: dict, seq_len: int) -> float:
    """Forward FLOPs per token of the 4-layer hybrid, approximately: 2 x (mixers ~5 H^2 each, SwiGLU
    FFNs 3 H I) per layer + the LM head 2 V H + softmax scores 4 T H on the (up to 3) softmax layers."""
    h, i = p["hidden_size"], p["intermediate_size"]
    return 4 * 2 * (5 * h * h + 3 * h * i) + 2 * VOCAB * h + 3 * 4 * seq_len * h


def _hybrid_cfg(ctx: Context, **changes):
    """notebook 02's study config: the GPU yaml (smoke: toy sizes) with a step's ``changes``."""
    from routelib.studies.attention_routing import HybridStudyConfig

    p = {**(HYBRID_SMOKE if ctx.smoke else HYBRID_GPU), **changes}
    return HybridStudyConfig(**p, device=ctx.device, out_dir=str(ctx.checkpoints / "attention_routing"))


def attention_speed_estimate() -> Estimate:
    p = HYBRID_GPU
    rate = HYBRID_UTIL * BF16_PEAK
    work = 0.0
    for t in p["speed_seq_lens"]:
        call = p["speed_batch"] * t * _hybrid_flops_per_token(p, t) / rate
        work += 4 * 3 * _timing_s(call, p["bench_min_time_s"] / 3)  # 4 variants x 3 rounds
    fixed = TRITON_WARMUP_S + 10 * len(p["speed_seq_lens"]) + 20
    return Estimate(work + fixed, f"4 variants x {len(p['speed_seq_lens'])} lengths x 3 rounds at an assumed "
                    f"{HYBRID_UTIL:.0%} of the bf16 peak with {p['bench_min_time_s']} s windows: {work:.0f} s; "
                    f"fla/Triton autotuning {TRITON_WARMUP_S:.0f} s + 10 s per length, set-up 20 s")


def run_attention_speed(ctx: Context) -> dict:
    from routelib.models.hybrid import HybridLM
    from routelib.studies.attention_routing import inference_speed

    cfg = _hybrid_cfg(ctx)
    torch.manual_seed(0)
    static = HybridLM(cfg.model_config("static", 0.0, cfg.steps)).to(ctx.device).eval()
    torch.manual_seed(0)
    dynamic = HybridLM(cfg.model_config("dynamic", cfg.balance_coef, cfg.steps)).to(ctx.device).eval()
    speed = inference_speed(static, dynamic, cfg)
    _write_csv(speed, ctx, "attention_speed.csv")
    longest = speed[speed["seq_len"] == speed["seq_len"].max()].set_index("model")["tokens_per_s"]
    ctx.summary.update({"seq_len": int(speed["seq_len"].max()),
                        "dynamic_vs_static": float(longest["dynamic"] / longest["static"]),
                        "all_gdn_vs_static": float(longest["dynamic (all GDN)"] / longest["static"]),
                        "all_softmax_vs_static": float(longest["dynamic (all softmax)"] / longest["static"])})
    return {"study_config": dataclasses.asdict(cfg), "models": "untrained (seed 0): speed does not depend on training"}


# ------------------------------------------------------------------ 3. notebook 03 reference
NB03 = "03_moe_speedup"
MOE_LM_GPU = full_size(NB03)  # every setting of the yaml: notebook 03's reference size fits one step
MOE_LM_SMOKE = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, num_experts=4,
                    top_k=2, seq_len=32, batch_size=2, steps=4, warmup_steps=1, ckpt_every=2, eval_windows=1,
                    bench_tokens=64, prefill_batch=1, decode_tokens=2, bench_min_time_s=0.01,
                    capacity_factors="1.0")
REFERENCE_EVAL_EVERY = 50  # held-out loss on the training curve every this many steps (reference_run's default)
DENSE_UTIL, MOE_UTIL = 0.25, 0.10  # assumed shares of the bf16 peak: small dense LMs, the MoE LM (routing, sorting)
CKPT_WRITE_RATE = 1e9  # bytes/s written to the machine's disk (assumed)


def _moe_study_cfg(ctx: Context | None, smoke: bool = False):
    from routelib.studies.moe_vs_dense import MoEStudyConfig

    p = MOE_LM_SMOKE if smoke else MOE_LM_GPU
    where = {} if ctx is None else {"device": ctx.device, "out_dir": str(ctx.checkpoints / "moe_vs_dense")}
    return MoEStudyConfig(**p, **where)


def moe_vs_dense_estimate() -> Estimate:
    from routelib.studies.moe_vs_dense import flops_split

    cfg = _moe_study_cfg(None)
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    eval_tokens = 5 * cfg.eval_windows * cfg.seq_len  # upper bound: small domains have fewer windows
    curve_tokens = 5 * 2 * 8 * cfg.seq_len  # reference_run's training curve: 2 batches of 8 windows per domain
    train = evals = ckpt = 0.0
    for arm, lm in cfg.arm_configs().items():
        s = flops_split(lm, cfg.seq_len)
        fwd = s["non_embedding"] + s["lm_head"]
        rate = (MOE_UTIL if arm == "moe" else DENSE_UTIL) * BF16_PEAK
        train += (3 * tokens + curve_tokens * (cfg.steps // REFERENCE_EVAL_EVERY)) * fwd / rate
        params = 3 * lm.num_layers * lm.hidden_size * lm.intermediate_size * (lm.num_experts if lm.is_moe else 1)
        n_ckpt = cfg.steps // cfg.ckpt_every if arm == "moe" else 1
        ckpt += n_ckpt * 12 * params / CKPT_WRITE_RATE  # fp32 weights + two AdamW moments
        passes = 1 + (n_ckpt + len(cfg.factors()) + 1 if arm == "moe" else 0)  # perplexity, specialisation, capacity
        evals += passes * fwd * eval_tokens / rate
    fixed = 60.0  # latency round-robin, one MoE layer vs transformers, corpus + tokenizer load
    total = train + evals + ckpt + fixed
    return Estimate(total, f"3 arms x {tokens / 1e6:.1f} M tokens: training FLOPs (3 x forward) at an assumed "
                    f"{DENSE_UTIL:.0%} (dense) / {MOE_UTIL:.0%} (MoE) of the bf16 peak: {train:.0f} s; held-out passes "
                    f"{evals:.0f} s; checkpoints at an assumed 1 GB/s: {ckpt:.0f} s; latency and layer benchmark 60 s")


def run_moe_vs_dense(ctx: Context) -> dict:
    from routelib.studies.moe_vs_dense import reference_run

    cfg = _moe_study_cfg(ctx, ctx.smoke)
    manifest = reference_run(cfg, out_dir=ctx.out, seeds=(0,), eval_every=2 if ctx.smoke else REFERENCE_EVAL_EVERY,
                             log_every=10 if not ctx.smoke else 1)
    comp = pd.read_csv(ctx.out / "comparison.csv", index_col=0)
    ctx.summary.update({f"ppl_{arm}": float(comp.loc[arm, "ppl_overall"]) for arm in comp.index})
    prefill = comp["prefill_ms"]
    ctx.summary.update({"prefill_speedup_vs_dense_total": float(prefill["dense_total"] / prefill["moe"]),
                        "train_tok_s_moe": float(comp.loc["moe", "train_tokens_per_s"])})
    return manifest["params"]


# ----------------------------------------------------------------- 4. notebook 02 comparison
LR_SAME = [2e-3]  # of the yaml's [1e-3, 2e-3, 3e-3]: the equal rate the CPU run used (one rate keeps a seed in one step)
ALPHA_SWEEP = {k: HYBRID_GPU[k] for k in ("alpha_sweep", "alpha_sweep_steps")}  # the yaml's sweep
ALPHA_SWEEP_SMOKE = dict(alpha_sweep=[0.0, 0.5], alpha_sweep_steps=2)


def _seed_changes(seed: int) -> dict:
    return dict(seeds=[seed], lr_same=list(LR_SAME), alpha_sweep=[])


def _hybrid_run_s(p: dict, steps: int) -> float:
    tokens = steps * p["batch_size"] * p["seq_len"]
    fwd = _hybrid_flops_per_token(p, p["seq_len"])
    evals = (steps // p["eval_every"]) * 5 * p["eval_windows"] * p["seq_len"] if p["eval_every"] else 0
    return (3 * fwd * tokens + fwd * (evals + 5 * p["eval_windows"] * p["seq_len"])) / (HYBRID_UTIL * BF16_PEAK)


def attention_seed_estimate() -> Estimate:
    p, runs = HYBRID_GPU, 3
    per = _hybrid_run_s(p, p["steps"])
    fixed = TRITON_WARMUP_S + 20
    return Estimate(runs * per + fixed, f"{runs} runs (static {p['lr_static']:g}, dynamic {p['lr_dynamic']:g}, static "
                    f"{LR_SAME[0]:g}) x {p['steps']} steps x {p['batch_size'] * p['seq_len']} tokens, 3 x forward FLOPs "
                    f"(~{_hybrid_flops_per_token(p, p['seq_len']) / 1e6:.0f} MFLOP/token) at an assumed "
                    f"{HYBRID_UTIL:.0%} of the bf16 peak, evaluations included: {runs * per:.0f} s; "
                    f"Triton autotuning + set-up {fixed:.0f} s")


def _attention_runs(ctx: Context, specs_of, cfg) -> dict:
    from routelib.evaluation import domain_eval_data
    from routelib.studies.attention_routing import run_all, training_routing

    specs = specs_of(cfg)
    runs = run_all(cfg, specs, domain_eval_data(cfg))
    _write_csv(runs.table, ctx, "runs.csv", index=True)
    _write_csv(training_routing(runs.results), ctx, "training_routing.csv")
    for name, result in runs.results.items():
        pd.DataFrame(result.history).to_csv(ctx.out / f"history_{name}.csv", index=False)
    ctx.summary.update({f"val_loss {name}": float(v) for name, v in runs.table["val_loss"].items()})
    return {"study_config": dataclasses.asdict(cfg), "runs": [dataclasses.asdict(s) for s in specs]}


def attention_seed_step(seed: int) -> Step:
    def run(ctx: Context) -> dict:
        from routelib.studies.attention_routing import plan

        return _attention_runs(ctx, plan, _hybrid_cfg(ctx, **_seed_changes(seed)))

    return Step(f"04_attention_routing_seed{seed}", f"notebook 02: static vs dynamic hybrid, seed {seed}",
                keeps=keeps(NB02, _seed_changes(seed), "the runs static at lr_static, dynamic at lr_dynamic, static at "
                            "2e-3 (dynamic at 2e-3 is the same run)"),
                estimate=attention_seed_estimate, run=run)


def attention_sweep_estimate() -> Estimate:
    p = HYBRID_GPU
    n = len(ALPHA_SWEEP["alpha_sweep"])
    per = _hybrid_run_s(p, ALPHA_SWEEP["alpha_sweep_steps"])
    return Estimate(n * per + TRITON_WARMUP_S + 20, f"{n} dynamic runs x {ALPHA_SWEEP['alpha_sweep_steps']} steps, "
                    f"3 x forward FLOPs at an assumed {HYBRID_UTIL:.0%} of the bf16 peak (as the seed steps): "
                    f"{n * per:.0f} s; Triton autotuning + set-up {TRITON_WARMUP_S + 20:.0f} s")


def run_attention_sweep(ctx: Context) -> dict:
    from routelib.studies.attention_routing import plan

    sweep = ALPHA_SWEEP_SMOKE if ctx.smoke else ALPHA_SWEEP
    cfg = _hybrid_cfg(ctx, seeds=[0], lr_same=[], **sweep)  # the sweep's runs only (dynamic, lr_dynamic, seed 0)
    return _attention_runs(ctx, lambda c: [s for s in plan(c) if s.steps == c.alpha_sweep_steps], cfg)


def run_attention_verdict(ctx: Context) -> dict:
    from routelib.evaluation import domain_eval_data
    from routelib.studies.attention_routing import (alpha_sweep_table, compare_experiments, unigram_loss,
                                                    verdict, verdict_text)

    sweep = ALPHA_SWEEP_SMOKE if ctx.smoke else ALPHA_SWEEP
    cfg = _hybrid_cfg(ctx, seeds=[0, 1], lr_same=list(LR_SAME), **sweep)
    table = pd.concat([pd.read_csv(ctx.results / name / "runs.csv", index_col=0) for name in ATTENTION_RUN_STEPS])
    table = table[~table.index.duplicated()]
    _write_csv(table, ctx, "runs.csv", index=True)
    _write_csv(compare_experiments(table, cfg), ctx, "comparison.csv", index=True)
    _write_csv(alpha_sweep_table(table, cfg), ctx, "alpha_sweep.csv", index=True)
    v = verdict(table, cfg)
    unigram = unigram_loss(cfg, domain_eval_data(cfg))
    (ctx.out / "verdict.json").write_text(json.dumps(v, indent=1, default=float) + "\n")
    (ctx.out / "verdict.md").write_text(verdict_text(v, cfg, cfg.steps * cfg.batch_size * cfg.seq_len, unigram) + "\n")
    ctx.summary.update({"outcome": v["outcome"], "delta_mean": float(v["delta_mean"]), "seed_spread": float(v["seed_spread"]),
                        "unigram_loss": unigram})
    return {"study_config": dataclasses.asdict(cfg), "from": list(ATTENTION_RUN_STEPS)}


ATTENTION_RUN_STEPS = ("04_attention_routing_seed0", "04_attention_routing_seed1", "04_attention_routing_alpha_sweep")


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
            _write_csv(table, ctx, "perplexity.csv", index=True)
            vocab = model.config.vocab_size
            routers = study.control_selections(tuned.sample, untrained.sample, cfg.num_pathways, seed=cfg.seed)
            per_router = study.router_metrics(tuned.sample, routers, cfg.num_pathways, vocab, cfg.min_load, cfg.top_tokens)
            headline = study.headline_purity(study.summary_table(per_router))
            _write_csv(headline, ctx, "purity.csv", index=True)
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
                checkpoint=None if last else "pathways")


# ------------------------------------------------------- 6. a larger routing subject + traces
# notebook 03's GPU model, deeper and longer (the shipped subject: hidden 192, 6 layers, 4.1 M tokens)
SUBJECT_CHANGES = dict(num_layers=12, steps=2000, ckpt_every=500, eval_windows=64, dense_baselines=False)
SUBJECT_GPU = full_size(NB03, SUBJECT_CHANGES)
SUBJECT_SMOKE = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32, num_experts=4,
                     top_k=2, seq_len=32, batch_size=2, steps=3, warmup_steps=1, ckpt_every=0, eval_windows=1,
                     dense_baselines=False)
# the shipped traces' settings (routing_data_collected/moe-subject/manifest.json): all of HumanEval, the first 100
# GSM8K test problems, 192 new tokens, greedy, BOS prepended; a larger batch on the GPU
TRACES_GPU = dict(limits={"humaneval": None, "gsm8k": 100}, max_new_tokens=192, batch_size=64)
TRACES_SMOKE = dict(limits={"humaneval": 2, "gsm8k": 2}, max_new_tokens=4, batch_size=2)
GENERATE_STEP_S = 0.03  # seconds per generated token of one batch (transformers generate + router hooks; assumed)


def _subject_cfg(ctx: Context | None, smoke: bool = False):
    from routelib.studies.moe_vs_dense import MoEStudyConfig

    where = {} if ctx is None else {"device": ctx.device, "out_dir": str(ctx.checkpoints / "subject")}
    return MoEStudyConfig(**(SUBJECT_SMOKE if smoke else SUBJECT_GPU), **where)


def subject_train_estimate() -> Estimate:
    from routelib.studies.moe_vs_dense import flops_split

    cfg = _subject_cfg(None)
    lm = cfg.moe_config()
    s = flops_split(lm, cfg.seq_len)
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    train = 3 * (s["non_embedding"] + s["lm_head"]) * tokens / (MOE_UTIL * BF16_PEAK)
    params = lm.num_layers * (3 * lm.hidden_size * lm.intermediate_size * lm.num_experts + 4 * lm.hidden_size ** 2)
    ckpt = (cfg.steps // cfg.ckpt_every) * 12 * params / CKPT_WRITE_RATE
    return Estimate(train + ckpt + 30, f"{tokens / 1e6:.1f} M tokens, 3 x forward FLOPs at an assumed {MOE_UTIL:.0%} "
                    f"of the bf16 peak: {train:.0f} s; {cfg.steps // cfg.ckpt_every} checkpoints at an assumed 1 GB/s: "
                    f"{ckpt:.0f} s; set-up 30 s")


def run_subject_train(ctx: Context) -> dict:
    from routelib.studies.moe_vs_dense import train_arm, training_batches

    cfg = _subject_cfg(ctx, ctx.smoke)
    _, result = train_arm("moe", cfg.moe_config(), cfg, training_batches(cfg))
    pd.DataFrame(result.history).to_csv(ctx.out / "history.csv", index=False)
    ctx.summary.update({"steps": result.step, "tokens_M": result.step * cfg.batch_size * cfg.seq_len / 1e6,
                        "final_train_loss": float(result.history[-1]["loss"])})
    return {"study_config": dataclasses.asdict(cfg)}


def subject_traces_estimate() -> Estimate:
    p = TRACES_GPU
    problems = 164 + p["limits"]["gsm8k"]
    batches = math.ceil(164 / p["batch_size"]) + math.ceil(p["limits"]["gsm8k"] / p["batch_size"])
    gen = batches * p["max_new_tokens"] * GENERATE_STEP_S
    fixed = 90.0
    return Estimate(gen + fixed, f"{problems} prompts in {batches} batches x {p['max_new_tokens']} greedy tokens at an "
                    f"assumed {GENERATE_STEP_S * 1e3:.0f} ms per decoding step (generate is launch-bound for a model "
                    f"this small): {gen:.0f} s; export + perplexity through transformers, model load: {fixed:.0f} s")


def run_subject_traces(ctx: Context) -> dict:
    from routelib.evaluation import domain_eval_data
    from routelib.reference import load_manifest
    from routelib.routing.record.collect import benchmark_prompts, collect
    from routelib.routing.record.routers import load_model
    from routelib.studies.moe_vs_dense import export_subject, train_arm, training_batches

    cfg = _subject_cfg(ctx, ctx.smoke)
    model, result = train_arm("moe", cfg.moe_config(), cfg, training_batches(cfg))  # finished: loaded, not trained
    trained = load_manifest(ctx.results / "06_subject_train")
    result = dataclasses.replace(result, wall_s=trained["wall_s"])
    export = ctx.checkpoints / "subject_export"  # too large to commit; its model card is kept with the traces
    card = export_subject(model, cfg, result, domain_eval_data(cfg), export, trained["command"])
    (ctx.out / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    hf, tok = load_model(str(export), dtype="bfloat16" if ctx.device == "cuda" else "float32")
    hf.to(ctx.device)
    p = TRACES_SMOKE if ctx.smoke else TRACES_GPU
    for name, limit in p["limits"].items():
        bench = benchmark_prompts(name, limit)
        collect(hf, tok, bench.prompts, ctx.out / "traces", dataset=name, max_new_tokens=p["max_new_tokens"],
                batch_size=p["batch_size"], prepend_bos=True, problem_ids=bench.problem_ids, prompt_source=bench.source,
                prompt_template=bench.template, model_name=f"routelib GPU subject ({cfg.num_layers} layers)",
                progress=False)
    ctx.summary.update({f"val_ppl {k}": v for k, v in card["validation_perplexity"].items() if k == "overall"})
    ctx.summary["total_params_M"] = card["total_params"] / 1e6
    return {"study_config": dataclasses.asdict(cfg), "traces": {k: v for k, v in p.items() if k != "limits"},
            "limits": p["limits"]}


# ------------------------------------------------------------------------------ the plan
def _counts(tokens) -> str:
    """(4096, 8192) -> "4k/8k"."""
    return "/".join(f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in tokens)


def build_plan() -> list[Step]:
    """Every step, highest value first."""
    mk, pm, sg = MOE_KERNELS, PATHWAY_MLP, SUBJECT_GPU
    return [
        Step("01_moe_kernels", f"MoE FFN layer at Mixtral shapes (d {mk['hidden']}, FFN {mk['ffn']}, {mk['experts']} "
             f"experts, top-{mk['top_k']}, {mk['dtype']}), {_counts(mk['tokens'])} tokens",
             keeps="no yaml: DESIGN.md §5's shapes, routelib.moe_bench's defaults", estimate=moe_kernels_estimate,
             run=run_moe_kernels),
        Step("02_pathway_mlp", f"sparse vs dense pathway MLP (SmolLM2 shape, {pm['num_pathways']} pathways, "
             f"top-{pm['top_k']}), {_counts(pm['tokens'])} tokens, {pm['dtype']}",
             keeps=f"notebook 01's GPU yaml: num_pathways, top_k_pathways and bench_tokens (with a quarter and 4x as "
                   f"many tokens); SmolLM2-135M's MLP shape ({SMOLLM2['hidden']} x {SMOLLM2['intermediate']})",
             estimate=pathway_mlp_estimate, run=run_pathway_mlp),
        Step("03_attention_speed", "routed vs static attention: prefill throughput of the 4-layer hybrids, "
             f"{_counts(HYBRID_GPU['speed_seq_lens'])} tokens",
             keeps=keeps(NB02, note="the models are untrained (speed only): model, speed_seq_lens, speed_batch and "
                         "bench_min_time_s are what matter"),
             estimate=attention_speed_estimate, run=run_attention_speed),
        Step("03_moe_vs_dense", "notebook 03's reference run: MoE vs dense LMs at the GPU size, one seed",
             keeps=keeps(NB03, note="one seed"),
             estimate=moe_vs_dense_estimate, run=run_moe_vs_dense),
        attention_seed_step(0),
        attention_seed_step(1),
        Step("04_attention_routing_alpha_sweep", "notebook 02: the alpha sweep (dynamic arm, seed 0)",
             keeps=keeps(NB02, dict(seeds=[0], lr_same=[]), "only the alpha sweep's runs"),
             estimate=attention_sweep_estimate, run=run_attention_sweep),
        Step("04_attention_routing_verdict", "notebook 02: comparison, verdict and sweep table from the three steps above",
             keeps=keeps(NB02, dict(lr_same=list(LR_SAME)), "reads the runs of the three steps above; no training"),
             estimate=lambda: Estimate(30.0, "no training: reads the runs, one unigram pass over the corpus (30 s, assumed)"),
             run=run_attention_verdict, after=ATTENTION_RUN_STEPS),
        *[pathway_step(part) for part in range(1, PATHWAY_CHUNKS + 1)],
        Step("06_subject_train", f"a larger routing subject: MoE LM, {sg['num_layers']} layers, hidden {sg['hidden_size']}, "
             f"{sg['num_experts']} experts, top-{sg['top_k']}, "
             f"{sg['steps'] * sg['batch_size'] * sg['seq_len'] / 1e6:.0f} M tokens",
             keeps=keeps(NB03, SUBJECT_CHANGES, "the MoE arm only"),
             estimate=subject_train_estimate, run=run_subject_train, checkpoint="subject"),
        Step("06_subject_traces", "the larger subject: export (model card) and routing traces on HumanEval + GSM8K",
             keeps="the shipped traces' settings: all 164 HumanEval, the first 100 GSM8K problems, 192 greedy tokens, BOS",
             estimate=subject_traces_estimate, run=run_subject_traces, after=("06_subject_train",)),
    ]
