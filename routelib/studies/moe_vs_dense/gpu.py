"""Notebook 03's GPU steps: the MoE FFN layer at Mixtral shapes, the reference run at GPU size, and a larger routing subject with its traces.

Each step calls the study's own functions at a size whose estimated H100/H200 device time fits one
slot (``routelib.gpu.plan.MAX_STEP_S``), and at toy sizes with ``smoke`` (CPU, CI) through the same code;
:mod:`routelib.gpu.steps` puts every study's steps in one ordered plan.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd

from routelib.gpu.plan import Context, Estimate, Step
from routelib.gpu.sizing import BF16_PEAK, GROUPED_MM_RATE, counts, full_size, keeps, timing_s, write_csv


# --------------------------------------------------------------------------- 1. MoE kernels
MOE_KERNELS = dict(hidden=4096, ffn=14336, experts=8, top_k=2, tokens=(4096, 8192, 16384), dtype="bf16",
                   rounds=3, min_time_s=0.5)  # Mixtral-8x7B's MoE FFN layer (docs/design.md §5)
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
            work += p["rounds"] * timing_s(flops * slow / GROUPED_MM_RATE, p["min_time_s"])
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
    write_csv(df, ctx, "moe_bench.csv")
    mid = df[df["tokens"] == sorted(p["tokens"])[len(p["tokens"]) // 2]].set_index("name")
    ctx.summary.update({"tokens": int(mid["tokens"].iloc[0]),
                        "grouped_vs_grouped_mm_alone": float(mid.loc["moe_grouped", "vs_grouped_mm_alone"]),
                        "grouped_vs_naive": float(mid.loc["moe_grouped", "speedup"]),
                        "grouped_vs_dense_equal_total": float(mid.loc["moe_grouped", "speedup_vs_dense_total"]),
                        "grouped_tflops": float(mid.loc["moe_grouped", "tflops"])})
    return {"benchmark": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()}}



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


def study_config(ctx: Context | None, smoke: bool = False):
    from routelib.studies.moe_vs_dense import MoEStudyConfig

    p = MOE_LM_SMOKE if smoke else MOE_LM_GPU
    where = {} if ctx is None else {"device": ctx.device, "out_dir": str(ctx.checkpoints / "moe_vs_dense")}
    return MoEStudyConfig(**p, **where)


def moe_vs_dense_estimate() -> Estimate:
    from routelib.studies.moe_vs_dense import flops_split

    cfg = study_config(None)
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
    from routelib.studies.moe_vs_dense.reference import reference_run

    cfg = study_config(ctx, ctx.smoke)
    manifest = reference_run(cfg, out_dir=ctx.out, seeds=(0,), eval_every=2 if ctx.smoke else REFERENCE_EVAL_EVERY,
                             log_every=10 if not ctx.smoke else 1)
    comp = pd.read_csv(ctx.out / "comparison.csv", index_col=0)
    ctx.summary.update({f"ppl_{arm}": float(comp.loc[arm, "ppl_overall"]) for arm in comp.index})
    prefill = comp["prefill_ms"]
    ctx.summary.update({"prefill_speedup_vs_dense_total": float(prefill["dense_total"] / prefill["moe"]),
                        "train_tok_s_moe": float(comp.loc["moe", "train_tokens_per_s"])})
    return manifest["params"]



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
    from routelib.studies.moe_vs_dense import train_arm, training_batches
    from routelib.studies.moe_vs_dense.subject import export_subject

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


# ------------------------------------------------------------------------------ its steps
def kernels_step() -> Step:
    mk = MOE_KERNELS
    return Step("01_moe_kernels", f"MoE FFN layer at Mixtral shapes (d {mk['hidden']}, FFN {mk['ffn']}, {mk['experts']} "
                f"experts, top-{mk['top_k']}, {mk['dtype']}), {counts(mk['tokens'])} tokens",
                keeps="no yaml: docs/design.md §5's shapes, routelib.moe_bench's defaults", estimate=moe_kernels_estimate,
                run=run_moe_kernels)


def reference_step() -> Step:
    return Step("03_moe_vs_dense", "notebook 03's reference run: MoE vs dense LMs at the GPU size, one seed",
                keeps=keeps(NB03, note="one seed"), estimate=moe_vs_dense_estimate, run=run_moe_vs_dense)


def subject_steps() -> list[Step]:
    sg = SUBJECT_GPU
    return [
        Step("06_subject_train", f"a larger routing subject: MoE LM, {sg['num_layers']} layers, hidden {sg['hidden_size']}, "
             f"{sg['num_experts']} experts, top-{sg['top_k']}, "
             f"{sg['steps'] * sg['batch_size'] * sg['seq_len'] / 1e6:.0f} M tokens",
             keeps=keeps(NB03, SUBJECT_CHANGES, "the MoE arm only"),
             estimate=subject_train_estimate, run=run_subject_train, checkpoint="subject"),
        Step("06_subject_traces", "the larger subject: export (model card) and routing traces on HumanEval + GSM8K",
             keeps="the shipped traces' settings: all 164 HumanEval, the first 100 GSM8K problems, 192 greedy tokens, BOS",
             estimate=subject_traces_estimate, run=run_subject_traces, after=("06_subject_train",)),
    ]
