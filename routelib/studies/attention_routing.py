"""Per-token routing between Gated DeltaNet and softmax attention vs a static hybrid (notebook 02).

Seed ``001`` ("Dynamic Per-Token Layer Routing") asks whether a 4-layer model whose middle layers let
each token choose Gated DeltaNet or softmax attention beats the static hybrid [GDN, GDN, GDN,
softmax]. Its README states two possible outcomes -- "dynamic routing wins" (adaptive attention
helps) or "baseline wins" (a static assignment is sufficient) -- and its committed run (DESIGN.md §6)
had the baseline winning (best validation loss 3.83 vs 4.43) with a ~55/45 split in layers 1-2, but
it computed both branches for every token, kept Gumbel noise at evaluation, needed alpha = 0.5 (its
text says 0.01) to avoid collapsing to all-GDN, and trained the arms at different learning rates.

Here (models: :mod:`routelib.models.hybrid`):

- runs (:class:`RunSpec`): each arm at the seed's own learning rates (1e-3 static, 2e-3 dynamic) and
  both arms at the same learning rate(s) ``lr_same`` (the fair comparison; the tuned rate is the one
  with the lowest mean validation loss), for every seed in ``seeds``; the arms of one seed see the
  same batches and start from the same RNG state;
- an alpha sweep: the dynamic arm at each load-balancing weight of ``alpha_sweep``, reporting the
  routing split each gives;
- measured in the run: validation loss and perplexity per domain, training tokens/s, prefill
  (inference) tokens/s over a sweep of sequence lengths, routing statistics over training (share of
  tokens per branch and layer, router entropy, balance loss) and on held-out text;
- the seed's ``compare_experiments`` (:func:`compare_experiments`, :func:`verdict`) and
  ``visualize_routing`` (:func:`route_tokens`, :func:`softmax_share`, :func:`routing_html`);
- the **reference run** (DESIGN.md §7, last section: :func:`reference_run`, :func:`load_reference`,
  :func:`reference_verdict`): the same models at a scale where they have learned something, on the CPU,
  ``python -m routelib.studies.attention_routing reference``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from routelib import cli, paths
from routelib.bench import compare
from routelib.config import from_params
from routelib.data import TokenWindows, eval_batches, load_tokenizer, token_stream
from routelib.data.tokenizer import separator_id
from routelib.errors import ConfigError
from routelib.models.hybrid import DYNAMIC_LAYOUT, STATIC_LAYOUT, HybridConfig, HybridLM
from routelib.evaluation import domain_eval_data, perplexity_by_domain, train_tokens_per_s
from routelib.reference import (InvocationLog, load_manifest, load_records, reference_invocation, reference_made,
                                reference_parser, split_parts, t_interval, wait_for, write_manifest, write_record)
from routelib.train import TrainConfig, TrainResult, make_optimizer, train

ARMS = {"static": STATIC_LAYOUT, "dynamic": DYNAMIC_LAYOUT}


@dataclass
class HybridStudyConfig:
    # --- the models (both arms: 4 layers, same widths) ---
    hidden_size: int = 64  # H: residual width (the seed: 768)
    num_heads: int = 4  # heads of every GDN and softmax mixer (the seed: 12)
    intermediate_size: int = 128  # SwiGLU FFN width of every block
    softmax_kv: str = "routed"  # routed softmax branch attends over softmax-routed tokens only ("routed") or all ("all")
    tokenizer: str = "bpe8k"  # the project's BPE (8192 tokens)
    # --- routing (dynamic arm) ---
    balance_coef: float = 0.5  # alpha of the main dynamic runs (the seed's code used 0.5; its text says 0.01)
    tau_start: float = 1.0  # Gumbel-softmax temperature at step 0, annealed exponentially ...
    tau_end: float = 0.5  # ... to this at the last training step
    alpha_sweep: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.5])  # alphas of the sweep ([] = none)
    alpha_sweep_steps: int = 0  # training steps of each sweep run (0 = steps); first seed, lr_dynamic
    # --- training: the arms of one seed see the same batches ---
    seq_len: int = 64  # tokens per training window
    batch_size: int = 8  # windows per optimizer step
    steps: int = 60  # optimizer steps per run
    warmup_steps: int = 6  # linear warm-up steps
    lr_static: float = 1e-3  # the seed's learning rate for the static baseline
    lr_dynamic: float = 2e-3  # the seed's learning rate for the dynamic model
    lr_same: list[float] = field(default_factory=lambda: [2e-3])  # both arms also at each of these ([] = none)
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # model init and data order, one run per arm each
    eval_every: int = 0  # validation loss during training every this many steps (0 = only at the end)
    out_dir: str = "runs/02_dynamic_attention_routing"  # checkpoints (relative to the repo root)
    # --- evaluation and measurement ---
    eval_windows: int = 8  # held-out windows per domain (validation split) for perplexity and routing
    speed_seq_lens: list[int] = field(default_factory=lambda: [64, 128, 256])  # prefill lengths timed
    speed_batch: int = 4  # sequences per timed forward
    bench_min_time_s: float = 0.2  # time each measured call for at least this long (split over rounds)
    device: str = "auto"  # "auto" (cuda when available) or "cpu"
    num_threads: int = 0  # torch CPU threads for the run (tiny CPU models: 1 is faster, and immune to a
    # busy machine); 0 = leave torch's default

    def __post_init__(self):
        if self.num_threads < 0:
            raise ConfigError(f"num_threads={self.num_threads!r}: need >= 0 (0 = torch's default)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds!r}: need at least one seed, no repeats")
        for name in ("seeds", "speed_seq_lens"):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a list of ints")
        for name in ("lr_same", "alpha_sweep"):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a list of numbers")
        self.lr_same = [float(v) for v in self.lr_same]
        self.alpha_sweep = [float(v) for v in self.alpha_sweep]
        for lr in (self.lr_static, self.lr_dynamic, *self.lr_same):
            if not (lr > 0 and math.isfinite(lr)):
                raise ConfigError(f"learning rates must be positive, got {lr!r}")
        if any(a < 0 for a in self.alpha_sweep):
            raise ConfigError(f"alpha_sweep={self.alpha_sweep!r}: alphas must be >= 0")
        if not self.speed_seq_lens or min(self.speed_seq_lens) < 1:
            raise ConfigError(f"speed_seq_lens={self.speed_seq_lens!r}: need positive lengths")
        if self.alpha_sweep_steps < 0 or self.steps < 1:
            raise ConfigError(f"need steps >= 1 and alpha_sweep_steps >= 0, got {self.steps}, {self.alpha_sweep_steps}")
        self.model_config("dynamic", self.balance_coef, self.steps)  # validates sizes, softmax_kv, alpha

    def model_config(self, arm: str, alpha: float, steps: int) -> HybridConfig:
        """The HybridConfig of ``arm`` ("static" | "dynamic") with balance weight alpha; the Gumbel
        temperature anneals over the run's ``steps``."""
        if arm not in ARMS:
            raise ConfigError(f"arm={arm!r}: choose one of {list(ARMS)}")
        return HybridConfig(
            vocab_size=len(load_tokenizer(self.tokenizer)), hidden_size=self.hidden_size, num_heads=self.num_heads,
            intermediate_size=self.intermediate_size, layers=ARMS[arm], softmax_kv=self.softmax_kv,
            balance_coef=alpha if arm == "dynamic" else 0.0, tau_start=self.tau_start, tau_end=self.tau_end,
            tau_anneal_steps=steps,
        )

    def run_dir(self):
        return paths.in_repo(self.out_dir)

    def device_(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass(frozen=True)
class RunSpec:
    arm: str  # "static" or "dynamic"
    lr: float  # peak learning rate
    seed: int  # model init and batch order
    alpha: float  # load-balancing weight (0 for the static arm)
    steps: int  # optimizer steps

    @property
    def name(self) -> str:
        return f"{self.arm}-lr{self.lr:g}-a{self.alpha:g}-s{self.seed}-n{self.steps}"


def plan(cfg: HybridStudyConfig) -> list[RunSpec]:
    """Every distinct training run: per seed, static at lr_static, dynamic at lr_dynamic (alpha =
    balance_coef), both arms at each of lr_same; then the alpha sweep (dynamic, lr_dynamic, first
    seed). A run two groups share is listed (and trained) once."""
    runs = []
    for seed in cfg.seeds:
        runs += [RunSpec("static", cfg.lr_static, seed, 0.0, cfg.steps),
                 RunSpec("dynamic", cfg.lr_dynamic, seed, cfg.balance_coef, cfg.steps)]
        for lr in cfg.lr_same:
            runs += [RunSpec("static", lr, seed, 0.0, cfg.steps), RunSpec("dynamic", lr, seed, cfg.balance_coef, cfg.steps)]
    sweep_steps = cfg.alpha_sweep_steps or cfg.steps
    runs += [RunSpec("dynamic", cfg.lr_dynamic, cfg.seeds[0], a, sweep_steps) for a in cfg.alpha_sweep]
    return list(dict.fromkeys(runs))


# ------------------------------------------------------------------------------------- training
def training_batches(cfg: HybridStudyConfig, seed: int) -> TokenWindows:
    """Random windows over the train split of every domain; the same for both arms of a seed."""
    return TokenWindows(token_stream(split="train", tokenizer=cfg.tokenizer), cfg.seq_len, cfg.batch_size, seed=seed)


def routing_loss(model, x: torch.Tensor, y: torch.Tensor):
    """``routelib.train`` loss: next-token cross-entropy + the weighted balance loss, logging per
    routed layer L the share of tokens sent to softmax (``softmax_frac_L``), the router entropy in bits
    (``entropy_L``), the unweighted balance loss and the Gumbel temperature."""
    core = getattr(model, "module", model)  # DDP wraps the model
    out = model(x, output_routing=True)
    lm = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
    metrics = {"lm_loss": lm.detach()}
    if out.routing is None:
        return lm, metrics
    r = out.routing
    frac, ent = r.to_softmax.float().mean((0, 1)), r.entropy_bits().detach()  # (R,) each
    for j, layer in enumerate(core.config.routed_layers):
        metrics[f"softmax_frac_L{layer}"] = frac[j]
        metrics[f"entropy_L{layer}"] = ent[j]
    metrics["balance_loss"] = out.balance_loss.mean().detach()
    metrics["tau"] = float("nan") if r.temperature is None else r.temperature
    return lm + out.aux_loss.to(lm.dtype), metrics


def train_run(spec: RunSpec, cfg: HybridStudyConfig, eval_data: list | None = None, *, eval_every: int | None = None,
              log_every: int | None = None, ckpt_every: int = 0, stop_step: int | None = None) -> tuple[HybridLM, TrainResult]:
    """Train one run with ``routelib.train``. Checkpoints go to ``out_dir/checkpoints/<name>-<hash>``,
    the hash covering everything that shapes the run: an interrupted run resumes, a finished one is
    loaded instead of retrained. ``eval_every`` (default ``cfg.eval_every``) and ``log_every`` (default:
    20 records per run) set the history's density; ``ckpt_every`` > 0 also checkpoints along the way (a
    killed run loses at most that many steps); ``stop_step`` ends early with the schedule unchanged (the
    reproduction test)."""
    torch.manual_seed(spec.seed)
    hcfg = cfg.model_config(spec.arm, spec.alpha, spec.steps)
    model = HybridLM(hcfg)
    every = cfg.eval_every if eval_every is None else eval_every
    tcfg = TrainConfig(max_steps=spec.steps, lr=spec.lr, warmup_steps=min(cfg.warmup_steps, spec.steps),
                       seed=spec.seed, log_every=log_every or max(1, spec.steps // 20), eval_every=every,
                       eval_batches=10_000, ckpt_every=ckpt_every, device=cfg.device)
    identity = [dataclasses.asdict(hcfg), dataclasses.asdict(tcfg), cfg.tokenizer, cfg.seq_len, cfg.batch_size]
    run_hash = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    tcfg.out_dir = str(cfg.run_dir() / "checkpoints" / f"{spec.name}-{run_hash}")
    tcfg.stop_step = stop_step
    result = train(model, training_batches(cfg, spec.seed), tcfg, eval_data=eval_data if every else None,
                   loss_fn=routing_loss, resume=True)
    return model.eval(), result


@torch.no_grad()
def routing_summary(model: HybridLM, eval_data: dict[str, list]) -> dict[str, float]:
    """Argmax routing on held-out windows: per routed layer L the share of tokens to softmax
    (``softmax_frac_L``) and mean router entropy in bits (``entropy_L``); {} for a static model."""
    if not model.config.routed_layers:
        return {}
    device = next(model.parameters()).device
    soft, ent, n = 0.0, 0.0, 0
    for batches in eval_data.values():
        for x, _ in batches:
            r = model(x.to(device), output_routing=True).routing
            tokens = x.numel()
            soft, ent, n = soft + r.to_softmax.float().mean((0, 1)).cpu() * tokens, ent + r.entropy_bits().cpu() * tokens, n + tokens
    out = {}
    for j, layer in enumerate(model.config.routed_layers):
        out[f"softmax_frac_L{layer}"] = float(soft[j] / n)
        out[f"entropy_L{layer}"] = float(ent[j] / n)
    return out


@dataclass
class StudyRuns:
    table: pd.DataFrame  # one row per run (index: run name): spec, validation loss/ppl, speed, routing
    models: dict[str, HybridLM]  # run name -> trained model (eval mode)
    results: dict[str, TrainResult]  # run name -> training history


def run_all(cfg: HybridStudyConfig, specs: list[RunSpec], eval_data: dict[str, list]) -> StudyRuns:
    """Train (or load) every run, then measure it on the held-out windows: validation loss (log of
    the token-weighted perplexity), perplexity per domain, training tokens/s, routing summary."""
    flat = [b for batches in eval_data.values() for b in batches]
    rows, models, results = [], {}, {}
    for spec in specs:
        model, result = train_run(spec, cfg, flat)
        ppl = perplexity_by_domain(model, eval_data)
        rows.append(dict(run=spec.name, **dataclasses.asdict(spec), val_loss=math.log(ppl["overall"]),
                         best_eval_loss=min((r["eval_loss"] for r in result.history if "eval_loss" in r), default=float("nan")),
                         train_loss=result.history[-1]["lm_loss"], train_tokens_per_s=train_tokens_per_s(result),
                         params_M=model.num_parameters() / 1e6, **{f"ppl_{d}": v for d, v in ppl.items()},
                         **routing_summary(model, eval_data)))
        models[spec.name], results[spec.name] = model, result
    return StudyRuns(pd.DataFrame(rows).set_index("run"), models, results)


# ---------------------------------------------------------------------------------- comparisons
def pairings(cfg: HybridStudyConfig) -> dict[str, tuple[float, float]]:
    """Named (static lr, dynamic lr) comparisons: the seed's rates, and each equal rate in lr_same."""
    out = {"seed lrs": (cfg.lr_static, cfg.lr_dynamic)}
    out.update({f"same lr {lr:g}": (lr, lr) for lr in cfg.lr_same})
    return out


def main_runs(table: pd.DataFrame, cfg: HybridStudyConfig) -> pd.DataFrame:
    main = table[(table["steps"] == cfg.steps) & (table["seed"].isin(cfg.seeds))]
    return main[(main["arm"] == "static") | (main["alpha"] == cfg.balance_coef)]


def compare_experiments(table: pd.DataFrame, cfg: HybridStudyConfig, speed: pd.DataFrame | None = None) -> pd.DataFrame:
    """The seed's ``compare_experiments``, per pairing (see :func:`pairings`) and over seeds: mean
    and std of each arm's validation loss and perplexity, the per-seed difference dynamic - static
    (negative: dynamic better), training tokens/s, and (with ``speed`` from :func:`inference_speed`)
    prefill tokens/s at the longest measured length."""
    main = main_runs(table, cfg)
    rows = []
    for pairing, (lr_s, lr_d) in pairings(cfg).items():
        s = main[(main["arm"] == "static") & np.isclose(main["lr"], lr_s)].set_index("seed").sort_index()
        d = main[(main["arm"] == "dynamic") & np.isclose(main["lr"], lr_d)].set_index("seed").sort_index()
        delta = (d["val_loss"] - s["val_loss"]).dropna()
        row = dict(pairing=pairing, lr_static=lr_s, lr_dynamic=lr_d, seeds=len(delta),
                   static_val_loss=s["val_loss"].mean(), static_val_loss_std=s["val_loss"].std(ddof=0),
                   dynamic_val_loss=d["val_loss"].mean(), dynamic_val_loss_std=d["val_loss"].std(ddof=0),
                   delta_mean=delta.mean(), delta_min=delta.min(), delta_max=delta.max(),
                   static_ppl=s["ppl_overall"].mean(), dynamic_ppl=d["ppl_overall"].mean(),
                   static_train_tok_s=s["train_tokens_per_s"].mean(), dynamic_train_tok_s=d["train_tokens_per_s"].mean())
        for col in [c for c in d.columns if c.startswith("softmax_frac_L")]:
            row[f"dynamic_{col}"] = d[col].mean()
        rows.append(row)
    out = pd.DataFrame(rows).set_index("pairing")
    if speed is not None:
        longest = speed[speed["seq_len"] == speed["seq_len"].max()].set_index("model")["tokens_per_s"]
        out["static_prefill_tok_s"], out["dynamic_prefill_tok_s"] = longest.get("static"), longest.get("dynamic")
    return out


def tuned_lr(table: pd.DataFrame, cfg: HybridStudyConfig) -> float | None:
    """The equal learning rate of lr_same with the lowest validation loss averaged over both arms
    and all seeds (None when lr_same is empty)."""
    if not cfg.lr_same:
        return None
    main = main_runs(table, cfg)
    means = {lr: main[np.isclose(main["lr"], lr)]["val_loss"].mean() for lr in cfg.lr_same}
    return min(means, key=means.get)


def verdict(table: pd.DataFrame, cfg: HybridStudyConfig, speed: pd.DataFrame | None = None) -> dict:
    """Which of the seed's two expected outcomes held, computed from the runs.

    At the tuned equal learning rate (the seed's own rates when lr_same is empty), with
    delta = dynamic - static validation loss per seed: "dynamic routing wins" when delta < 0 for every
    seed *and* the mean |delta| exceeds the seed-to-seed spread (the larger std over seeds of either
    arm's loss); "baseline wins" likewise with delta > 0; else "no clear winner", with ``leaning``
    naming the arm every seed favoured when the signs agree but the gap is within the spread. Also:
    whether routing collapsed (a routed layer with < 5 % or > 95 % of held-out tokens on softmax)
    and the prefill speed ratio at the longest measured length."""
    comp = compare_experiments(table, cfg, speed)
    lr = tuned_lr(table, cfg)
    key = "seed lrs" if lr is None else f"same lr {lr:g}"
    row = comp.loc[key]
    spread = max(row["static_val_loss_std"], row["dynamic_val_loss_std"])
    leaning = "dynamic" if row["delta_max"] < 0 else "baseline" if row["delta_min"] > 0 else None
    clear = leaning is not None and abs(row["delta_mean"]) > spread
    outcome = {"dynamic": "dynamic routing wins", "baseline": "baseline wins"}[leaning] if clear else "no clear winner"
    fracs = {c[len("dynamic_softmax_frac_"):]: row[c] for c in comp.columns if c.startswith("dynamic_softmax_frac_")}
    collapsed = [layer for layer, f in fracs.items() if f < 0.05 or f > 0.95]
    out = dict(outcome=outcome, leaning=leaning, pairing=key, seeds=int(row["seeds"]), delta_mean=row["delta_mean"],
               delta_min=row["delta_min"], delta_max=row["delta_max"], seed_spread=spread,
               gap_exceeds_spread=bool(abs(row["delta_mean"]) > spread), softmax_share=fracs, collapsed_layers=collapsed,
               seed_lrs_delta_mean=comp.loc["seed lrs", "delta_mean"])
    if speed is not None:
        out["prefill_speed_ratio"] = row["dynamic_prefill_tok_s"] / row["static_prefill_tok_s"]
    return out


def unigram_loss(cfg: HybridStudyConfig, eval_data: dict[str, list]) -> float:
    """Validation loss (nats/token, same windows as the models) of a unigram model: token
    frequencies of the training split, add-one smoothed. A reference for how far training got."""
    counts = np.bincount(token_stream(split="train", tokenizer=cfg.tokenizer), minlength=len(load_tokenizer(cfg.tokenizer)))
    logp = np.log((counts + 1.0) / (counts.sum() + len(counts)))  # (V,)
    targets = np.concatenate([y.flatten().numpy() for batches in eval_data.values() for _, y in batches])
    return float(-logp[targets].mean())


def verdict_text(v: dict, cfg: HybridStudyConfig, tokens_per_run: int, unigram: float | None = None) -> str:
    """The verdict as a few Markdown sentences (every number from ``v``, ``cfg`` and ``unigram``,
    the validation loss of :func:`unigram_loss`)."""
    meaning = {"dynamic routing wins": "the seed's first outcome (adaptive attention helps)",
               "baseline wins": "the seed's second outcome (a static assignment is sufficient)",
               "no clear winner": "neither of the seed's outcomes is supported"}[v["outcome"]]
    if v["outcome"] == "no clear winner":
        meaning += (f" (every seed leans to the {v['leaning']} model, by less than the seed-to-seed spread)"
                    if v["leaning"] else " (the sign of the gap depends on the seed)")
    lines = [f"**{v['outcome']}** at {tokens_per_run:,} training tokens per run ({cfg.steps} steps), "
             f"hidden {cfg.hidden_size}, {v['seeds']} seed(s), compared at `{v['pairing']}` -- {meaning}.",
             f"Validation loss dynamic - static: mean {v['delta_mean']:+.3f} (per seed {v['delta_min']:+.3f} to "
             f"{v['delta_max']:+.3f}); the larger seed-to-seed std of an arm is {v['seed_spread']:.3f}, so the gap "
             f"{'exceeds' if v['gap_exceeds_spread'] else 'does not exceed'} the spread across seeds"
             + (f"; for scale, a unigram model (training-split token frequencies) scores {unigram:.3f}." if unigram is not None else "."),
             f"At the seed's own learning rates (static {cfg.lr_static:g}, dynamic {cfg.lr_dynamic:g}) the mean gap "
             f"is {v['seed_lrs_delta_mean']:+.3f}."]
    share = ", ".join(f"{layer}: {100 * f:.0f} % softmax" for layer, f in v["softmax_share"].items())
    lines.append(f"Held-out routing split of the dynamic arm: {share}"
                 + (f"; collapsed layers: {', '.join(v['collapsed_layers'])}." if v["collapsed_layers"] else "; no layer collapsed."))
    if "prefill_speed_ratio" in v:
        lines.append(f"Prefill throughput dynamic / static at the longest length: {v['prefill_speed_ratio']:.2f}x.")
    return "\n\n".join(lines)


def alpha_sweep_table(table: pd.DataFrame, cfg: HybridStudyConfig) -> pd.DataFrame:
    """The alpha sweep's runs, one row per alpha: held-out softmax share and router entropy per
    routed layer, the final training balance loss and validation loss."""
    steps = cfg.alpha_sweep_steps or cfg.steps
    sweep = table[(table["arm"] == "dynamic") & np.isclose(table["lr"], cfg.lr_dynamic) & (table["seed"] == cfg.seeds[0])
                  & (table["steps"] == steps) & table["alpha"].isin(cfg.alpha_sweep)]
    cols = [c for c in sweep.columns if c.startswith(("softmax_frac_L", "entropy_L"))] + ["val_loss", "ppl_overall"]
    return sweep.set_index("alpha").sort_index()[cols]


def training_routing(results: dict[str, TrainResult]) -> pd.DataFrame:
    """Routing statistics over training, long format: run, step, metric, value (window means of
    softmax_frac_L*, entropy_L*, balance_loss, tau)."""
    rows = []
    for name, result in results.items():
        for rec in result.history:
            rows += [dict(run=name, step=rec["step"], metric=k, value=v) for k, v in rec.items()
                     if k.startswith(("softmax_frac_L", "entropy_L")) or k in ("balance_loss", "tau")]
    return pd.DataFrame(rows, columns=["run", "step", "metric", "value"])


# ---------------------------------------------------------------------------------- measurement
@torch.no_grad()
def inference_speed(static: HybridLM, dynamic: HybridLM, cfg: HybridStudyConfig, rounds: int = 3, warmup: int = 3,
                    repeats: int | None = None) -> pd.DataFrame:
    """Prefill throughput (eval mode, one forward of ``speed_batch`` held-out windows; bf16 autocast
    on CUDA as in training, fp32 on CPU) per sequence length: the static model, the dynamic model
    with its own argmax routing, and the dynamic model forced to all-GDN / all-softmax (the two ends
    of its cost). Timed round-robin in one run per length (``routelib.bench.compare``). Columns:
    model, seq_len, median_ms, tokens_per_s, softmax_frac (share of routed-layer tokens on softmax).
    ``warmup`` and ``repeats`` (None: enough to fill ``bench_min_time_s``) are per function and round
    (``routelib.bench.time_fn``); few suffice for long sequences."""
    device = next(static.parameters()).device

    def prefill(model, x, routes=None):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model(x, routes=routes)

    stream = token_stream(split="validation", tokenizer=cfg.tokenizer)
    rows = []
    for t in cfg.speed_seq_lens:
        x = eval_batches(stream, t, cfg.speed_batch, max_windows=cfg.speed_batch)[0][0].to(device)  # (B, T)
        r = len(dynamic.config.routed_layers)
        forced = {"dynamic (all GDN)": torch.zeros(*x.shape, r, dtype=torch.bool, device=device),
                  "dynamic (all softmax)": torch.ones(*x.shape, r, dtype=torch.bool, device=device)}
        fns = {"static": lambda: prefill(static, x), "dynamic": lambda: prefill(dynamic, x)}
        fns.update({name: (lambda routes=routes: prefill(dynamic, x, routes)) for name, routes in forced.items()})
        timing = compare(fns, items=x.numel(), rounds=rounds, min_time_s=cfg.bench_min_time_s / rounds, device=device,
                         warmup=warmup, repeats=repeats)
        share = float(dynamic(x, output_routing=True).routing.to_softmax.float().mean())
        for _, row in timing.iterrows():
            frac = {"static": 0.0, "dynamic": share, "dynamic (all GDN)": 0.0, "dynamic (all softmax)": 1.0}[row["name"]]
            rows.append(dict(model=row["name"], seq_len=t, median_ms=row["median_ms"], tokens_per_s=row["items_per_s"],
                             softmax_frac=frac))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- token analysis
def token_type(text: str) -> str:
    """Coarse class of a decoded token: space, newline, number, punctuation/symbol, word (with a
    leading space), capitalised word, word piece (no leading space), mixed."""
    s = text.strip()
    if not s:
        return "newline" if "\n" in text else "space"
    if s.isdigit():
        return "number"
    if all(not c.isalnum() for c in s):
        return "punctuation/symbol"
    if s.isalpha():
        if text[0] not in " \t\n":
            return "word piece"
        return "capitalised word" if s[0].isupper() else "word"
    return "mixed"


@torch.no_grad()
def route_tokens(model: HybridLM, eval_data: dict[str, list], tokenizer) -> pd.DataFrame:
    """Argmax routing of every held-out token: one row per (domain, window, position) with the token,
    its type (:func:`token_type`, or "document end"), and per routed layer L the decision
    (``softmax_L``, bool) and the router's softmax probability (``p_softmax_L``)."""
    device = next(model.parameters()).device
    sep = separator_id(tokenizer)
    seen = sorted({int(i) for batches in eval_data.values() for x, _ in batches for i in x.unique()})
    vocab = {i: tokenizer.decode([i]) for i in seen}
    frames = []
    for domain, batches in eval_data.items():
        w0 = 0
        for x, _ in batches:
            r = model(x.to(device), output_routing=True).routing
            b, t = x.shape
            ids = x.flatten().tolist()
            frame = {"domain": domain, "window": np.repeat(np.arange(w0, w0 + b), t), "position": np.tile(np.arange(t), b),
                     "token_id": ids, "token": [vocab[i] for i in ids],
                     "type": ["document end" if i == sep else token_type(vocab[i]) for i in ids]}
            probs = r.probs[..., 1].flatten(0, 1).cpu().numpy()  # (B*T, R)
            soft = r.to_softmax.flatten(0, 1).cpu().numpy()  # (B*T, R)
            for j, layer in enumerate(model.config.routed_layers):
                frame[f"softmax_L{layer}"], frame[f"p_softmax_L{layer}"] = soft[:, j], probs[:, j]
            frames.append(pd.DataFrame(frame))
            w0 += b
    return pd.concat(frames, ignore_index=True)


def softmax_share(tokens: pd.DataFrame, by: str, bins: int | None = None) -> pd.DataFrame:
    """Share of tokens routed to softmax per routed layer, grouped by ``by`` (a column of
    :func:`route_tokens`; ``bins`` cuts a numeric column such as position into equal-width bins),
    with the token count. Sorted by the mean share over layers, highest first."""
    cols = [c for c in tokens.columns if c.startswith("softmax_L")]
    key = pd.cut(tokens[by], bins, include_lowest=True) if bins else tokens[by]
    grouped = tokens.groupby(key, observed=True)
    out = grouped[cols].mean().rename(columns=lambda c: c.replace("softmax_", "softmax share "))
    out["tokens"] = grouped.size()
    if bins:
        return out
    return out.iloc[np.argsort(-out.iloc[:, : len(cols)].mean(axis=1).to_numpy(), kind="stable")]


def top_tokens(tokens: pd.DataFrame, min_count: int = 5, n: int = 10) -> pd.DataFrame:
    """The ``n`` tokens (seen at least ``min_count`` times) most and least often routed to softmax,
    averaged over routed layers. Columns: token, count, softmax share, end ("most" | "least")."""
    cols = [c for c in tokens.columns if c.startswith("softmax_L")]
    per = tokens.assign(share=tokens[cols].mean(axis=1)).groupby("token_id").agg(
        token=("token", "first"), count=("share", "size"), share=("share", "mean"))
    per = per[per["count"] >= min_count].sort_values(["share", "count"], ascending=[False, False], kind="stable")
    most, least = per.head(n).assign(end="most"), per.tail(n).iloc[::-1].assign(end="least")
    return pd.concat([most, least]).rename(columns={"share": "softmax share"}).reset_index(drop=True)


# ================================================================================ reference run
# Notebook 02's reference run (DESIGN.md §7): static vs dynamic GDN/softmax routing at a scale where the
# models have learned something, on the CPU, its small result files committed under
# ``data/reference/02_dynamic_attention_routing/`` beside a manifest.
#
# The runs (:func:`reference_plan`; the models, training and measurements above; the arms of one seed
# see the same batches):
#
# 1. ``lr_sweep``: both arms, first seed, ``sweep_steps`` steps, at every rate of ``lr_same``; the
#    **shared rate** is the one with the lowest mean validation loss over both arms (:func:`sweep_table`);
# 2. ``shared``: both arms at the shared rate for every seed of ``seeds`` (the comparison);
# 3. ``seed_lrs``: static at ``lr_static``, dynamic at ``lr_dynamic`` (the seed's unequal rates), first seed;
# 4. ``alpha``: the dynamic arm at the shared rate at every alpha of ``alpha_sweep``, first seed,
#    ``alpha_sweep_steps`` steps (0 = ``steps``).
#
# A run two groups share is trained once. Every run checkpoints and resumes (``routelib.train``); its
# history and final per-domain validation loss are written as soon as it finishes (``history/``,
# ``final/``), so several processes can train disjoint parts side by side (``part=(i, n)``), a part
# waiting for the sweep before it starts its share of the rest. The invocation without a part trains
# whatever is missing, measures (unigram reference, the dynamic - static difference with a 95 % t-interval
# over seeds, training and prefill throughput interleaved in one run, routing by domain, token type and
# position), and writes the manifest last. ``python -m routelib.studies.attention_routing reference
# --help`` lists the options; :data:`REFERENCE_DEFAULTS` is the configuration it runs by default.
REFERENCE_DIR = "data/reference/02_dynamic_attention_routing"  # committed results (DESIGN.md §7)
GROUPS = ("lr_sweep", "shared", "seed_lrs", "alpha")  # run groups, in training order
STEP_COST = {"static": 1.1, "dynamic": 1.0}  # relative CPU time of a training step (issue-13 pilot, hidden 128-256)

#: The reference configuration (HybridStudyConfig fields the command line overrides), sized by the
#: issue-13 pilot to fit ~100 min as two 1-thread processes on an idle 2-core CPU (README, notebook 02).
REFERENCE_DEFAULTS = dict(
    hidden_size=128, num_heads=4, intermediate_size=512, seq_len=256, batch_size=8, steps=700, warmup_steps=35,
    lr_same=[1e-3, 2e-3, 4e-3], seeds=[0, 1, 2], balance_coef=0.5, alpha_sweep=[0.0, 0.01, 0.1, 0.5],
    alpha_sweep_steps=350, eval_every=50, eval_windows=32, speed_seq_lens=[256], speed_batch=8, device="cpu",
    out_dir="runs/02_reference",
)


@dataclass
class ReferenceSettings:
    """How the reference run is run and measured, beyond the models' HybridStudyConfig."""

    sweep_steps: int = 175  # training steps of every LR-sweep run (the shared rate is picked from them)
    log_every: int = 10  # a training-history record (window means) every this many steps
    ckpt_every: int = 100  # checkpoint every this many steps (a killed part resumes from the last one)
    curve_batches: int = 1  # held-out batches (8 windows) per domain on the loss curve during training
    prefill_seq_lens: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])  # batch-1 prefill sweep
    speed_rounds: int = 5  # round-robin rounds of every timing (training step, prefill)
    position_bins: int = 8  # position buckets of the routing breakdown
    wait_s: float = 4 * 3600.0  # a part waits this long for the other parts' sweep runs, then stops (rerun resumes)

    def __post_init__(self):
        for name in ("sweep_steps", "log_every", "curve_batches", "speed_rounds", "position_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: need >= 1")
        if self.ckpt_every < 0:
            raise ConfigError(f"ckpt_every={self.ckpt_every!r}: need >= 0 (0 = only at the end)")
        if not self.prefill_seq_lens or min(self.prefill_seq_lens) < 1:
            raise ConfigError(f"prefill_seq_lens={self.prefill_seq_lens!r}: need positive lengths")
        if self.wait_s < 0:
            raise ConfigError(f"wait_s={self.wait_s!r}: need >= 0")


# ------------------------------------------------------------------------------------------- plan
def reference_plan(cfg: HybridStudyConfig, settings: ReferenceSettings, shared_lr: float | None = None) -> dict[str, list[RunSpec]]:
    """The runs of every group (see the section's comment); only ``lr_sweep`` until the shared rate is known."""
    seed0, alpha = cfg.seeds[0], {"static": 0.0, "dynamic": cfg.balance_coef}
    plan = {"lr_sweep": [RunSpec(arm, lr, seed0, alpha[arm], settings.sweep_steps) for lr in cfg.lr_same for arm in ARMS]}
    if shared_lr is None:
        return plan
    plan["shared"] = [RunSpec(arm, shared_lr, seed, alpha[arm], cfg.steps) for seed in cfg.seeds for arm in ARMS]
    plan["seed_lrs"] = [RunSpec("static", cfg.lr_static, seed0, 0.0, cfg.steps),
                        RunSpec("dynamic", cfg.lr_dynamic, seed0, cfg.balance_coef, cfg.steps)]
    plan["alpha"] = [RunSpec("dynamic", shared_lr, seed0, a, cfg.alpha_sweep_steps or cfg.steps) for a in cfg.alpha_sweep]
    return plan


def unique_runs(plan: dict[str, list[RunSpec]], groups=GROUPS) -> list[RunSpec]:
    """The distinct runs of ``groups``, in plan order."""
    return list(dict.fromkeys(spec for g in groups for spec in plan.get(g, [])))


# ------------------------------------------------------------------------------ results on disk
def _history_frame(result, tokens_per_step: int) -> pd.DataFrame:
    """The run's history with the tokens seen at each record."""
    df = pd.DataFrame(result.history)
    df.insert(1, "tokens", df["step"] * tokens_per_step)
    return df


def _train_and_record(spec: RunSpec, cfg: HybridStudyConfig, settings: ReferenceSettings, out: Path,
                      curve: list, eval_data: dict[str, list]) -> dict:
    """Train (or resume) one run, then write its history and its final record: per-domain validation
    loss (nats/token, argmax routing), training tokens/s, steps and tokens."""
    model, result = train_run(spec, cfg, curve, log_every=settings.log_every, ckpt_every=settings.ckpt_every)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    _history_frame(result, tokens_per_step).to_csv(out / "history" / f"{spec.name}.csv", index=False)
    ppl = perplexity_by_domain(model, eval_data)
    record = dict(run=spec.name, **dataclasses.asdict(spec), tokens=spec.steps * tokens_per_step,
                  train_tokens_per_s=train_tokens_per_s(result), params_M=model.num_parameters() / 1e6,
                  val_loss=math.log(ppl.pop("overall")), **{f"val_loss_{d}": math.log(v) for d, v in ppl.items()})
    write_record(out, spec.name, record)
    print(f"{spec.name}: validation loss {record['val_loss']:.3f} ({result.wall_s:.0f} s)", flush=True)
    return record


def sweep_table(cfg: HybridStudyConfig, settings: ReferenceSettings, finals: dict[str, dict]) -> pd.DataFrame | None:
    """One row per swept rate: each arm's validation loss, their mean, and ``chosen`` (the lowest mean,
    the first rate on a tie); None while a sweep run has not finished."""
    specs = reference_plan(cfg, settings)["lr_sweep"]
    if any(s.name not in finals for s in specs):
        return None
    rows = [dict(lr=lr, **{f"{s.arm}_val_loss": finals[s.name]["val_loss"] for s in specs if s.lr == lr}) for lr in cfg.lr_same]
    table = pd.DataFrame(rows).set_index("lr")
    table["mean_val_loss"] = table[[f"{arm}_val_loss" for arm in ARMS]].mean(axis=1)
    table["chosen"] = table.index == table["mean_val_loss"].idxmin()
    return table


# ---------------------------------------------------------------------------------- measurement
def delta_table(runs: pd.DataFrame, shared_lr: float, seeds: list[int]) -> pd.DataFrame:
    """Per seed at the shared rate: each arm's validation loss and delta = dynamic - static."""
    shared = runs[runs["groups"].str.contains("shared") & np.isclose(runs["lr"], shared_lr)]
    table = shared.pivot_table(index="seed", columns="arm", values="val_loss").reindex(seeds)
    return table.rename(columns=lambda arm: f"{arm}_val_loss").assign(delta=lambda t: t["dynamic_val_loss"] - t["static_val_loss"])


def train_speed(cfg: HybridStudyConfig, lr: float, rounds: int) -> pd.DataFrame:
    """Training throughput of both arms at the reference size, timed round-robin in this one process:
    one optimizer step (forward, backward, AdamW) of a fresh model on the first seed's batches."""
    batch = training_batches(cfg, cfg.seeds[0])(0)  # (B, T) each
    steps = {}
    for arm in ARMS:
        torch.manual_seed(cfg.seeds[0])
        model = HybridLM(cfg.model_config(arm, cfg.balance_coef, cfg.steps)).train()
        opt = make_optimizer(model, TrainConfig(lr=lr, warmup_steps=0))

        def step(model=model, opt=opt):
            loss, _ = routing_loss(model, *batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[arm] = step
    table = compare(steps, items=batch[0].numel(), rounds=rounds, warmup=1, repeats=2)
    return table.rename(columns={"name": "arm", "items_per_s": "tokens_per_s"})[["arm", "median_ms", "tokens_per_s", "repeats"]]


def prefill_speed(static: HybridLM, dynamic: HybridLM, cfg: HybridStudyConfig, settings: ReferenceSettings) -> pd.DataFrame:
    """Prefill throughput (:func:`inference_speed`, interleaved) at the reference length with
    ``speed_batch`` sequences, and over ``prefill_seq_lens`` with one sequence; column ``batch``."""
    at_ref = inference_speed(static, dynamic, cfg, rounds=settings.speed_rounds)
    sweep_cfg = dataclasses.replace(cfg, speed_seq_lens=settings.prefill_seq_lens, speed_batch=1)
    sweep = inference_speed(static, dynamic, sweep_cfg, rounds=settings.speed_rounds, warmup=1, repeats=1)
    return pd.concat([at_ref.assign(batch=cfg.speed_batch), sweep.assign(batch=1)], ignore_index=True)


def routing_breakdown(model: HybridLM, eval_data: dict[str, list], tokenizer, bins: int) -> pd.DataFrame:
    """Held-out share of tokens to softmax per routed layer (argmax routing) by domain, token type
    (:func:`token_type`) and position bucket, long format: by, group, layer, softmax_share, tokens."""
    tokens = route_tokens(model, eval_data, tokenizer)
    frames = []
    for by, n in (("domain", None), ("type", None), ("position", bins)):
        share = softmax_share(tokens, by, bins=n)
        share.index = share.index.astype(str).rename("group")  # position buckets: "(-0.255, 31.875]", ...
        long = share.reset_index().melt(["group", "tokens"], var_name="layer", value_name="softmax_share")
        frames.append(long.assign(by=by, layer=long["layer"].str.replace("softmax share ", "")))
    return pd.concat(frames, ignore_index=True)[["by", "group", "layer", "softmax_share", "tokens"]]


# ----------------------------------------------------------------------------------- the run
def reference_run(cfg: HybridStudyConfig, settings: ReferenceSettings, out_dir: str | Path = REFERENCE_DIR, *,
                  part: tuple[int, int] | None = None, only_runs: tuple[str, ...] = (), command: str | None = None) -> dict | None:
    """Train the reference runs and, unless ``part`` or ``only_runs`` restricts this invocation to some
    of them, measure and write the manifest (returned; None for a restricted invocation). ``part=(i, n)``:
    this process's share of every group (``routelib.reference.split_parts``), the sweep's before the rest
    (waiting up to ``settings.wait_s`` for the other parts' sweep runs); ``only_runs``:
    just these run names (the rest's names need the sweep finished)."""
    out = paths.in_repo(out_dir)
    (out / "history").mkdir(parents=True, exist_ok=True)
    log = InvocationLog(out, command)
    eval_data = domain_eval_data(cfg)
    curve = [b for batches in eval_data.values() for b in batches[: settings.curve_batches]]

    def train_share(specs: list[RunSpec]) -> None:
        """Train this invocation's share of ``specs`` that no invocation has finished yet."""
        if part:
            specs = split_parts(specs, part, cost=lambda s: s.steps * STEP_COST[s.arm])
        elif only_runs:
            specs = [s for s in specs if s.name in only_runs]
        done = load_records(out)
        for spec in specs:
            if spec.name not in done:
                _train_and_record(spec, cfg, settings, out, curve, eval_data)

    sweep_specs = reference_plan(cfg, settings)["lr_sweep"]
    train_share(sweep_specs)
    sweep = (wait_for(lambda: sweep_table(cfg, settings, load_records(out)), settings.wait_s) if part
             else sweep_table(cfg, settings, load_records(out)))
    if sweep is None:  # a part or only_runs invocation while other invocations' sweep runs are unfinished
        missing = [s.name for s in sweep_specs if s.name not in load_records(out)]
        print(f"the LR sweep is not complete ({', '.join(missing)}); run this command again once they are", flush=True)
        log.finish()
        return None
    shared_lr = float(sweep.index[sweep["chosen"]][0])
    plan = reference_plan(cfg, settings, shared_lr)
    specs = [s for s in unique_runs(plan) if s not in sweep_specs]
    if only_runs:
        unknown = set(only_runs) - {s.name for s in unique_runs(plan)}
        if unknown:
            raise ConfigError(f"only_runs: {', '.join(sorted(unknown))} not in the plan; runs: "
                              + ", ".join(s.name for s in unique_runs(plan)))
    train_share(specs)
    if part or only_runs:
        log.finish()
        return None
    return _measure(cfg, settings, out, plan, sweep, eval_data, log)


def _measure(cfg: HybridStudyConfig, settings: ReferenceSettings, out: Path, plan: dict[str, list[RunSpec]],
             sweep: pd.DataFrame, eval_data: dict[str, list], log: InvocationLog) -> dict:
    """The final invocation's measurements and files, then the manifest."""
    finals = load_records(out)
    groups = {s.name: ";".join(g for g in GROUPS if s in plan[g]) for s in unique_runs(plan)}
    runs = pd.DataFrame([{**finals[name], "groups": g} for name, g in groups.items()]).set_index("run")
    runs.to_csv(out / "runs.csv")
    sweep.to_csv(out / "lr_sweep.csv")
    shared_lr = float(sweep.index[sweep["chosen"]][0])
    deltas = delta_table(runs, shared_lr, cfg.seeds)
    deltas.to_csv(out / "delta.csv")

    def trained(spec: RunSpec) -> HybridLM:  # a finished checkpoint is loaded, not retrained
        return train_run(spec, cfg, log_every=settings.log_every, ckpt_every=settings.ckpt_every)[0]

    first = {s.arm: trained(s) for s in plan["shared"] if s.seed == cfg.seeds[0]}
    train_speed(cfg, shared_lr, settings.speed_rounds).to_csv(out / "train_speed.csv", index=False)
    prefill_speed(first["static"], first["dynamic"], cfg, settings).to_csv(out / "prefill_speed.csv", index=False)
    tokenizer = load_tokenizer(cfg.tokenizer)
    routing = [routing_breakdown(trained(s), eval_data, tokenizer, settings.position_bins).assign(run=s.name)
               for s in unique_runs(plan, ("shared", "seed_lrs", "alpha")) if s.arm == "dynamic"]
    pd.concat(routing, ignore_index=True).to_csv(out / "routing.csv", index=False)
    summary = dict(shared_lr=shared_lr, unigram_val_loss=unigram_loss(cfg, eval_data),
                   delta=t_interval(deltas["delta"].dropna()), tokens_per_run=cfg.steps * cfg.batch_size * cfg.seq_len,
                   sweep_fraction=settings.sweep_steps / cfg.steps, alpha_fraction=(cfg.alpha_sweep_steps or cfg.steps) / cfg.steps,
                   eval=f"validation split, {cfg.eval_windows} windows of {cfg.seq_len} tokens per domain, all domains")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    invocations = InvocationLog.summary(log.finish())
    params = dict(study_config=dataclasses.asdict(cfg), settings=dataclasses.asdict(settings))
    return write_manifest(out, command=log.command, params=params, wall_s=invocations.pop("wall_s"),
                          extra={**log.code, **invocations})


# ----------------------------------------------------------------------------------- reading it
REFERENCE_COMMAND = "python -m routelib.studies.attention_routing reference"
#: How the reference run is made: two 1-thread processes side by side, then the measuring invocation.
REFERENCE_LAUNCH = (f"{REFERENCE_COMMAND} --part 1/2 --threads 1 & {REFERENCE_COMMAND} --part 2/2 --threads 1 & wait; "
                    f"{REFERENCE_COMMAND} --threads 1")


def reference_header(ref: dict | None) -> str:
    """What the reference run was (command, commit, machine, wall time, tokens, shared rate), or for
    ``None`` the one line saying it has not been made and the command that makes it."""
    if ref is None:
        return f"reference run not yet made: {REFERENCE_LAUNCH}"
    man, cfg, s = ref["manifest"], ref["cfg"], ref["summary"]
    env = man["environment"]
    return "\n".join([
        f"command: {man['command']}",
        f"commit {str(man['commit'])[:10]}; {env['device']}, torch {env['torch']}, {env['torch_threads']} thread(s); "
        f"{man['wall_s'] / 60:.0f} min of process wall time over {man['invocations']} invocations, "
        f"{(man.get('span_s') or 0) / 60:.0f} min from first start to last finish",
        f"hidden {cfg.hidden_size}, {cfg.num_heads} heads, FFN {cfg.intermediate_size}, {cfg.seq_len}-token windows x "
        f"{cfg.batch_size}; {s['tokens_per_run']:,} training tokens per run ({cfg.steps} steps), seeds {cfg.seeds}",
        f"shared learning rate {s['shared_lr']:g} (LR sweep at {s['sweep_fraction']:.0%} of the steps); "
        f"alpha sweep at {s['alpha_fraction']:.0%}; evaluation: {s['eval']}",
    ])


def shared_run(ref: dict, arm: str, seed: int | None = None) -> str:
    """Name of the shared-rate run of ``arm`` for ``seed`` (default: the first seed)."""
    runs = ref["runs"]
    seed = ref["cfg"].seeds[0] if seed is None else seed
    return runs[runs["groups"].str.contains("shared") & (runs["arm"] == arm) & (runs["seed"] == seed)].index[0]


def load_reference_if_made(out_dir: str | Path = REFERENCE_DIR) -> dict | None:
    """:func:`load_reference`, or None while the reference run has not been made (no manifest yet)."""
    return load_reference(out_dir) if reference_made(out_dir) else None


def load_reference(out_dir: str | Path = REFERENCE_DIR) -> dict:
    """The reference run (every file checked against the manifest's sha256): manifest, summary, the
    run table, LR sweep, per-seed deltas, histories by run, training and prefill speed, routing, and the
    configuration rebuilt from the manifest (``cfg``, ``settings``)."""
    out = paths.in_repo(out_dir)
    manifest = load_manifest(out)
    params = manifest["params"]
    return dict(
        manifest=manifest, summary=json.loads((out / "summary.json").read_text()),
        cfg=from_params(HybridStudyConfig, params["study_config"]), settings=from_params(ReferenceSettings, params["settings"]),
        runs=pd.read_csv(out / "runs.csv", index_col="run"), lr_sweep=pd.read_csv(out / "lr_sweep.csv", index_col="lr"),
        delta=pd.read_csv(out / "delta.csv", index_col="seed"),
        histories={p.stem: pd.read_csv(p) for p in sorted((out / "history").glob("*.csv"))},
        train_speed=pd.read_csv(out / "train_speed.csv"), prefill_speed=pd.read_csv(out / "prefill_speed.csv"),
        routing=pd.read_csv(out / "routing.csv"),
    )


def reproduce_first_steps(ref: dict, run: str, out_dir: str | Path) -> tuple[dict, dict]:
    """Re-train the first ``log_every`` steps of reference run ``run`` from the manifest's configuration,
    on the manifest's number of torch threads, with checkpoints under ``out_dir``. Returns the first
    history record of this re-run and the recorded one (equal on CPU, where training is deterministic)."""
    row = ref["runs"].loc[run]
    spec = RunSpec(str(row["arm"]), float(row["lr"]), int(row["seed"]), float(row["alpha"]), int(row["steps"]))
    cfg = dataclasses.replace(ref["cfg"], out_dir=str(out_dir), device="cpu")
    curve = [b for batches in domain_eval_data(cfg).values() for b in batches[: ref["settings"].curve_batches]]
    threads = torch.get_num_threads()
    torch.set_num_threads(ref["manifest"]["environment"]["torch_threads"])
    try:
        every = ref["settings"].log_every
        _, result = train_run(spec, cfg, curve, log_every=every, ckpt_every=ref["settings"].ckpt_every,
                              stop_step=min(every, spec.steps))
    finally:
        torch.set_num_threads(threads)
    return result.history[0], ref["histories"][run].iloc[0].to_dict()


def curve_bands(ref: dict, metric: str) -> pd.DataFrame:
    """``metric`` of the training history (``eval_loss``, ``softmax_frac_L1``, ``entropy_L2`` ...) of the
    shared-rate runs against training tokens, per arm over seeds: columns arm, tokens, mean, low, high
    (the seed band: min and max), seeds."""
    shared = ref["runs"][ref["runs"]["groups"].str.contains("shared")]
    frames = [ref["histories"][name][["tokens", metric]].dropna().assign(arm=row["arm"])
              for name, row in shared.iterrows() if metric in ref["histories"][name]]
    long = pd.concat(frames, ignore_index=True)
    return long.groupby(["arm", "tokens"])[metric].agg(mean="mean", low="min", high="max", seeds="count").reset_index()


def alpha_table(ref: dict) -> pd.DataFrame:
    """The alpha sweep, one row per alpha: held-out share of tokens to softmax per routed layer
    (``softmax_frac_L<layer>``, over every domain's windows) and the validation loss."""
    runs = ref["runs"][ref["runs"]["groups"].str.contains("alpha")]
    rows = ref["routing"][ref["routing"]["run"].isin(runs.index) & (ref["routing"]["by"] == "domain")]
    sums = rows.assign(w=rows["softmax_share"] * rows["tokens"]).groupby(["run", "layer"])[["w", "tokens"]].sum()
    share = (sums["w"] / sums["tokens"]).unstack("layer").rename(columns=lambda layer: f"softmax_frac_{layer}")
    return share.join(runs[["alpha", "val_loss"]]).set_index("alpha").sort_index()


def reference_numbers(ref: dict) -> dict:
    """What the verdict rests on, from the files: the better arm at the shared rate and whether the
    95 % interval of delta excludes 0, the unequal-rate gap, the routing split per alpha, the margin below
    the unigram model of every run but the sweep-only ones (each must end >= 1 nat below it), and the
    dynamic / static throughput ratios (training; prefill at the reference length and the longest one)."""
    cfg, runs, summary = ref["cfg"], ref["runs"], ref["summary"]
    d = summary["delta"]
    seed_lrs = runs[runs["groups"].str.contains("seed_lrs")].set_index("arm")["val_loss"]
    share = alpha_table(ref).drop(columns="val_loss").rename(columns=lambda c: c[len("softmax_frac_"):])
    compared = runs[runs["groups"] != "lr_sweep"]  # the runs a conclusion rests on (sweep-only runs are shorter)
    margin = summary["unigram_val_loss"] - compared["val_loss"]
    excludes = bool(d["low"] > 0 or d["high"] < 0)
    train = ref["train_speed"].set_index("arm")["tokens_per_s"]
    pre = ref["prefill_speed"].set_index(["batch", "seq_len", "model"])["tokens_per_s"]
    longest = int(pre.loc[1].index.get_level_values("seq_len").max())

    def ratio(batch: int, seq_len: int) -> float:
        return float(pre[(batch, seq_len, "dynamic")] / pre[(batch, seq_len, "static")])

    return dict(train_speed_ratio=float(train["dynamic"] / train["static"]), prefill_ratio=ratio(cfg.speed_batch, cfg.seq_len),
                prefill_ratio_longest=ratio(1, longest), longest=longest,shared_lr=summary["shared_lr"], delta=d, better="dynamic" if d["mean"] < 0 else "static",
                interval_excludes_zero=excludes, seed_lrs_delta=float(seed_lrs["dynamic"] - seed_lrs["static"]),
                alpha_softmax_share=share, unigram=summary["unigram_val_loss"], min_margin=float(margin.min()),
                below_unigram_by_1nat=bool((margin >= 1.0).all()), seeds=len(cfg.seeds), tokens_per_run=summary["tokens_per_run"])


def reference_verdict(ref: dict) -> str:
    """The verdict of the reference run in a few Markdown sentences, every number from its files."""
    v = reference_numbers(ref)
    d = v["delta"]
    outcome = (f"**{'dynamic routing wins' if v['better'] == 'dynamic' else 'baseline wins'}**" if v["interval_excludes_zero"]
               else "**no clear winner**")
    shares = "; ".join(f"α = {a:g}: " + ", ".join(f"{layer} {100 * s:.0f} %" for layer, s in row.items())
                       for a, row in v["alpha_softmax_share"].iterrows())
    return "\n\n".join([
        f"{outcome} at {v['tokens_per_run']:,} training tokens per run and the shared learning rate {v['shared_lr']:g} "
        f"(the LR sweep's lowest mean validation loss over both arms): validation loss dynamic − static = "
        f"{d['mean']:+.3f} nats, 95 % t-interval over {d['n']} seeds [{d['low']:+.3f}, {d['high']:+.3f}], which "
        f"{'excludes' if v['interval_excludes_zero'] else 'includes'} 0; the {v['better']} arm is lower on average.",
        f"At the seed's unequal rates (static {ref['cfg'].lr_static:g}, dynamic {ref['cfg'].lr_dynamic:g}) the gap is "
        f"{v['seed_lrs_delta']:+.3f}: the confound of unequal rates is {v['seed_lrs_delta'] - d['mean']:+.3f} nats "
        "against the shared-rate mean.",
        f"Held-out share of tokens routed to softmax per routed layer by balance weight: {shares}.",
        f"Unigram model (training-split token frequencies, same windows): {v['unigram']:.3f}; the worst run of the "
        f"comparison, unequal rates and α sweep ends {v['min_margin']:.2f} nats below it "
        f"({'meets' if v['below_unigram_by_1nat'] else 'MISSES'} the requirement of at least 1 nat).",
        f"Throughput dynamic / static, timed interleaved on this CPU: training {v['train_speed_ratio']:.2f}x, prefill "
        f"{v['prefill_ratio']:.2f}x at the trained length and {v['prefill_ratio_longest']:.2f}x at {v['longest']} tokens.",
    ])


# -------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``python -m routelib.studies.attention_routing reference [--out DIR] [--part i/n | --only_runs a,b]
    [--threads N] [--<field> value ...]``: notebook 02's reference run (:func:`reference_run`). Every field of
    HybridStudyConfig (defaults: REFERENCE_DEFAULTS) and of ReferenceSettings is an option; lists are
    comma-separated; ``--lr_same`` is the LR sweep's grid, ``--alpha_sweep_steps`` the alpha runs' length.
    Side by side: one process per ``--part i/n``, then one without ``--part`` to measure."""
    parser = reference_parser("python -m routelib.studies.attention_routing", main.__doc__, REFERENCE_DIR)
    cli.add_dataclass_options(parser, HybridStudyConfig, skip=("num_threads",), defaults=REFERENCE_DEFAULTS)  # --threads sets num_threads
    cli.add_dataclass_options(parser, ReferenceSettings)
    args = parser.parse_args(argv)
    part, only_runs = reference_invocation(args)
    cfg = from_params(HybridStudyConfig, {**REFERENCE_DEFAULTS, **cli.dataclass_options(args, HybridStudyConfig),
                                          "num_threads": args.threads})
    settings = from_params(ReferenceSettings, cli.dataclass_options(args, ReferenceSettings))
    manifest = reference_run(cfg, settings, args.out, part=part, only_runs=only_runs)
    if manifest:
        print(reference_verdict(load_reference(args.out)))
    return 0




if __name__ == "__main__":
    raise SystemExit(cli.run(main))
