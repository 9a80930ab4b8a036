"""Notebook 02's GPU steps: routed vs static attention speed, and the comparison at GPU size (seeds, alpha sweep, verdict).

Each step calls the study's own functions at a size whose estimated H100/H200 device time fits one
slot (``routelib.gpu.plan.MAX_STEP_S``), and at toy sizes with ``smoke`` (CPU, CI) through the same code;
:mod:`routelib.gpu.steps` puts every study's steps in one ordered plan.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import torch

from routelib.gpu.plan import Context, Estimate, Step
from routelib.gpu.sizing import BF16_PEAK, counts, full_size, keeps, timing_s, write_csv


# --------------------------------------------------------------- 2b. routed attention speed
NB02 = "02_dynamic_attention_routing"
HYBRID_GPU = full_size(NB02)  # the yaml's model, batches, steps, evaluation and speed settings
HYBRID_SMOKE = dict(hidden_size=32, num_heads=2, intermediate_size=64, softmax_kv="routed", balance_coef=0.5,
                    seq_len=32, batch_size=2, steps=3, warmup_steps=1, eval_every=0, eval_windows=1,
                    speed_seq_lens=[32, 64], speed_batch=2, bench_min_time_s=0.02)
HYBRID_UTIL = 0.10  # assumed share of the bf16 peak for the hybrid models (GDN recurrence, routing gathers)
TRITON_WARMUP_S = 60.0  # the first fla/Triton call compiles and autotunes for about a minute
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
        work += 4 * 3 * timing_s(call, p["bench_min_time_s"] / 3)  # 4 variants x 3 rounds
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
    write_csv(speed, ctx, "attention_speed.csv")
    longest = speed[speed["seq_len"] == speed["seq_len"].max()].set_index("model")["tokens_per_s"]
    ctx.summary.update({"seq_len": int(speed["seq_len"].max()),
                        "dynamic_vs_static": float(longest["dynamic"] / longest["static"]),
                        "all_gdn_vs_static": float(longest["dynamic (all GDN)"] / longest["static"]),
                        "all_softmax_vs_static": float(longest["dynamic (all softmax)"] / longest["static"])})
    return {"study_config": dataclasses.asdict(cfg), "models": "untrained (seed 0): speed does not depend on training"}



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
    write_csv(runs.table, ctx, "runs.csv", index=True)
    write_csv(training_routing(runs.results), ctx, "training_routing.csv")
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
    write_csv(table, ctx, "runs.csv", index=True)
    write_csv(compare_experiments(table, cfg), ctx, "comparison.csv", index=True)
    write_csv(alpha_sweep_table(table, cfg), ctx, "alpha_sweep.csv", index=True)
    v = verdict(table, cfg)
    unigram = unigram_loss(cfg, domain_eval_data(cfg))
    (ctx.out / "verdict.json").write_text(json.dumps(v, indent=1, default=float) + "\n")
    (ctx.out / "verdict.md").write_text(verdict_text(v, cfg, cfg.steps * cfg.batch_size * cfg.seq_len, unigram) + "\n")
    ctx.summary.update({"outcome": v["outcome"], "delta_mean": float(v["delta_mean"]), "seed_spread": float(v["seed_spread"]),
                        "unigram_loss": unigram})
    return {"study_config": dataclasses.asdict(cfg), "from": list(ATTENTION_RUN_STEPS)}


ATTENTION_RUN_STEPS = ("04_attention_routing_seed0", "04_attention_routing_seed1", "04_attention_routing_alpha_sweep")


# ------------------------------------------------------------------------------ its steps
def speed_step() -> Step:
    return Step("03_attention_speed", "routed vs static attention: prefill throughput of the 4-layer hybrids, "
                f"{counts(HYBRID_GPU['speed_seq_lens'])} tokens",
                keeps=keeps(NB02, note="the models are untrained (speed only): model, speed_seq_lens, speed_batch and "
                            "bench_min_time_s are what matter"),
                estimate=attention_speed_estimate, run=run_attention_speed)


def comparison_steps() -> list[Step]:
    return [
        attention_seed_step(0),
        attention_seed_step(1),
        Step("04_attention_routing_alpha_sweep", "notebook 02: the alpha sweep (dynamic arm, seed 0)",
             keeps=keeps(NB02, dict(seeds=[0], lr_same=[]), "only the alpha sweep's runs"),
             estimate=attention_sweep_estimate, run=run_attention_sweep),
        Step("04_attention_routing_verdict", "notebook 02: comparison, verdict and sweep table from the three steps above",
             keeps=keeps(NB02, dict(lr_same=list(LR_SAME)), "reads the runs of the three steps above; no training"),
             estimate=lambda: Estimate(30.0, "no training: reads the runs, one unigram pass over the corpus (30 s, assumed)"),
             run=run_attention_verdict, after=ATTENTION_RUN_STEPS),
    ]
