"""Per-token routing between Gated DeltaNet and softmax attention vs a static hybrid (notebook 02).

The "Dynamic Per-Token Layer Routing" project that notebook 02 tests asks whether a 4-layer model whose middle layers let
each token choose Gated DeltaNet or softmax attention beats the static hybrid [GDN, GDN, GDN,
softmax]. Its README states two possible outcomes -- "dynamic routing wins" (adaptive attention
helps) or "baseline wins" (a static assignment is sufficient) -- and its committed run (docs/design.md §6)
had the baseline winning (best validation loss 3.83 vs 4.43) with a ~55/45 split in layers 1-2, but
it computed both branches for every token, kept Gumbel noise at evaluation, needed alpha = 0.5 (its
text says 0.01) to avoid collapsing to all-GDN, and trained the arms at different learning rates.

Here (models: :mod:`routelib.models.hybrid`):

- runs (:class:`RunSpec`): each arm at the original project's own learning rates (1e-3 static, 2e-3 dynamic) and
  both arms at the same learning rate(s) ``lr_same`` (the fair comparison; the tuned rate is the one
  with the lowest mean validation loss), for every seed in ``seeds``; the arms of one seed see the
  same batches and start from the same RNG state;
- an alpha sweep: the dynamic arm at each load-balancing weight of ``alpha_sweep``, reporting the
  routing split each gives;
- measured in the run: validation loss and perplexity per domain, training tokens/s, prefill
  (inference) tokens/s over a sweep of sequence lengths, routing statistics over training (share of
  tokens per branch and layer, router entropy, balance loss) and on held-out text;
- the original project's ``compare_experiments`` (:func:`compare_experiments`, :func:`verdict`) and
  ``visualize_routing`` (:func:`route_tokens`, :func:`softmax_share`, :func:`routing_html`);
- the **reference run** (docs/design.md §7) is :mod:`routelib.studies.attention_routing.reference`: the same
  models at a scale where they have learned something, on the CPU,
  ``python -m routelib.studies.attention_routing reference``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from routelib.device import resolve_device
from routelib import paths
from routelib.bench import compare
from routelib.data import TokenWindows, eval_batches, load_tokenizer, token_stream
from routelib.data.tokenizer import separator_id
from routelib.errors import ConfigError
from routelib.models.hybrid import DYNAMIC_LAYOUT, STATIC_LAYOUT, HybridConfig, HybridLM
# domain_eval_data is re-exported: notebook 02 takes its held-out data from the study
from routelib.evaluation import domain_eval_data, perplexity_by_domain, train_tokens_per_s  # noqa: F401
from routelib.train import TrainConfig, TrainResult, train

ARMS = {"static": STATIC_LAYOUT, "dynamic": DYNAMIC_LAYOUT}


@dataclass
class HybridStudyConfig:
    # --- the models (both arms: 4 layers, same widths) ---
    hidden_size: int = 64  # H: residual width (the original project: 768)
    num_heads: int = 4  # heads of every GDN and softmax mixer (the original project: 12)
    intermediate_size: int = 128  # SwiGLU FFN width of every block
    softmax_kv: str = "routed"  # routed softmax branch attends over softmax-routed tokens only ("routed") or all ("all")
    tokenizer: str = "bpe8k"  # the project's BPE (8192 tokens)
    # --- routing (dynamic arm) ---
    balance_coef: float = 0.5  # alpha of the main dynamic runs (the original project's code used 0.5; its text says 0.01)
    tau_start: float = 1.0  # Gumbel-softmax temperature at step 0, annealed exponentially ...
    tau_end: float = 0.5  # ... to this at the last training step
    alpha_sweep: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.5])  # alphas of the sweep ([] = none)
    alpha_sweep_steps: int = 0  # training steps of each sweep run (0 = steps); first seed, lr_dynamic
    # --- training: the arms of one seed see the same batches ---
    seq_len: int = 64  # tokens per training window
    batch_size: int = 8  # windows per optimizer step
    steps: int = 60  # optimizer steps per run
    warmup_steps: int = 6  # linear warm-up steps
    lr_static: float = 1e-3  # the original project's learning rate for the static baseline
    lr_dynamic: float = 2e-3  # the original project's learning rate for the dynamic model
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
        return resolve_device(self.device)


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
    """Named (static lr, dynamic lr) comparisons: the original project's rates, and each equal rate in lr_same."""
    out = {"seed lrs": (cfg.lr_static, cfg.lr_dynamic)}
    out.update({f"same lr {lr:g}": (lr, lr) for lr in cfg.lr_same})
    return out


def main_runs(table: pd.DataFrame, cfg: HybridStudyConfig) -> pd.DataFrame:
    main = table[(table["steps"] == cfg.steps) & (table["seed"].isin(cfg.seeds))]
    return main[(main["arm"] == "static") | (main["alpha"] == cfg.balance_coef)]


def compare_experiments(table: pd.DataFrame, cfg: HybridStudyConfig, speed: pd.DataFrame | None = None) -> pd.DataFrame:
    """The original project's ``compare_experiments``, per pairing (see :func:`pairings`) and over seeds: mean
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
    """Which of the original project's two expected outcomes held, computed from the runs.

    At the tuned equal learning rate (the original project's own rates when lr_same is empty), with
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
    meaning = {"dynamic routing wins": "the original project's first outcome (adaptive attention helps)",
               "baseline wins": "the original project's second outcome (a static assignment is sufficient)",
               "no clear winner": "neither of the original project's outcomes is supported"}[v["outcome"]]
    if v["outcome"] == "no clear winner":
        meaning += (f" (every seed leans to the {v['leaning']} model, by less than the seed-to-seed spread)"
                    if v["leaning"] else " (the sign of the gap depends on the seed)")
    lines = [f"**{v['outcome']}** at {tokens_per_run:,} training tokens per run ({cfg.steps} steps), "
             f"hidden {cfg.hidden_size}, {v['seeds']} seed(s), compared at `{v['pairing']}` -- {meaning}.",
             f"Validation loss dynamic - static: mean {v['delta_mean']:+.3f} (per seed {v['delta_min']:+.3f} to "
             f"{v['delta_max']:+.3f}); the larger seed-to-seed std of an arm is {v['seed_spread']:.3f}, so the gap "
             f"{'exceeds' if v['gap_exceeds_spread'] else 'does not exceed'} the spread across seeds"
             + (f"; for scale, a unigram model (training-split token frequencies) scores {unigram:.3f}." if unigram is not None else "."),
             f"At the original project's own learning rates (static {cfg.lr_static:g}, dynamic {cfg.lr_dynamic:g}) the mean gap "
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
