"""MoE vs dense language models at the same token budget (notebook 03).

The seed (``003``) claims an MoE LM with 4 experts / top-2 is 2.3x faster than a dense model, with
78 % fewer FLOPs and better perplexity (12.3 vs 13.1); its code had no dense model and typed those
numbers into a dashboard. Here the three arms are trained by the same loop on the same batches and
measured in one run:

- ``moe``          Mixtral-style MoE LM: E SwiGLU experts of width I, top-k (Shazeer et al. 2017;
                   Fedus et al. 2021; Jiang et al. 2024);
- ``dense_active`` a dense SwiGLU LM with the MoE's *active* parameters (FFN width k*I);
- ``dense_total``  a dense SwiGLU LM with the MoE's *total* parameters (FFN width E*I).

The MoE arm is also exported in the Hugging Face Mixtral format (``routelib.models.export``): it
is the offline routing subject of notebooks 04-06. ``python -m routelib.studies.moe_vs_dense subject`` trains
only that arm at a larger size and writes it with a model card (see :func:`main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from routelib import paths
from routelib.bench import compare
from routelib.data import TokenWindows, load_tokenizer, token_stream
from routelib.errors import ConfigError
from routelib.evaluation import domain_eval_data, perplexity_by_domain, train_tokens_per_s  # noqa: F401 (notebook 03 calls them here)
from routelib.models import LM, LMConfig
from routelib.models.export import export_hf
from routelib.models.moe import DenseFFN, MoEFFN
from routelib.reference import InvocationLog, load_manifest, write_manifest
from routelib.train import TrainConfig, TrainResult, load_checkpoint, train

ARMS = ("moe", "dense_active", "dense_total")
# The equal-total dense model trained with its own complete schedule (warm-up and full decay) for the
# MoE's training FLOPs: fewer steps, same batches; a compute-matched comparison (reference run only).
MATCHED = "dense_total_matched"


@dataclass
class MoEStudyConfig:
    # --- the models (the dense arms are derived from these) ---
    hidden_size: int = 128  # H: residual width of every arm
    num_layers: int = 2  # decoder blocks (the seed: 2)
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA)
    intermediate_size: int = 256  # I: width of one expert; dense arms use k*I and E*I
    num_experts: int = 4  # E (the seed: 4)
    top_k: int = 2  # k (the seed: 2)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight per layer
    z_loss_coef: float = 0.001  # router z-loss weight per layer (ST-MoE)
    moe_impl: str = "grouped"  # expert computation used for training: naive | padded | grouped
    tokenizer: str = "bpe8k"  # the project's BPE (8192 tokens)
    # --- training: same batches, same steps for every arm ---
    seq_len: int = 128  # tokens per training window
    batch_size: int = 16  # windows per optimizer step
    steps: int = 100  # optimizer steps per arm
    lr: float = 3e-3  # peak learning rate (AdamW, warm-up + cosine)
    warmup_steps: int = 10  # linear warm-up steps
    seed: int = 0  # model init and data order
    dense_baselines: bool = True  # False: train only the MoE arm (the subject run)
    ckpt_every: int = 25  # MoE checkpoints every this many steps (the subject's training snapshots)
    out_dir: str = "runs/03_moe_speedup"  # checkpoints, export, metrics (relative to the repo root)
    # --- evaluation and measurement ---
    eval_windows: int = 32  # held-out windows per domain (validation split)
    bench_tokens: int = 2048  # tokens in the MoE-layer implementation benchmark
    prefill_batch: int = 8  # sequences in the prefill-latency measurement
    decode_tokens: int = 16  # tokens generated in the decode-latency measurement (batch 1)
    bench_min_time_s: float = 0.2  # time each measured call for at least this long
    capacity_factors: str = "0.5,0.75,1.0,1.25,1.5,2.0"  # swept at inference (comma-separated)
    device: str = "auto"  # "auto" (cuda when available) or "cpu"
    # --- the subject export (command `subject`) ---
    card_seq_len: int = 256  # window length of the model card's headline perplexity (256: comparable across subjects)
    snapshot_seq_len: int = 128  # held-out window length routed at every training snapshot (notebook 06)
    snapshot_windows: int = 16  # held-out windows per domain routed at every training snapshot

    def __post_init__(self):
        if self.moe_impl not in ("naive", "padded", "grouped"):
            raise ConfigError(f"moe_impl={self.moe_impl!r}: choose naive, padded or grouped")
        self.factors()  # validates capacity_factors
        self.moe_config()  # validates the model sizes (top_k <= num_experts, heads, ...)

    def factors(self) -> list[float]:
        try:
            values = [float(v) for v in self.capacity_factors.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"capacity_factors={self.capacity_factors!r}: expected numbers like '0.5,1,2'") from None
        if not values or min(values) <= 0:
            raise ConfigError(f"capacity_factors={self.capacity_factors!r}: need positive factors")
        return values

    def moe_config(self) -> LMConfig:
        """The MoE arm's LMConfig; trained dropless (capacity is swept at inference)."""
        vocab = len(load_tokenizer(self.tokenizer))
        return LMConfig(
            vocab_size=vocab, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size, num_experts=self.num_experts, top_k=self.top_k,
            aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef, moe_impl=self.moe_impl,
            max_seq_len=max(self.seq_len, 256), tie_embeddings=True,
        )

    def arm_configs(self) -> dict[str, LMConfig]:
        moe = self.moe_config()
        arms = {"moe": moe}
        if self.dense_baselines:
            arms["dense_active"] = moe.dense_matching("active")
            arms["dense_total"] = moe.dense_matching("total")
        return arms

    def run_dir(self) -> Path:
        return paths.in_repo(self.out_dir)

    def device_(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


# ----------------------------------------------------------------------------------------- data
def training_batches(cfg: MoEStudyConfig) -> TokenWindows:
    """Random windows over the train split of every domain (natural mixture: ~half code)."""
    return TokenWindows(token_stream(split="train", tokenizer=cfg.tokenizer), cfg.seq_len, cfg.batch_size, seed=cfg.seed)


# ------------------------------------------------------------------------------------- training
def train_arm(name: str, lm_cfg: LMConfig, cfg: MoEStudyConfig, batch_fn, eval_data=None,
              callbacks=(), *, eval_every: int = 0, log_every: int | None = None,
              stop_step: int | None = None) -> tuple[LM, TrainResult]:
    """Train one arm with ``routelib.train``. Checkpoints go to ``out_dir/checkpoints/<name>-<hash>``,
    the hash covering everything that shapes the run, so an interrupted run resumes where it
    stopped, a finished one is loaded instead of retrained, and other parameters start afresh.
    ``eval_every``/``log_every`` (default: 20 records per run) thin or thicken the history;
    ``stop_step`` ends early with the schedule unchanged (the reproduction test)."""
    torch.manual_seed(cfg.seed)
    model = LM(lm_cfg)
    tcfg = TrainConfig(
        max_steps=cfg.steps, lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, cfg.steps), seed=cfg.seed,
        log_every=log_every or max(1, cfg.steps // 20), eval_every=eval_every,
        eval_batches=len(eval_data) if isinstance(eval_data, list) and eval_data else 8,
        ckpt_every=cfg.ckpt_every if name == "moe" else 0, device=cfg.device,
    )
    identity = [dataclasses.asdict(lm_cfg), dataclasses.asdict(tcfg), cfg.tokenizer, cfg.seq_len, cfg.batch_size]
    run_hash = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    tcfg.out_dir = str(cfg.run_dir() / "checkpoints" / f"{name}-{run_hash}")
    tcfg.stop_step = stop_step
    result = train(model, batch_fn, tcfg, eval_data=eval_data, callbacks=callbacks, resume=True)
    return model.eval(), result


# ----------------------------------------------------------------------------------- evaluation
@contextmanager
def capacity(model: LM, factor: float | None) -> Iterator[None]:
    """Temporarily run every MoE layer of ``model`` with capacity ``factor`` (None: dropless)."""
    layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    saved = [m.cfg for m in layers]
    for m in layers:
        m.cfg = dataclasses.replace(m.cfg, capacity_factor=factor)
    try:
        yield
    finally:
        for m, c in zip(layers, saved):
            m.cfg = c


@torch.no_grad()
def routing_records(model: LM, eval_data: dict[str, list]) -> pd.DataFrame:
    """One row per (domain, layer, expert): how many of the domain's top-k assignments the expert
    received (``count``), their share (``fraction``, sums to 1 over experts) and the mean gate
    weight when chosen (``mean_gate``)."""
    device = next(model.parameters()).device
    E = model.config.num_experts
    counts: dict[tuple[str, int], torch.Tensor] = {}
    gates: dict[tuple[str, int], torch.Tensor] = {}
    for domain, batches in eval_data.items():
        for x, _ in batches:
            for layer, r in enumerate(model(x.to(device), output_router_logits=True).router):
                idx, w = r.indices.flatten().cpu(), r.weights.flatten().float().cpu()  # (N*k,)
                key = (domain, layer)
                counts[key] = counts.get(key, torch.zeros(E)) + torch.bincount(idx, minlength=E)
                gates[key] = gates.get(key, torch.zeros(E)) + torch.bincount(idx, weights=w, minlength=E)
    rows = []
    for (domain, layer), c in counts.items():
        g = gates[(domain, layer)] / c.clamp(min=1)
        rows += [dict(domain=domain, layer=layer, expert=e, count=int(c[e]), fraction=(c[e] / c.sum()).item(),
                      mean_gate=g[e].item() if c[e] > 0 else float("nan")) for e in range(E)]
    return pd.DataFrame(rows)


def load_balance(records: pd.DataFrame) -> pd.DataFrame:
    """Per layer, over all held-out tokens: coefficient of variation of expert load (std/mean; 0 is
    perfect balance, sqrt(E-1) one expert taking all) and busiest/idlest expert load ratio."""
    load = records.groupby(["layer", "expert"])["count"].sum().unstack("expert").astype(float)  # (L, E)
    return pd.DataFrame({"cv": load.std(axis=1, ddof=0) / load.mean(axis=1),
                         "max_over_min": load.max(axis=1) / load.min(axis=1).clip(lower=1.0)})


@torch.no_grad()
def capacity_sweep(model: LM, eval_data: dict[str, list], factors: list[float]) -> pd.DataFrame:
    """Drop rate (share of top-k assignments beyond capacity, over all layers) and held-out
    perplexity per capacity factor, in one pass each; the dropless model is the last row (inf)."""
    device = next(model.parameters()).device
    rows = []
    for factor in [*factors, None]:
        dropped = assignments = loss_sum = tokens = 0.0
        with capacity(model, factor):
            for batches in eval_data.values():
                for x, y in batches:
                    out = model(x.to(device), output_router_logits=True)
                    loss_sum += torch.nn.functional.cross_entropy(
                        out.logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
                    tokens += y.numel()
                    for r in out.router:
                        dropped += float(r.drop_rate) * r.indices.numel()
                        assignments += r.indices.numel()
        rows.append(dict(capacity_factor=float("inf") if factor is None else factor,
                         drop_rate=dropped / assignments, perplexity=math.exp(loss_sum / tokens)))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------- measurement
def flops_formula(lm_cfg: LMConfig) -> str:
    return ("FLOPs/token = 2 x (active non-embedding parameters) + 2 x L x T x (heads x head_dim) "
            "+ 2 x V x H (LM head)")


@torch.no_grad()
def latency(models: dict[str, LM], cfg: MoEStudyConfig, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Per arm: prefill latency (``prefill_batch`` x ``seq_len`` tokens, one forward) and decode
    latency per token (batch 1, KV cache, greedy: the time of generating ``decode_tokens`` minus
    the prompt's prefill, over the generated tokens). All arms are timed round-robin ``rounds``
    times in one run (``routelib.bench.compare``), so drift hits every arm alike; medians."""
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    prompt = torch.randint(2, first.config.vocab_size, (cfg.prefill_batch, cfg.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    one = prompt[:1, : cfg.seq_len // 2]  # (1, T/2)
    fns = {}
    for name, m in models.items():
        fns[f"{name}/prefill"] = lambda m=m: m(prompt)
        fns[f"{name}/prompt"] = lambda m=m: m(one)
        fns[f"{name}/generate"] = lambda m=m: m.generate(one, max_new_tokens=cfg.decode_tokens)
    t = compare(fns, rounds=rounds, min_time_s=cfg.bench_min_time_s / rounds, device=device).set_index("name")["median_ms"]
    return {name: {"prefill_ms": t[f"{name}/prefill"],
                   "decode_ms_per_token": max(t[f"{name}/generate"] - t[f"{name}/prompt"], 0.0) / max(cfg.decode_tokens - 1, 1)}
            for name in models}


def comparison_table(models: dict[str, LM], results: dict[str, TrainResult], ppl: dict[str, dict],
                     lat: dict[str, dict], seq_len: int) -> pd.DataFrame:
    """One row per arm: parameters, FLOPs/token, perplexity per domain, speed. Ratios vs the MoE."""
    rows = []
    for name, model in models.items():
        row = dict(
            model=name,
            total_params_M=model.num_parameters() / 1e6,
            active_params_M=model.num_parameters(active=True) / 1e6,
            MFLOPs_per_token=model.flops_per_token(seq_len) / 1e6,
            train_tokens_per_s=train_tokens_per_s(results[name]),
            **lat[name],
            **{f"ppl_{d}": v for d, v in ppl[name].items()},
        )
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def moe_layer_benchmark(cfg: MoEStudyConfig, dtype: torch.dtype = torch.float32) -> pd.DataFrame:
    """The three MoE expert implementations (and a dense FFN of equal total / active parameters) on
    ``bench_tokens`` tokens through one MoE layer of the study's shape, forward only, timed in one run."""
    device = cfg.device_()
    moe_cfg = dataclasses.replace(cfg.moe_config().moe_config())
    layer = MoEFFN(moe_cfg).to(device, dtype).eval()
    x = torch.randn(cfg.bench_tokens, moe_cfg.hidden_size, device=device, dtype=dtype)  # (N, H)
    dense_total = DenseFFN.matching(moe_cfg, "total").to(device, dtype).eval()
    dense_active = DenseFFN.matching(moe_cfg, "active").to(device, dtype).eval()
    fns = {f"moe_{impl}": (lambda impl=impl: layer(x, impl=impl)) for impl in ("naive", "padded", "grouped")}
    fns["dense_equal_total"] = lambda: dense_total(x)
    fns["dense_equal_active"] = lambda: dense_active(x)
    with torch.no_grad():
        return compare(fns, baseline="moe_naive", items=cfg.bench_tokens, min_time_s=cfg.bench_min_time_s, device=device)


def _saving(ours: float, theirs: float) -> str:
    """'20 %' for ours = 0.8 x theirs; '+3 % more' when ours costs more."""
    pct = round(100 * (1 - ours / theirs))
    return f"{pct} %" if pct >= 0 else f"{-pct} % more"


def seed_claims(table: pd.DataFrame) -> pd.DataFrame:
    """The seed's headline claims beside this run's measurements (``table`` from
    :func:`comparison_table`, with all three arms)."""
    moe, act, tot = table.loc["moe"], table.loc["dense_active"], table.loc["dense_total"]
    rows = [
        ("inference speed-up of the MoE over the dense model (prefill)", "2.3x",
         f"{tot.prefill_ms / moe.prefill_ms:.2f}x vs equal-total dense; {act.prefill_ms / moe.prefill_ms:.2f}x vs equal-active dense"),
        ("inference speed-up (single-token decode)", "2.3x",
         f"{tot.decode_ms_per_token / moe.decode_ms_per_token:.2f}x vs equal-total; {act.decode_ms_per_token / moe.decode_ms_per_token:.2f}x vs equal-active"),
        ("FLOPs reduction vs the dense model", "78 %",
         f"{_saving(moe.MFLOPs_per_token, tot.MFLOPs_per_token)} vs equal-total dense; "
         f"{_saving(moe.MFLOPs_per_token, act.MFLOPs_per_token)} vs equal-active"),
        ("active vs total parameters", "12M active vs 100M dense",
         f"{moe.active_params_M:.2f}M active of {moe.total_params_M:.2f}M total (dense: {act.total_params_M:.2f}M / {tot.total_params_M:.2f}M)"),
        ("perplexity MoE vs dense", "12.3 vs 13.1",
         f"{moe.ppl_overall:.1f} vs {act.ppl_overall:.1f} (equal active) / {tot.ppl_overall:.1f} (equal total)"),
    ]
    return pd.DataFrame(rows, columns=["claim", "seed", "this run"]).set_index("claim")


# ------------------------------------------------------------------------------ export + model card
@torch.no_grad()
def hf_perplexity_by_domain(export_dir: Path, eval_data: dict[str, list]) -> dict[str, float]:
    """Validation perplexity of the exported checkpoint as ``transformers`` loads it (offline)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    return perplexity_by_domain(hf, eval_data)


def card_eval_sets(cfg: MoEStudyConfig) -> tuple[dict[str, list], dict[str, list] | None]:
    """The model card's held-out sets: the headline one (``eval_windows`` windows of ``card_seq_len``
    tokens per domain, comparable across subjects of other contexts) and, when the trained context
    differs, one at the trained context (windows of ``seq_len`` tokens, about as many tokens; else None)."""
    headline = domain_eval_data(dataclasses.replace(cfg, seq_len=cfg.card_seq_len))
    if cfg.seq_len == cfg.card_seq_len:
        return headline, None
    windows = max(1, cfg.eval_windows * cfg.card_seq_len // cfg.seq_len)
    return headline, domain_eval_data(dataclasses.replace(cfg, eval_windows=windows))


def history_train_s(result: TrainResult, tokens_per_step: int) -> float:
    """Seconds spent in training steps, from the logged throughput of every window of the history
    (window tokens / tokens_per_s; checkpoint and evaluation time excluded). Unlike
    ``result.wall_s`` (this call only) it covers every invocation of a resumed run."""
    total, prev = 0.0, 0
    for record in result.history:
        if record.get("tokens_per_s"):
            total += (record["step"] - prev) * tokens_per_step / record["tokens_per_s"]
        prev = record["step"]
    return total


def _describe(eval_data: dict[str, list]) -> str:
    counts = [sum(x.shape[0] for x, _ in batches) for batches in eval_data.values()]
    seq_len = next(x.shape[1] for batches in eval_data.values() for x, _ in batches)
    return f"validation split, up to {max(counts)} windows of {seq_len} tokens per domain"


def subject_snapshots(cfg: MoEStudyConfig, lm_cfg: LMConfig, run_dir: Path):
    """Training snapshots of the subject run (``routelib.routing.analyse.snapshots``): the initialisation
    (rebuilt from ``cfg.seed`` exactly as :func:`train_arm` builds it) and every kept checkpoint in
    ``run_dir``, each routing the same held-out windows (``snapshot_windows`` x ``snapshot_seq_len``
    tokens per domain)."""
    from routelib.routing.analyse.snapshots import collect_snapshots
    from routelib.routing.analyse.weights import checkpoint_steps, hf_from_checkpoint, hf_from_lm

    batches = domain_eval_data(dataclasses.replace(cfg, seq_len=cfg.snapshot_seq_len, eval_windows=cfg.snapshot_windows))

    def models():
        torch.manual_seed(cfg.seed)
        yield 0, hf_from_lm(LM(lm_cfg), "the initialisation")
        for step, folder in checkpoint_steps(run_dir):
            yield step, hf_from_checkpoint(folder)

    return collect_snapshots(models(), batches)


SNAPSHOTS_FILE = "training_snapshots.npz"  # beside the exported subject (notebook 06 reads it)


def export_subject(model: LM, cfg: MoEStudyConfig, result: TrainResult, eval_data: dict[str, list],
                   export_dir: Path, command: str, snapshots=None, at_context: dict[str, list] | None = None) -> dict:
    """Export the MoE arm as a Hugging Face Mixtral checkpoint with ``model_card.json`` and
    ``README.md``: config, data, steps, validation perplexity per domain on ``eval_data`` (and on
    ``at_context`` when given; see :func:`card_eval_sets`), measured on the export through
    ``AutoModelForCausalLM``, the command that made it, and the training ``snapshots`` when given
    (written beside it, ``routelib.routing.analyse.snapshots``)."""
    from routelib.routing.analyse.snapshots import save_snapshots

    export_dir = Path(export_dir)
    export_hf(model.cpu().float(), load_tokenizer(cfg.tokenizer), export_dir)
    card = dict(
        model="routelib MoE LM (Mixtral architecture), the offline routing subject of notebooks 04-06",
        command=command,
        study_config=dataclasses.asdict(cfg),
        lm_config=dataclasses.asdict(model.config),
        total_params=model.num_parameters(), active_params=model.num_parameters(active=True),
        steps=result.step, tokens_seen=result.step * cfg.batch_size * cfg.seq_len,
        data="routelib.data corpus, train split, all domains (code, math, fiction, encyclopedic, news), "
             f"random {cfg.seq_len}-token windows",
        eval=_describe(eval_data),
        validation_perplexity={k: round(v, 4) for k, v in hf_perplexity_by_domain(export_dir, eval_data).items()},
        train_wall_s=round(history_train_s(result, cfg.batch_size * cfg.seq_len), 1),
    )
    if at_context is not None:
        card["eval_at_context"] = _describe(at_context)
        card["validation_perplexity_at_context"] = {
            k: round(v, 4) for k, v in hf_perplexity_by_domain(export_dir, at_context).items()}
    if snapshots is not None:
        save_snapshots(snapshots, export_dir / SNAPSHOTS_FILE)
        card["training_snapshots"] = dict(
            file=SNAPSHOTS_FILE, steps=snapshots.steps.tolist(), tokens_per_domain=cfg.snapshot_windows * cfg.snapshot_seq_len,
            contents="per step: router matrices (L, E, H) and the top-k experts of fixed held-out tokens (N, L, k)")
    (export_dir / "model_card.json").write_text(json.dumps(card, indent=2))
    (export_dir / "README.md").write_text(subject_readme(card, model.config, cfg, export_dir.name))
    return card


def subject_readme(card: dict, lm_cfg: LMConfig, cfg: MoEStudyConfig, name: str) -> str:
    """The exported subject's README.md (the model card in words)."""
    lines = [f"# {name}", "", card["model"] + ".", "", f"Made by: `{card['command']}`", "",
             f"- parameters: {card['total_params'] / 1e6:.2f} M total, {card['active_params'] / 1e6:.2f} M active per token",
             f"- architecture: {lm_cfg.num_layers} layers, hidden {lm_cfg.hidden_size}, "
             f"{lm_cfg.num_experts} experts of width {lm_cfg.intermediate_size}, top-{lm_cfg.top_k}, "
             f"vocab {lm_cfg.vocab_size} (bpe8k), tied embeddings, trained context {cfg.seq_len} tokens",
             f"- training: {card['steps']} steps x {cfg.batch_size} x {cfg.seq_len} tokens = {card['tokens_seen'] / 1e6:.2f} M tokens, "
             f"lr {cfg.lr}, {card['train_wall_s']} s", f"- data: {card['data']}", ""]
    ppl_at = card.get("validation_perplexity_at_context")
    lines += [f"Validation perplexity (transformers `AutoModelForCausalLM`, fp32); {card['eval']}"
              + (f"; at context: {card['eval_at_context']}" if ppl_at else "") + ":", "",
              "| domain | perplexity |" + (f" at context ({cfg.seq_len}) |" if ppl_at else ""),
              "|---|---:|" + ("---:|" if ppl_at else "")]
    lines += [f"| {d} | {v:.2f} |" + (f" {ppl_at[d]:.2f} |" if ppl_at else "") for d, v in card["validation_perplexity"].items()]
    if "training_snapshots" in card:
        snap = card["training_snapshots"]
        lines += ["", f"Training snapshots (`{snap['file']}`, `routelib.routing.analyse.snapshots.load_snapshots`): {snap['contents']}, "
                  f"{snap['tokens_per_domain']} held-out tokens per domain, at steps {snap['steps']}."]
    lines += ["", "Load it: `AutoModelForCausalLM.from_pretrained(path)` or `routelib.models.load_hf(path)`."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- reference run
REFERENCE_DIR = "data/reference/03_moe_speedup"  # committed results of the reference run (DESIGN.md §7)


def flops_split(lm_cfg: LMConfig, seq_len: int) -> dict[str, float]:
    """Analytic forward FLOPs per token by part (2 per multiply-add, context T = ``seq_len``, as in
    :meth:`LM.flops_per_token`): attention projections, attention scores (2 L T d_attn), the FFN
    (k experts of 3 H I each, or the dense SwiGLU), the router (H E) and the LM head (V H); norms are
    left out. ``ffn_share`` is the FFN's share of the non-embedding FLOPs (everything but the head)."""
    c = lm_cfg
    d_attn, d_kv = c.num_heads * c.head_size, c.num_kv_heads * c.head_size
    attn_proj = 2 * c.num_layers * c.hidden_size * (2 * d_attn + 2 * d_kv)
    attn_scores = 2 * c.num_layers * seq_len * d_attn
    width = c.top_k * c.intermediate_size if c.is_moe else c.intermediate_size
    ffn = 2 * c.num_layers * 3 * c.hidden_size * width
    router = 2 * c.num_layers * c.hidden_size * c.num_experts if c.is_moe else 0
    head = 2 * c.vocab_size * c.hidden_size
    non_embedding = attn_proj + attn_scores + ffn + router
    return {"attention_projections": attn_proj, "attention_scores": attn_scores, "ffn": ffn, "router": router,
            "lm_head": head, "non_embedding": non_embedding, "ffn_share": ffn / non_embedding}


def _history_frame(result: TrainResult, tokens_per_step: int, train_flops_per_token: float) -> pd.DataFrame:
    df = pd.DataFrame(result.history)
    df.insert(1, "tokens", df["step"] * tokens_per_step)
    df.insert(2, "train_flops", df["tokens"] * train_flops_per_token)
    return df


def _reference_eval_list(eval_data: dict[str, list], per_domain: int) -> list:
    """The held-out batches logged during training: the first ``per_domain`` of every domain."""
    return [b for batches in eval_data.values() for b in batches[:per_domain]]


def reference_run(cfg: MoEStudyConfig, out_dir: str | Path = REFERENCE_DIR, seeds: tuple[int, ...] = (0,),
                  seed_arms: tuple[str, ...] = ARMS, eval_every: int = 50, log_every: int = 10,
                  eval_per_domain: int = 2, command: str | None = None, train_only: tuple[str, ...] = ()) -> dict:
    """Notebook 03's reference run: the three arms on the same batches for ``seeds[0]`` (and the arms
    in ``seed_arms`` for the other seeds, each seed its own init and batch order), then, on the first
    seed's models: perplexity per domain, round-robin latency, one MoE layer against transformers'
    MixtralSparseMoeBlock at the same shape, expert specialisation by domain over the MoE arm's
    checkpoints, load balance, the capacity sweep and the seed's claims. Results are written as each
    arm finishes (training resumes from ``cfg.out_dir`` checkpoints); the manifest comes last.
    ``train_only``: train just these arms of the first seed and stop (several processes can then train
    arms side by side; a final invocation without it loads them and measures)."""
    from routelib import moe_bench
    from routelib.routing.analyse.weights import checkpoint_steps

    out = paths.in_repo(out_dir)
    (out / "history").mkdir(parents=True, exist_ok=True)
    log = InvocationLog(out, command)  # every invocation, interrupted ones too (finished: null)
    eval_data = domain_eval_data(cfg)
    curve_data = _reference_eval_list(eval_data, eval_per_domain)
    arms_cfg = cfg.arm_configs()
    # (seed, arm) in training order: every arm of the first seed, then seed_arms of the others
    plan = [(seeds[0], arm) for arm in (train_only or ARMS)]
    plan += [] if train_only else [(seed, arm) for seed in seeds[1:] for arm in seed_arms]
    models, results, ppl_rows = {}, {}, []
    for seed, arm in plan:
        cfg_s = dataclasses.replace(cfg, seed=seed)
        batches = training_batches(cfg_s)
        model, result = train_arm(arm, arms_cfg[arm], cfg_s, batches, eval_data=curve_data, eval_every=eval_every,
                                  log_every=log_every)
        fwd = model.flops_per_token(cfg.seq_len)
        _history_frame(result, batches.tokens_per_step, 3 * fwd).to_csv(out / "history" / f"{arm}_seed{seed}.csv", index=False)
        if train_only:
            continue
        ppl = perplexity_by_domain(model, eval_data)
        ppl_rows += [dict(arm=arm, seed=seed, domain=d, perplexity=v) for d, v in ppl.items()]
        pd.DataFrame(ppl_rows).to_csv(out / "perplexity.csv", index=False)
        if seed == seeds[0]:
            models[arm], results[arm] = model, result
        print(f"{arm} seed {seed}: perplexity {ppl['overall']:.2f} ({result.wall_s:.0f} s)", flush=True)
    if train_only:
        log.finish()
        return {}
    ppl0 = {arm: {r["domain"]: r["perplexity"] for r in ppl_rows if r["arm"] == arm and r["seed"] == seeds[0]} for arm in ARMS}
    lat = latency(models, cfg, rounds=5)
    table = comparison_table(models, results, ppl0, lat, cfg.seq_len)
    split = pd.DataFrame({arm: flops_split(c, cfg.seq_len) for arm, c in arms_cfg.items()}).T
    table = table.join(split[["ffn_share"]])
    table.to_csv(out / "comparison.csv")
    split.to_csv(out / "flops_split.csv")
    seed_claims(table).to_csv(out / "claims.csv")
    layer = moe_bench.benchmark(hidden=cfg.hidden_size, ffn=cfg.intermediate_size, experts=cfg.num_experts,
                                top_k=cfg.top_k, tokens=(cfg.batch_size * cfg.seq_len,), dtype="fp32",
                                device=str(cfg.device_()), rounds=5, min_time_s=cfg.bench_min_time_s)
    layer.to_csv(out / "moe_layer_vs_transformers.csv", index=False)
    # expert specialisation over the MoE arm's checkpoints (first seed)
    moe_run = Path(results["moe"].checkpoint).parent
    spec = []
    for step, folder in checkpoint_steps(moe_run):
        m = LM(arms_cfg["moe"])
        load_checkpoint(folder, m)
        spec.append(routing_records(m.eval(), eval_data).assign(step=step))
    records = pd.concat(spec, ignore_index=True)
    records.to_csv(out / "specialisation.csv", index=False)
    final = records[records["step"] == records["step"].max()]
    load_balance(final).to_csv(out / "load_balance.csv")
    capacity_sweep(models["moe"], eval_data, cfg.factors()).to_csv(out / "capacity.csv", index=False)
    params = dict(study_config=dataclasses.asdict(cfg), seeds=list(seeds), seed_arms=list(seed_arms),
                  eval_every=eval_every, log_every=log_every, eval_per_domain=eval_per_domain,
                  tokens_per_arm=cfg.steps * cfg.batch_size * cfg.seq_len)
    summary = InvocationLog.summary(log.finish())
    return write_manifest(out, command=log.command, params=params, wall_s=summary.pop("wall_s"),
                          extra={"flops_formula": flops_formula(arms_cfg["moe"]), **log.code, **summary})


def matched_config(cfg: MoEStudyConfig) -> MoEStudyConfig:
    """The compute-matched arm's training: the equal-total dense model's steps (and warm-up) scaled
    by the ratio of the MoE's to its forward FLOPs per token, so that it trains on the MoE's total
    training FLOPs with a complete schedule of its own (warm-up, then cosine decay to the end)."""
    arms = cfg.arm_configs()
    moe, dense = (LM(arms[a]).flops_per_token(cfg.seq_len) for a in ("moe", "dense_total"))
    ratio = moe / dense
    return dataclasses.replace(cfg, steps=max(1, round(cfg.steps * ratio)),
                               warmup_steps=max(1, round(cfg.warmup_steps * ratio)))


def run_name(arm: str, seed: int) -> str:
    """A reference run's name, as ``--only_runs`` takes it and its files are named: ``<arm>_seed<k>``."""
    return f"{arm}_seed{seed}"


def parse_run_name(name: str) -> tuple[str, int]:
    arm, sep, seed = name.rpartition("_seed")
    if not sep or arm not in (*ARMS, MATCHED) or not seed.isdigit():
        raise ConfigError(f"run {name!r}: expected <arm>_seed<k> with arm one of {', '.join((*ARMS, MATCHED))}")
    return arm, int(seed)


def train_runs(cfg: MoEStudyConfig, runs: tuple[str, ...], out_dir: str | Path = REFERENCE_DIR,
               eval_every: int = 50, log_every: int = 10, eval_per_domain: int = 2,
               command: str | None = None) -> dict[str, dict]:
    """Train the named runs (``<arm>_seed<k>``, :func:`run_name`; the arms of :data:`ARMS` and the
    compute-matched :data:`MATCHED`) and evaluate each on the full held-out set: its history goes to
    ``history/<run>.csv`` and its record (perplexity and mean loss per domain, steps, tokens, training
    FLOPs and time) to ``final/<run>.json``, as each run finishes. Runs resume from their checkpoints;
    several processes can train different runs side by side. Returns the records."""
    from routelib.reference import write_record

    out = paths.in_repo(out_dir)
    (out / "history").mkdir(parents=True, exist_ok=True)
    log = InvocationLog(out, command)
    eval_data = domain_eval_data(cfg)
    curve_data = _reference_eval_list(eval_data, eval_per_domain)
    arms_cfg = cfg.arm_configs()
    records = {}
    for name in runs:
        arm, seed = parse_run_name(name)
        cfg_s = dataclasses.replace(matched_config(cfg) if arm == MATCHED else cfg, seed=seed)
        lm_cfg = arms_cfg["dense_total" if arm == MATCHED else arm]
        batches = training_batches(cfg_s)
        model, result = train_arm(arm, lm_cfg, cfg_s, batches, eval_data=curve_data, eval_every=eval_every,
                                  log_every=log_every)
        fwd = model.flops_per_token(cfg.seq_len)
        _history_frame(result, batches.tokens_per_step, 3 * fwd).to_csv(out / "history" / f"{name}.csv", index=False)
        ppl = perplexity_by_domain(model, eval_data)
        tokens = cfg_s.steps * batches.tokens_per_step
        records[name] = dict(arm=arm, seed=seed, steps=cfg_s.steps, warmup_steps=cfg_s.warmup_steps, tokens=tokens,
                             train_flops=3 * fwd * tokens, forward_flops_per_token=fwd, wall_s=result.wall_s,
                             perplexity=ppl, loss_nats={d: math.log(v) for d, v in ppl.items()})
        write_record(out, name, records[name])
        print(f"{name}: perplexity {ppl['overall']:.2f} ({result.wall_s:.0f} s)", flush=True)
    log.finish()
    return records


def load_reference(out_dir: str | Path = REFERENCE_DIR) -> dict:
    """The committed reference run (hash-checked): manifest, comparison, perplexity per arm/seed/domain,
    histories, FLOPs split, claims, layer benchmark, specialisation over checkpoints, balance, capacity."""
    out = paths.in_repo(out_dir)
    manifest = load_manifest(out)
    histories = {p.stem: pd.read_csv(p) for p in sorted((out / "history").glob("*.csv"))}
    return dict(
        manifest=manifest, histories=histories,
        comparison=pd.read_csv(out / "comparison.csv", index_col=0),
        perplexity=pd.read_csv(out / "perplexity.csv"),
        flops_split=pd.read_csv(out / "flops_split.csv", index_col=0),
        claims=pd.read_csv(out / "claims.csv", index_col=0),
        layer=pd.read_csv(out / "moe_layer_vs_transformers.csv"),
        specialisation=pd.read_csv(out / "specialisation.csv"),
        load_balance=pd.read_csv(out / "load_balance.csv", index_col=0),
        capacity=pd.read_csv(out / "capacity.csv"),
    )


def specialisation_summary(records: pd.DataFrame) -> pd.DataFrame:
    """Per (step, layer): the mutual information I(domain; expert) in bits between a held-out
    token's domain and the experts it is sent to (top-k assignments counted, domains weighted by
    their token counts), and its maximum log2(min(D, E)); 0 means routing ignores the domain."""
    rows = []
    for (step, layer), grp in records.groupby(["step", "layer"]):
        joint = grp.pivot_table(index="domain", columns="expert", values="count", aggfunc="sum").fillna(0.0).to_numpy()
        p = joint / joint.sum()  # (D, E)
        pd_, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
        nz = p > 0
        mi = float((p[nz] * np.log2(p[nz] / (pd_ @ pe)[nz])).sum())
        rows.append(dict(step=int(step), layer=int(layer), mi_bits=mi, max_bits=float(np.log2(min(p.shape)))))
    return pd.DataFrame(rows)


def reference_perplexity(ppl: pd.DataFrame) -> pd.DataFrame:
    """Overall and per-domain validation perplexity per arm: mean over the seeds the arm ran, and
    the number of seeds (rows: arms; columns: domains + ``seeds``)."""
    table = ppl.pivot_table(index="arm", columns="domain", values="perplexity", aggfunc="mean")
    table["seeds"] = ppl.groupby("arm")["seed"].nunique()
    order = [a for a in ARMS if a in table.index]
    cols = [c for c in ("overall", "code", "math", "fiction", "encyclopedic", "news") if c in table.columns] + ["seeds"]
    return table.loc[order, cols]


def reference_claims(ref: dict) -> pd.DataFrame:
    """The seed's claims beside the reference run: :func:`seed_claims` on the comparison table,
    plus the FLOPs saving on the non-embedding (transformer-block) FLOPs, where the experts live."""
    claims = seed_claims(ref["comparison"])
    split = ref["flops_split"]["non_embedding"]
    extra = pd.DataFrame({"seed": ["78 %"], "this run": [
        f"{_saving(split['moe'], split['dense_total'])} vs equal-total dense; "
        f"{_saving(split['moe'], split['dense_active'])} vs equal-active (non-embedding FLOPs)"]},
        index=pd.Index(["FLOPs reduction, transformer blocks only"], name="claim"))
    return pd.concat([claims, extra])


def reference_verdict(ref: dict) -> str:
    """The verdict of the reference run in words, every number read from its files."""
    ppl = ref["perplexity"]
    overall = ppl[ppl["domain"] == "overall"]
    mean = overall.groupby("arm")["perplexity"].mean()
    cmp_, split = ref["comparison"], ref["flops_split"]
    tokens = ref["manifest"]["params"]["tokens_per_arm"]
    moe_vs_act = overall.pivot_table(index="seed", columns="arm", values="perplexity").dropna(subset=["moe", "dense_active"])
    gaps = (moe_vs_act["moe"] - moe_vs_act["dense_active"]).round(2).tolist()
    return (
        f"After {tokens / 1e6:.2f} M training tokens per arm, validation perplexity (all domains) is "
        f"{mean['moe']:.2f} for the MoE, {mean['dense_active']:.2f} for the dense model with equal active "
        f"parameters and {mean['dense_total']:.2f} for the dense model with equal total parameters "
        f"(MoE − equal-active per seed: {gaps}). The MoE's forward pass costs "
        f"{split.loc['moe', 'non_embedding'] / split.loc['dense_total', 'non_embedding']:.2f}× the equal-total "
        f"model's non-embedding FLOPs (FFN {100 * split.loc['moe', 'ffn_share']:.0f} % of them). On this CPU it "
        f"trains at {cmp_.loc['moe', 'train_tokens_per_s']:,.0f} tokens/s against "
        f"{cmp_.loc['dense_active', 'train_tokens_per_s']:,.0f} (equal active) and "
        f"{cmp_.loc['dense_total', 'train_tokens_per_s']:,.0f} (equal total); prefill "
        f"{cmp_.loc['dense_total', 'prefill_ms'] / cmp_.loc['moe', 'prefill_ms']:.2f}× the equal-total model's speed.")



def main(argv: list[str] | None = None) -> int:
    """``python -m routelib.studies.moe_vs_dense subject --out data/moe-subject [--field value ...]``: train the
    MoE arm only (no dense baselines) and export it with a model card. Every MoEStudyConfig field is
    an option (``--num_experts 8``)."""
    parser = argparse.ArgumentParser(prog="python -m routelib.studies.moe_vs_dense", description=main.__doc__)
    parser.add_argument("command", choices=["subject", "reference"])
    parser.add_argument("--out", default=None, help="subject: export folder (data/moe-subject); reference: "
                        f"results folder (default {REFERENCE_DIR})")
    parser.add_argument("--seeds", default="0", help="reference: comma list of seeds; the first trains every arm")
    parser.add_argument("--seed_arms", default=",".join(ARMS), help="reference: arms trained for the other seeds")
    parser.add_argument("--eval_every", type=int, default=50, help="reference: held-out loss every this many steps")
    parser.add_argument("--log_every", type=int, default=10, help="reference: training-loss record every this many steps")
    parser.add_argument("--train_only", default="", help="reference: only train these arms of the first seed (comma list)")
    parser.add_argument("--only_runs", default="", help="reference: train and evaluate only these runs "
                        f"(comma list of <arm>_seed<k>, arms {', '.join((*ARMS, MATCHED))}) and stop")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    for f in dataclasses.fields(MoEStudyConfig):
        parser.add_argument(f"--{f.name}", type=type(f.default) if f.default is not None else str, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(MoEStudyConfig) if getattr(args, f.name) is not None}
    if isinstance(overrides.get("dense_baselines"), str):
        overrides["dense_baselines"] = overrides["dense_baselines"].lower() in ("1", "true", "yes")
    if args.command == "reference":
        cfg = MoEStudyConfig(**{**overrides, "dense_baselines": True})
        seed_arms = tuple(a for a in args.seed_arms.split(",") if a)
        if not set(seed_arms) <= set(ARMS):
            parser.error(f"--seed_arms {args.seed_arms!r}: choose from {', '.join(ARMS)}")
        only_runs = tuple(r for r in args.only_runs.split(",") if r)
        if only_runs:
            for r in only_runs:
                parse_run_name(r)
            train_runs(cfg, only_runs, args.out or REFERENCE_DIR, args.eval_every, args.log_every)
            return 0
        train_only = tuple(a for a in args.train_only.split(",") if a)
        if not set(seed_arms + train_only) <= set(ARMS):
            parser.error(f"--seed_arms/--train_only: choose from {', '.join(ARMS)}")
        reference_run(cfg, args.out or REFERENCE_DIR, tuple(int(x) for x in args.seeds.split(",")), seed_arms,
                      args.eval_every, args.log_every, train_only=train_only)
        return 0
    if args.out is None:
        parser.error("subject needs --out (e.g. data/moe-subject)")
    cfg = MoEStudyConfig(**{**overrides, "dense_baselines": False})
    lm_cfg = cfg.moe_config()
    model, result = train_arm("moe", lm_cfg, cfg, training_batches(cfg))
    snapshots = subject_snapshots(cfg, lm_cfg, Path(result.checkpoint).parent)
    headline, at_context = card_eval_sets(cfg)
    card = export_subject(model, cfg, result, headline, Path(args.out),
                          "python -m routelib.studies.moe_vs_dense " + " ".join(sys.argv[1:] if argv is None else argv),
                          snapshots, at_context)
    print(json.dumps(card["validation_perplexity"], indent=2))
    return 0


if __name__ == "__main__":
    from routelib import cli

    raise SystemExit(cli.run(main))
