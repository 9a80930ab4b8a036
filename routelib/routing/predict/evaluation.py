"""Evaluate next-layer expert predictors over leak-free splits: :class:`EvalConfig`, :func:`make_predictor`,
:func:`evaluate` (every predictor on every split, scored per (source layer, hop) and test subset),
:func:`summarize` (averaged over layers), :func:`metric_table` and :func:`seed_table` (beside the
claims of the small project notebook 05 tests: on Mixtral-8x7B, random 12.5 %, lookup tables 42 %, an MLP
55.6 % top-1 / 73.2 % top-2 -- measured on a random split over single layer transitions), and the command line::

    python -m routelib.routing.predict routing_data_collected/moe-subject --split problem --hops 1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from routelib.errors import ConfigError, RoutelibError
from routelib.routing.predict.metrics import METRICS, chance_metrics, routing_metrics_per_token
from routelib.routing.predict.dataset import (PredictorError, RoutingData, resolve_trace_dir, attach_hidden_states, layer_pairs,
                                           load_routing)
from routelib.routing.predict.splits import SPLITS, SUBSETS, Split, describe_split, make_splits, subset_masks
from routelib.routing.predict.pre_attention import PreAttentionProbePredictor
from routelib.routing.predict.predictors import (HIDDEN_PREDICTORS, PRE_ATTENTION_PREDICTORS, PREDICTORS,
                                              HiddenProbePredictor, HiddenRouterPredictor,
                                              HistoryMLPPredictor, HistoryPredictor, LookupPredictor, MLPConfig,
                                              MLPPredictor, NGramPredictor, Predictor, PrevTokenPredictor,
                                              PriorPredictor, ProbeConfig, RandomPredictor, SameExpertPredictor)



#: The Mixtral routing project's table (Mixtral-8x7B, random split over layer transitions): claims to test.
SEED_CLAIMS = {"random": {"top1": 0.125}, "lookup": {"top1": 0.42}, "mlp": {"top1": 0.556, "top2_hit": 0.732}}

def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise PredictorError(f"unknown {what} {unknown or text!r}; choose from {', '.join(allowed)}")
    return names


@dataclass
class EvalConfig:
    trace_dir: str = "routing_data_collected/moe-subject"  # trace folder (absolute, or relative to the repo root)
    split: str = "problem"  # comma list of split kinds: problem | dataset | token
    hops: str = "1"  # comma list of hops h >= 1: predict layer l+h from layer l
    predictors: str = "random,prior,same,lookup,ngram,prev_token,history,mlp"  # from PREDICTORS (hidden_*, pre_attn_*: the model)
    subsets: str = "all"  # comma list of test subsets reported: all | prompt | generated | unique
    test_fraction: float = 0.25  # share of problems (or tokens) held out per dataset
    seed: int = 0  # split, random predictor, MLP and probe
    ngram_n: int = 3  # layers in the longest n-gram key
    ngram_min_count: int = 1  # training rows a key needs before it is trusted
    ngram_alpha: float = 1.0  # smoothing towards the shorter key's estimate
    history_prompt: bool = False  # prev_token/history: prompt tokens see the previous token too (token-wise prefill)
    mlp_hidden: int = 128  # MLP width
    mlp_layers: int = 2  # MLP hidden layers
    mlp_token_dim: int = 16  # token-id embedding width (0: the MLP sees routing only)
    mlp_dropout: float = 0.0  # MLP dropout
    mlp_steps: int = 1000  # MLP optimizer steps
    mlp_batch: int = 512  # MLP examples per step
    mlp_lr: float = 1e-2  # MLP peak learning rate
    probe_steps: int = 200  # linear-probe optimizer steps
    probe_batch: int = 512  # linear-probe tokens per step
    probe_lr: float = 3e-3  # linear-probe peak learning rate
    model: str | None = None  # model for the hidden-state predictors; None: the manifest's name_or_path
    hidden_batch_tokens: int = 8192  # padded tokens per forward pass when recomputing hidden states
    out_dir: str | None = None  # trained MLPs are saved here (relative to the repo root); None: not saved
    device: str = "cpu"  # where the MLP and probes train: cpu | cuda | auto
    threads: int = 0  # torch CPU threads (0: torch's default; 1 suits these tiny matmuls on a busy machine)

    def __post_init__(self):
        for check in (self.split_kinds, self.hop_list, self.predictor_names, self.subset_names):
            check()  # each raises on a bad list
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")

    def split_kinds(self) -> list[str]:
        return _names(self.split, SPLITS, "split")

    def hop_list(self) -> list[int]:
        try:
            hops = [int(h) for h in str(self.hops).split(",") if h.strip()]
        except ValueError:
            raise ConfigError(f"hops={self.hops!r}: expected integers like '1,2,3'") from None
        if not hops or min(hops) < 1:
            raise PredictorError(f"hops={self.hops!r}: need integers >= 1")
        return hops

    def predictor_names(self) -> list[str]:
        return _names(self.predictors, PREDICTORS, "predictor")

    def subset_names(self) -> list[str]:
        return _names(self.subsets, SUBSETS, "subset")

    def mlp_config(self) -> MLPConfig:
        return MLPConfig(hidden_size=self.mlp_hidden, num_layers=self.mlp_layers, token_dim=self.mlp_token_dim,
                         dropout=self.mlp_dropout, steps=self.mlp_steps, batch_size=self.mlp_batch, lr=self.mlp_lr,
                         seed=self.seed, device=self.device)

    def probe_config(self) -> ProbeConfig:
        return ProbeConfig(steps=self.probe_steps, batch_size=self.probe_batch, lr=self.probe_lr, seed=self.seed,
                           device=self.device)

    def run_dir(self) -> Path | None:
        return None if self.out_dir is None else resolve_trace_dir(self.out_dir)


def make_predictor(name: str, cfg: EvalConfig | None = None, out_dir: str | os.PathLike | None = None) -> Predictor:
    """A fresh predictor by name (:data:`PREDICTORS`), configured from ``cfg``."""
    cfg = cfg or EvalConfig()
    makers = {
        "random": lambda: RandomPredictor(cfg.seed),
        "prior": PriorPredictor,
        "same": SameExpertPredictor,
        "lookup": lambda: LookupPredictor(cfg.ngram_min_count, cfg.ngram_alpha),
        "ngram": lambda: NGramPredictor(cfg.ngram_n, cfg.ngram_min_count, cfg.ngram_alpha),
        "prev_token": lambda: PrevTokenPredictor(cfg.history_prompt),
        "history": lambda: HistoryPredictor(cfg.ngram_n, cfg.ngram_min_count, cfg.ngram_alpha, cfg.history_prompt),
        "mlp": lambda: MLPPredictor(cfg.mlp_config(), out_dir),
        "mlp_history": lambda: HistoryMLPPredictor(cfg.mlp_config(), out_dir, cfg.history_prompt),
        "hidden_router": HiddenRouterPredictor,
        "hidden_probe": lambda: HiddenProbePredictor(cfg.probe_config()),
        "pre_attn_probe": lambda: PreAttentionProbePredictor(cfg.probe_config()),
    }
    if name not in makers:
        raise PredictorError(f"unknown predictor {name!r}; choose from {', '.join(PREDICTORS)}")
    return makers[name]()


@dataclass
class SplitResult:
    split: Split  # which rows trained and tested
    metrics: pd.DataFrame  # one row per (subset, predictor, hop, source layer)
    predictors: dict  # name -> the fitted Predictor
    test: RoutingData  # the test rows


def mlp_dir(cfg: EvalConfig, split: Split, name: str = "mlp") -> Path | None:
    """Where :func:`run_split` saves the MLP ``name`` ("mlp", "mlp_history") of ``split`` (None
    without ``cfg.out_dir``)."""
    run_dir = cfg.run_dir()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", split.label).strip("-").lower()  # "problem-gsm8k-humaneval-..."
    prefix = name.replace("_", "-")
    return None if run_dir is None else run_dir / f"{prefix}-{slug}"


def run_split(data: RoutingData, split: Split, cfg: EvalConfig | None = None) -> SplitResult:
    """Fit every predictor of ``cfg`` on the split's training rows and score its test rows for every
    (source layer, hop); the analytic chance level is added as the predictor ``chance``."""
    cfg = cfg or EvalConfig()
    pairs = layer_pairs(data.num_layers, cfg.hop_list())
    train, test = data.take(split.train), data.take(split.test)
    masks = subset_masks(test, cfg.subset_names())
    chance = chance_metrics(data.num_experts, data.top_k)
    rows, fitted = [], {}
    for name in cfg.predictor_names():
        saved = mlp_dir(cfg, split, name) if name.startswith("mlp") else None
        fitted[name] = predictor = make_predictor(name, cfg, saved)
        predictor.fit(train, pairs)
        for layer, hop in pairs:
            per = routing_metrics_per_token(predictor.predict_scores(test, layer, hop), test.experts[:, layer + hop])
            for subset, mask in masks.items():
                rows.append({"predictor": name, "subset": subset, "hop": hop, "layer": layer, "n": int(mask.sum()),
                             **{m: float(per[m][mask].mean()) if mask.any() else float("nan") for m in METRICS}})
    for layer, hop in pairs:
        rows += [{"predictor": "chance", "subset": s, "hop": hop, "layer": layer, "n": int(m.sum()), **chance}
                 for s, m in masks.items()]
    df = pd.DataFrame(rows)
    df.insert(0, "split", split.kind)
    df.insert(1, "train", split.train_label)
    df.insert(2, "test", split.test_label)
    df.insert(df.columns.get_loc("layer") + 1, "target_layer", df["layer"] + df["hop"])
    return SplitResult(split, df, fitted, test)


def evaluate(source: str | os.PathLike | RoutingData | None = None, cfg: EvalConfig | None = None,
             **overrides) -> pd.DataFrame:
    """Fit and score every predictor on every split of ``cfg`` (fields may be overridden by keyword).

    source: a trace directory, loaded :class:`RoutingData` (hidden states attached or not), or None
    for ``cfg.trace_dir``. Hidden states are recomputed (once) when a hidden-state predictor is asked for
    (with the pre-attention states when ``pre_attn_probe`` is).
    Returns the per-layer table: split, train, test, predictor, subset, hop, layer, target_layer, n
    and the four metrics; :func:`summarize` averages it over layers (the comparison table).
    ``.attrs["splits"]`` says in one line per split what was held out (:func:`describe_split`).
    """
    cfg = dataclasses.replace(cfg or EvalConfig(), **overrides)
    data = source if isinstance(source, RoutingData) else load_routing(source if source is not None else cfg.trace_dir)
    if len(data) == 0:
        raise PredictorError("the traces hold no tokens")
    names = set(cfg.predictor_names())
    pre = bool(names & set(PRE_ATTENTION_PREDICTORS))
    if names & set(HIDDEN_PREDICTORS) and (data.hidden is None or (pre and data.hidden.pre_attention is None)):
        attach_hidden_states(data, cfg.model, batch_tokens=cfg.hidden_batch_tokens, device=cfg.device,
                             pre_attention=pre)
    splits = [split for kind in cfg.split_kinds() for split in make_splits(data, kind, cfg.seed, cfg.test_fraction)]
    out = pd.concat([run_split(data, split, cfg).metrics for split in splits], ignore_index=True)
    out.attrs["splits"] = [describe_split(data, split) for split in splits]
    return out


def summarize(per_layer: pd.DataFrame) -> pd.DataFrame:
    """The comparison table: metrics averaged over source layers (unweighted; every layer scores the
    same tokens) per split, direction, subset, hop and predictor, predictors in table order."""
    keys = ["split", "train", "test", "subset", "hop", "predictor"]
    order = {name: i for i, name in enumerate(("chance", *PREDICTORS))}
    out = per_layer.groupby(keys, sort=False).agg(n=("n", "first"), layers=("layer", "nunique"),
                                                  **{m: (m, "mean") for m in METRICS}).reset_index()
    out["_order"] = out["predictor"].map(order)
    return out.sort_values(["split", "train", "test", "subset", "hop", "_order"], kind="stable") \
        .drop(columns="_order").reset_index(drop=True)


def metric_table(summary: pd.DataFrame, columns: str | list[str], metric: str = "top1", **where) -> pd.DataFrame:
    """One metric of :func:`summarize`'s table as predictor (rows, table order) x ``columns`` (one
    column name, or several: a column per combination), over the rows whose columns equal ``where``
    (e.g. ``hop=1, subset="all"``). ``columns="direction"`` gives one column per split and direction
    ("dataset: humaneval -> gsm8k")."""
    rows = summary.assign(direction=summary["split"] + ": " + summary["train"] + " -> " + summary["test"])
    for key, value in where.items():
        rows = rows[rows[key] == value]
    if rows.empty:
        raise PredictorError(f"no rows with {where} in the summary")
    order = [p for p in ("chance", *PREDICTORS) if p in set(rows["predictor"])]
    return rows.pivot_table(index="predictor", columns=columns, values=metric, sort=False).reindex(order)


def seed_table(summary: pd.DataFrame, split: str = "problem", hop: int = 1, subset: str = "all") -> pd.DataFrame:
    """The seed's table (method, top-1, top-2, improvement over random) with our numbers beside its
    claims, for one split (the first direction), hop and subset. Top-2 is ``top2_hit``."""
    rows = summary[(summary["split"] == split) & (summary["hop"] == hop) & (summary["subset"] == subset)]
    if rows.empty:
        raise PredictorError(f"no rows for split {split!r}, hop {hop}, subset {subset!r} in the summary")
    rows = rows[rows["test"] == rows["test"].iloc[0]].set_index("predictor")
    chance = rows.loc["chance", "top1"] if "chance" in rows.index else float("nan")
    table = pd.DataFrame({"top1": rows["top1"], "top2_hit": rows["top2_hit"], "x_random": rows["top1"] / chance})
    claims = pd.DataFrame(SEED_CLAIMS).T.rename(columns=lambda c: f"seed_{c}")
    claims["seed_x_random"] = claims["seed_top1"] / SEED_CLAIMS["random"]["top1"]
    claims = claims.rename(index={"random": "chance"})
    return table.join(claims, how="left")


def _flag(text: str) -> bool:
    """A boolean option's value: true/1/yes or false/0/no."""
    if text.lower() not in ("true", "1", "yes", "false", "0", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def main(argv: list[str] | None = None) -> int:
    """``python -m routelib.routing.predict.predictors <trace_dir> [--split problem,dataset,token] [--hops 1,2]
    [--predictors ...] [--<EvalConfig field> value ...]``: print the comparison table."""
    parser = argparse.ArgumentParser(prog="python -m routelib.routing.predict", description=main.__doc__)
    parser.add_argument("trace_dir", help="a routing-trace folder (manifest.json + Parquet shards)")
    parser.add_argument("--per_layer", action="store_true", help="print the per-layer table as well")
    for f in dataclasses.fields(EvalConfig):
        if f.name != "trace_dir":
            kind = type(f.default) if f.default is not None else str
            kind = _flag if kind is bool else kind
            parser.add_argument(f"--{f.name}", type=kind, default=None, help=f"(default: {f.default})")
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)
                 if f.name != "trace_dir" and getattr(args, f.name) is not None}
    try:
        cfg = EvalConfig(trace_dir=args.trace_dir, **overrides)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        per_layer = evaluate(cfg.trace_dir, cfg)
    except RoutelibError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in per_layer.attrs.get("splits", []):
        print(line)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 4):
        if args.per_layer:
            print(per_layer.to_string(index=False))
        print(summarize(per_layer).to_string(index=False))
    return 0

