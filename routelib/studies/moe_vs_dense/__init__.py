"""MoE vs dense language models at the same token budget (notebook 03).

The MoE-speedup project that notebook 03 tests claims an MoE LM with 4 experts / top-2 is 2.3x faster than a dense model, with
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

import dataclasses
import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from routelib.device import resolve_device
from routelib import paths
from routelib.bench import compare
from routelib.data import TokenWindows, load_tokenizer, token_stream
from routelib.errors import ConfigError
from routelib.evaluation import domain_eval_data, perplexity_by_domain, train_tokens_per_s  # noqa: F401 (notebook 03 calls them here)
from routelib.models import LM, LMConfig
from routelib.models.moe import DenseFFN, MoEFFN
from routelib.train import TrainConfig, TrainResult, train

ARMS = ("moe", "dense_active", "dense_total")
# The equal-total dense model trained with its own complete schedule (warm-up and full decay) for the
# MoE's training FLOPs: fewer steps, same batches; a compute-matched comparison (reference run only).
MATCHED = "dense_total_matched"


@dataclass
class MoEStudyConfig:
    # --- the models (the dense arms are derived from these) ---
    hidden_size: int = 128  # H: residual width of every arm
    num_layers: int = 2  # decoder blocks (the original project: 2)
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA)
    intermediate_size: int = 256  # I: width of one expert; dense arms use k*I and E*I
    num_experts: int = 4  # E (the original project: 4)
    top_k: int = 2  # k (the original project: 2)
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
        return resolve_device(self.device)


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


def saving(ours: float, theirs: float) -> str:
    """'20 %' for ours = 0.8 x theirs; '+3 % more' when ours costs more."""
    pct = round(100 * (1 - ours / theirs))
    return f"{pct} %" if pct >= 0 else f"{-pct} % more"


def seed_claims(table: pd.DataFrame) -> pd.DataFrame:
    """The original project's headline claims beside this run's measurements (``table`` from
    :func:`comparison_table`, with all three arms)."""
    moe, act, tot = table.loc["moe"], table.loc["dense_active"], table.loc["dense_total"]
    rows = [
        ("inference speed-up of the MoE over the dense model (prefill)", "2.3x",
         f"{tot.prefill_ms / moe.prefill_ms:.2f}x vs equal-total dense; {act.prefill_ms / moe.prefill_ms:.2f}x vs equal-active dense"),
        ("inference speed-up (single-token decode)", "2.3x",
         f"{tot.decode_ms_per_token / moe.decode_ms_per_token:.2f}x vs equal-total; {act.decode_ms_per_token / moe.decode_ms_per_token:.2f}x vs equal-active"),
        ("FLOPs reduction vs the dense model", "78 %",
         f"{saving(moe.MFLOPs_per_token, tot.MFLOPs_per_token)} vs equal-total dense; "
         f"{saving(moe.MFLOPs_per_token, act.MFLOPs_per_token)} vs equal-active"),
        ("active vs total parameters", "12M active vs 100M dense",
         f"{moe.active_params_M:.2f}M active of {moe.total_params_M:.2f}M total (dense: {act.total_params_M:.2f}M / {tot.total_params_M:.2f}M)"),
        ("perplexity MoE vs dense", "12.3 vs 13.1",
         f"{moe.ppl_overall:.1f} vs {act.ppl_overall:.1f} (equal active) / {tot.ppl_overall:.1f} (equal total)"),
    ]
    return pd.DataFrame(rows, columns=["claim", "original project", "this run"]).set_index("claim")


# ---------------------------------------------------------------------------------- FLOPs by part
def flops_split(lm_cfg: LMConfig, seq_len: int) -> dict[str, float]:
    """Analytic forward FLOPs per token by part (2 per multiply-add, context T = ``seq_len``, as in
    :meth:`LM.flops_per_token`): attention projections, attention scores (2 L T d_attn), the FFN
    (k experts of 3 H I each, or the dense SwiGLU), the router (H E) and the LM head (V H); norms are
    left out. ``ffn_share`` is the FFN's share of the non-embedding FLOPs (everything but the head),
    ``ffn_share_all`` its share of all forward FLOPs (``all_forward``: the head included)."""
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
            "lm_head": head, "non_embedding": non_embedding, "all_forward": non_embedding + head,
            "ffn_share": ffn / non_embedding, "ffn_share_all": ffn / (non_embedding + head)}


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
