"""Notebook 01's reference run (docs/design.md §7): the pathway study of
:mod:`routelib.studies.pathways` at a scale that can decide the original project's claim -- routed pathways of
SmolLM2-135M trained until held-out perplexity recovers most of the gap routing opened, or plateaus --
its purity measured with bootstrap intervals against controls, its small result files committed under
``data/reference/01_train_pathway_llm/`` with a manifest, and the functions notebook 01 reads them with.

Command: ``python -m routelib.studies.pathways reference``; :data:`REFERENCE_LAUNCH` is how the
committed run was made.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from routelib import metrics, paths
from routelib.config import from_params
from routelib.errors import ConfigError
from routelib.models.grouping import GROUPINGS
from routelib.models.pathways import RoutedLLM, decoder_layers
from routelib.reference import (InvocationLog, ReferenceError, load_if_made, load_manifest, load_records,
                                reference_main, split_parts, torch_threads, write_manifest, write_record)
from routelib.studies.pathways import (
    PathwayStudyConfig,
    RoutingSample,
    build_routed,
    control_selections,
    domain_eval_data,
    evaluate,
    fine_tune,
    grouping_error,
    load_base,
    load_orders,
    probe_batch,
    router_metrics,
    save_orders,
    selection_error,
    switch_arm,
    training_batches,
)
from routelib.train import TrainResult, prune_checkpoints

# docs/design.md §7: the study at a scale that can decide the original project's claim, on the CPU, its small result
# files committed under data/reference/01_train_pathway_llm/ with a manifest. The runs:
#
#   main arm       GLBL at cfg.grouping, every seed of ``seeds``     (the answer, with its seed spread)
#   switch arm     the per-batch Switch loss instead, first seed     (does the global batch matter?)
#   other grouping GLBL at ``other_grouping``, first seed            (do the pathways' neurons matter?)
#
# Every run trains until its held-out perplexity recovers ``recover_target`` of the gap that routing
# opened (untrained routing -> base model), or plateaus (< ``plateau_tol`` relative change over the last
# ``plateau_fraction`` of its steps, checked from ``min_steps`` on), or reaches cfg.steps; which of the
# three, and at how many tokens, is recorded (:func:`stop_rule`). Training goes in chunks of
# ``eval_every`` steps with the schedule of cfg.steps (``routelib.train``'s stop_step): the held-out
# curve is evaluated and a checkpoint written at every chunk's end, older checkpoints are deleted, and
# a killed or interrupted invocation continues from the newest. A finished run writes its history, its
# held-out routing sample and its record at once (``history/``, ``samples/``, ``final/``), so processes
# side by side (``--part i/n``) share the work; the invocation without a part trains whatever is
# missing, measures (grouping error before fine-tuning, purity of every run's router and controls with
# bootstrap intervals over held-out windows, per layer and per domain, pathway tables) and writes the
# manifest last.
REFERENCE_DIR = "data/reference/01_train_pathway_llm"  # committed results (docs/design.md §7)
REFERENCE_COMMAND = "python -m routelib.studies.pathways reference"
#: How the reference run is made: two 1-thread processes side by side, then the measuring invocation.
REFERENCE_LAUNCH = (f"{REFERENCE_COMMAND} --part 1/2 --threads 1 & {REFERENCE_COMMAND} --part 2/2 --threads 1 & wait; "
                    f"{REFERENCE_COMMAND} --threads 1")
STOP_REASONS = ("recovered", "plateau", "max_steps", "no_gap")

#: The reference configuration (PathwayStudyConfig fields the command line overrides): SmolLM2-135M,
#: 16 pathways, top-4, every other layer from 2 to 28 (14 layers; layer 0 alone multiplies perplexity
#: ~100x, notebook 01), co-activation groups (lower best-4-of-16 error than contiguous blocks on every
#: layer, grouping_error), GLBL with momentum frequencies, routers + routed MLPs fine-tuned.
#: ``steps`` is the cap of the schedule: 500 steps x 1,024 tokens; at the 6.2 s per step measured on one
#: thread of a busy 2-core CPU, two runs per 1-thread process take at most ~2 h.
REFERENCE_DEFAULTS = dict(
    model_name="smollm2-135m", num_pathways=16, top_k_pathways=4, route_every_n_layers=2, first_routed_layer=2,
    last_routed_layer=28, grouping="coactivation", grouping_windows=8, glbl_weight=0.1, momentum=0.9,
    train_scope="router+mlp", seq_len=128, batch_size=8, steps=500, lr=1e-3, warmup_steps=20, eval_windows=16,
    eval_batch_size=8, probe_windows=10, device="cpu", out_dir="runs/01_reference",
)


@dataclass
class ReferenceSettings:
    """How the reference run is run and measured, beyond the study's PathwayStudyConfig."""

    seeds: list[int] = field(default_factory=lambda: [0, 1])  # seeds of the main arm (GLBL, cfg.grouping)
    other_grouping: str = "contiguous"  # grouping of the comparison arm (GLBL, first seed); "" = no such arm
    switch_arm: bool = True  # also train the Switch-loss arm (cfg.grouping, first seed)
    eval_every: int = 25  # steps between held-out perplexity evaluations (the stop rule is checked there)
    curve_windows: int = 4  # held-out windows per domain in those evaluations (the final one uses eval_windows)
    recover_target: float = 0.8  # stop once perplexity recovers this share of the gap untrained routing -> base
    recovery_scale: str = "log"  # ... measured in held-out loss = log perplexity ("log") or perplexity ("linear")
    plateau_tol: float = 0.01  # ... or once it changes by less than this (relative) over the last plateau_fraction
    plateau_fraction: float = 0.2  # of the steps so far ("the last fifth")
    min_steps: int = 100  # the plateau is not checked before this many steps
    log_every: int = 5  # a training-history record (window means) every this many steps
    bootstrap: int = 1000  # resamples of held-out windows for the purity intervals
    confidence: float = 0.95  # level of those intervals

    def __post_init__(self):
        for name in ("eval_every", "curve_windows", "log_every", "bootstrap"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: need >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"seeds={self.seeds!r}: need distinct non-negative seeds")
        if self.other_grouping and self.other_grouping not in GROUPINGS:
            raise ConfigError(f"other_grouping={self.other_grouping!r}: choose one of {GROUPINGS} or ''")
        if self.recovery_scale not in RECOVERY_SCALES:
            raise ConfigError(f"recovery_scale={self.recovery_scale!r}: choose one of {RECOVERY_SCALES}")
        if not 0 < self.recover_target <= 1:
            raise ConfigError(f"recover_target={self.recover_target!r}: need 0 < target <= 1")
        if not self.plateau_tol > 0 or not 0 < self.plateau_fraction < 1:
            raise ConfigError(f"plateau_tol={self.plateau_tol!r} must be > 0 and plateau_fraction="
                              f"{self.plateau_fraction!r} in (0, 1)")
        if self.min_steps < 0:
            raise ConfigError(f"min_steps={self.min_steps!r}: need >= 0")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence={self.confidence!r}: need 0 < confidence < 1")


@dataclass(frozen=True)
class RunSpec:
    arm: str  # "glbl" (Global-Batch Load Balancing) or "switch" (per-batch Switch loss)
    grouping: str  # neuron grouping of the pathways
    seed: int  # router init, grouping init, data order

    @property
    def name(self) -> str:
        return f"{self.arm}-{self.grouping}-s{self.seed}"


def reference_plan(cfg: PathwayStudyConfig, settings: ReferenceSettings) -> list[RunSpec]:
    """The runs (see the section's comment), main arm first."""
    first = settings.seeds[0]
    runs = [RunSpec("glbl", cfg.grouping, s) for s in settings.seeds]
    if settings.switch_arm:
        runs.append(RunSpec("switch", cfg.grouping, first))
    if settings.other_grouping and settings.other_grouping != cfg.grouping:
        runs.append(RunSpec("glbl", settings.other_grouping, first))
    return runs


def run_config(cfg: PathwayStudyConfig, spec: RunSpec) -> PathwayStudyConfig:
    """The study configuration of one run: its grouping and seed, and for the Switch arm the Switch loss
    at GLBL's weight (:func:`switch_arm`)."""
    if spec.arm not in ("glbl", "switch"):
        raise ConfigError(f"run {spec.name}: arm must be 'glbl' or 'switch'")
    run = dataclasses.replace(cfg, grouping=spec.grouping, seed=spec.seed)
    return switch_arm(run) if spec.arm == "switch" else run


# ------------------------------------------------------------------------------------ stop rule
RECOVERY_SCALES = ("log", "linear")


def recovery(ppl: float, base: float, untrained: float, scale: str = "log") -> float:
    """Share of the perplexity gap untrained routing opened that ``ppl`` has closed, on a ``scale``:
    "log" -- of the gap in held-out loss, log(ppl) (nats/token): (log u - log p) / (log u - log b);
    "linear" -- of the gap in perplexity itself, (u - p) / (u - b), as notebook 01 reports. NaN when
    there is no gap. With many routed layers the untrained perplexity is in the thousands and the
    linear share passes 80 % while the model is still several times worse than the base (notebook
    01's 4-layer gap was 37 -> 56); the log share weighs every halving of perplexity alike."""
    if scale not in RECOVERY_SCALES:
        raise ConfigError(f"recovery scale {scale!r}: choose one of {RECOVERY_SCALES}")
    if scale == "log":
        if min(ppl, base, untrained) <= 0:
            return float("nan")
        ppl, base, untrained = math.log(ppl), math.log(base), math.log(untrained)
    gap = untrained - base
    return (untrained - ppl) / gap if gap > 0 else float("nan")


def stop_rule(steps, ppls, base: float, untrained: float, max_steps: int, settings: ReferenceSettings) -> tuple[str | None, dict]:
    """Whether a run stops after its newest held-out evaluation: ``steps`` and ``ppls`` are the
    evaluations so far (ascending steps). Returns (reason or None, facts): "no_gap" (routing did not
    raise perplexity), "recovered" (:func:`recovery` on ``recovery_scale`` >= recover_target), "plateau"
    (from ``min_steps`` on, the relative change of perplexity since the newest evaluation at or before (1 - plateau_fraction) * step
    is below plateau_tol), "max_steps" (the cap); facts: step, ppl, recovery, change (NaN when no
    earlier evaluation lies in reach)."""
    steps, ppls = list(steps), list(ppls)
    if len(steps) != len(ppls) or not steps:
        raise ConfigError(f"stop_rule: need as many perplexities as steps (>= 1), got {len(ppls)} and {len(steps)}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ConfigError(f"stop_rule: steps must increase, got {steps}")
    step, ppl = steps[-1], ppls[-1]
    earlier = [p for s, p in zip(steps, ppls) if s <= (1 - settings.plateau_fraction) * step and s < step]
    change = abs(earlier[-1] - ppl) / earlier[-1] if earlier else float("nan")
    facts = dict(step=step, ppl=ppl, recovery=recovery(ppl, base, untrained, settings.recovery_scale), change=change)
    if not untrained > base:
        return "no_gap", facts
    if facts["recovery"] >= settings.recover_target:
        return "recovered", facts
    if step >= settings.min_steps and earlier and change < settings.plateau_tol:
        return "plateau", facts
    if step >= max_steps:
        return "max_steps", facts
    return None, facts


# ----------------------------------------------------------------------------- training a run
def curve_metrics(model: RoutedLLM, data: dict[str, list], min_load: float = 0.01) -> dict[str, float]:
    """What the training curve records at an evaluation: held-out perplexity (``ppl``, ``ppl_<domain>``)
    and, over the routed layers, utilisation and load balance of the pathways (means), the busiest
    pathway's share, and each layer's load balance (``load_balance_L<layer>``)."""
    res = evaluate(model, data)
    out = {"ppl": res.perplexity["overall"], **{f"ppl_{d}": v for d, v in res.perplexity.items() if d != "overall"}}
    n = model.routing_config.num_pathways
    per = {layer: metrics.pathway_metrics(res.sample.tokens, idx, n, model.config.vocab_size, top_n=0, min_load=min_load)
           for layer, idx in res.sample.selections.items()}
    out.update(utilisation=float(np.mean([m.utilisation for m in per.values()])),
               load_balance=float(np.mean([m.load_balance for m in per.values()])),
               max_load=float(max(m.max_load for m in per.values())))
    out.update({f"load_balance_L{layer}": m.load_balance for layer, m in per.items()})
    return out


def _curve(history: list[dict]) -> tuple[list[int], list[float]]:
    rows = [r for r in history if "eval_ppl" in r]
    return [int(r["step"]) for r in rows], [float(r["eval_ppl"]) for r in rows]


def train_until(routed: RoutedLLM, cfg: PathwayStudyConfig, settings: ReferenceSettings, batch_fn, curve: dict[str, list],
                base_ppl: float, untrained_ppl: float, name: str) -> tuple[TrainResult, str, dict]:
    """Fine-tune ``routed`` (:func:`fine_tune`, checkpoints under cfg.out_dir) in chunks of ``eval_every``
    steps until :func:`stop_rule` says stop, on the held-out ``curve`` batches whose base and untrained
    perplexities are given. Resumes from the newest checkpoint (a finished run only re-decides), keeps one
    checkpoint. Returns (the last chunk's TrainResult, stop reason, the stop rule's facts)."""

    every = settings.eval_every
    eval_fn = lambda m: curve_metrics(m, curve, cfg.min_load)  # noqa: E731
    chunk = dict(eval_data=eval_fn, eval_every=every, log_every=settings.log_every)
    target = min(every, cfg.steps)
    while True:
        result = fine_tune(routed, cfg, batch_fn, name=name, stop_step=target, **chunk)
        if result.checkpoint:
            prune_checkpoints(Path(result.checkpoint).parent, keep=1)  # ~0.5 GB each at SmolLM2 size
        steps, ppls = _curve(result.history)
        if steps and steps[-1] == result.step:
            reason, facts = stop_rule(steps, ppls, base_ppl, untrained_ppl, cfg.steps, settings)
            if reason is not None:
                return result, reason, facts
        target = min(cfg.steps, (result.step // every + 1) * every)


def _history_frame(history: list[dict], tokens_per_step: int, untrained_ppl: float) -> pd.DataFrame:
    """The run's history with the tokens seen at each record, and a step-0 row holding the untrained
    routing's held-out perplexity (the start of the recovery curve)."""
    df = pd.DataFrame([{"step": 0, "eval_ppl": untrained_ppl}] + history)
    df.insert(1, "tokens", df["step"] * tokens_per_step)
    return df


def _save_sample(path: Path, trained: RoutingSample, untrained: RoutingSample) -> None:
    """The held-out routing of a run, small: tokens, domains, windows, and (n, L, k) uint8 selections of
    the trained and the untrained router (layers in ``layers``)."""
    layers = sorted(trained.selections)
    stack = lambda s: np.stack([s.selections[l] for l in layers], axis=1).astype(np.uint8)  # noqa: E731,E741 (n, L, k)
    np.savez_compressed(path, tokens=trained.tokens.astype(np.int32), domains=trained.domains.astype(str),
                        seq_ids=trained.seq_ids.astype(np.int32), layers=np.asarray(layers, dtype=np.int32),
                        trained=stack(trained), untrained=stack(untrained))


def load_sample(path: str | Path, router: str = "trained") -> RoutingSample:
    """A run's held-out routing sample (``samples/<run>.npz``) as a :class:`RoutingSample` of ``router``
    ("trained" or "untrained"): what :func:`routelib.studies.pathways.views.pathway_explorer` browses."""
    if router not in ("trained", "untrained"):
        raise ConfigError(f"load_sample: router={router!r}: choose 'trained' or 'untrained'")
    with np.load(path) as z:
        sel = z[router].astype(np.int64)  # (n, L, k)
        return RoutingSample(z["tokens"].astype(np.int64), z["domains"].astype(str), z["seq_ids"].astype(np.int64),
                             {int(l): sel[:, j] for j, l in enumerate(z["layers"])})  # noqa: E741


def train_and_record(spec: RunSpec, cfg: PathwayStudyConfig, settings: ReferenceSettings, out: Path,
                      curve: dict[str, list], eval_data: dict[str, list], base: dict) -> tuple[dict, RoutedLLM]:
    """Train (or resume) one run until it stops, then write its grouping (``groupings/``, at the start),
    the k-of-N selection error before and after training on ``probe_windows`` held-out windows
    (``selection_error/``), its history, held-out routing sample and record: stop reason, step and tokens;
    held-out perplexity per domain of the base model, the untrained and the trained routing (full
    evaluation set) and the recovery; training tokens/s. Returns the record and the trained model."""
    rcfg = run_config(cfg, spec)
    model, tok = load_base(rcfg)
    stored = out / "groupings" / f"{spec.name}.npz"  # a resumed run keeps the grouping it started with
    routed = build_routed(model, rcfg, tokenizer=tok, orders=load_orders(stored) if stored.is_file() else None)
    if routed.neuron_orders and not stored.is_file():
        save_orders(stored, routed.neuron_orders)
    untrained = evaluate(routed, eval_data)  # the untrained router: control, and the start of the curve
    untrained_curve = evaluate(routed, curve).perplexity["overall"]
    probe = probe_batch(eval_data, rcfg.probe_windows)[0] if rcfg.probe_windows else None
    errors = {"untrained": selection_error(routed, probe, seed=spec.seed)} if probe is not None else {}
    result, reason, facts = train_until(routed, rcfg, settings, training_batches(rcfg, tok), curve,
                                        base["curve"], untrained_curve, spec.name)
    trained = evaluate(routed, eval_data)
    if probe is not None:  # how close the trained router comes to the best k of N (notebook 01's measure)
        errors["trained"] = selection_error(routed, probe, seed=spec.seed)
        (out / "selection_error").mkdir(exist_ok=True)
        pd.concat(errors, names=["router_state"]).to_csv(out / "selection_error" / f"{spec.name}.csv")
    tokens_per_step = rcfg.batch_size * rcfg.seq_len
    _history_frame(result.history, tokens_per_step, untrained_curve).to_csv(out / "history" / f"{spec.name}.csv",
                                                                            index=False)
    _save_sample(out / "samples" / f"{spec.name}.npz", trained.sample, untrained.sample)
    rates = [r["tokens_per_s"] for r in result.history[1:] if "tokens_per_s" in r]
    record = dict(run=spec.name, **dataclasses.asdict(spec), stop_reason=reason, stop_step=facts["step"],
                  stop_tokens=facts["step"] * tokens_per_step, curve_base_ppl=base["curve"],
                  curve_untrained_ppl=untrained_curve, curve_ppl=facts["ppl"], curve_recovery=facts["recovery"],
                  curve_change=facts["change"], routed_layers=sorted(trained.sample.selections),
                  ppl_base=base["full"], ppl_untrained=untrained.perplexity, ppl_trained=trained.perplexity,
                  **{f"recovery_{scale}": recovery(trained.perplexity["overall"], base["full"]["overall"],
                                                   untrained.perplexity["overall"], scale) for scale in RECOVERY_SCALES},
                  train_tokens_per_s=float(np.median(rates)) if rates else float("nan"))
    write_record(out, spec.name, record)
    print(f"{spec.name}: {reason} at step {facts['step']} ({record['stop_tokens']:,} tokens), held-out perplexity "
          f"{untrained.perplexity['overall']:.2f} -> {trained.perplexity['overall']:.2f} (base "
          f"{base['full']['overall']:.2f}; recovery of the gap {record['recovery_log']:.2f} in loss, "
          f"{record['recovery_linear']:.2f} in perplexity)", flush=True)
    return record, routed


# ------------------------------------------------------------------------------- measurement
def _xlogx(counts: np.ndarray) -> np.ndarray:
    """x log x elementwise for non-negative integer counts (0 log 0 = 0), through a lookup table."""
    table = np.zeros(int(counts.max()) + 1 if counts.size else 1)
    table[1:] = np.arange(1, table.size) * np.log(np.arange(1, table.size))
    return table[counts]


def bootstrap_mean_purity(tokens: np.ndarray, seq_ids: np.ndarray, indices: np.ndarray, draws: np.ndarray,
                          num_pathways: int, vocab_size: int, chunk: int = 100) -> np.ndarray:
    """Load-weighted mean purity (:attr:`routelib.metrics.PathwayMetrics.mean_purity`) of one router's
    choices ``indices`` (n, k) on ``tokens`` (n,) for every row of ``draws`` (B, S): how many times each
    of the S held-out windows (``seq_ids`` (n,) in 0..S-1) is taken in a bootstrap resample. A row of
    ones gives the plain estimate. Returns (B,)."""
    import scipy.sparse as sp

    tok, idx = metrics.check_selections(tokens, indices, num_pathways, vocab_size)
    uniq, inv = np.unique(tok, return_inverse=True)
    u, k = len(uniq), idx.shape[1]
    cells = (idx * u + inv[:, None]).reshape(-1)  # (n*k,) pathway-major (pathway, token) cell
    win = np.repeat(np.asarray(seq_ids, dtype=np.int64), k)  # (n*k,)
    per_window = sp.csr_matrix((np.ones(cells.size, dtype=np.int64), (win, cells)),
                               shape=(draws.shape[1], num_pathways * u))  # (S, N*U) counts
    out = []
    for start in range(0, draws.shape[0], chunk):
        d = np.asarray(draws[start:start + chunk], dtype=np.int64)  # (b, S)
        counts = np.asarray((per_window.T @ d.T).T).reshape(len(d), num_pathways, u)  # (b, N, U)
        sel = counts.sum(-1)  # (b, N)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = np.log(sel) - _xlogx(counts).sum(-1) / sel  # (b, N) entropy in nats
            pur = np.where(sel > 0, 1.0 - h / math.log(vocab_size), 0.0)  # (b, N)
        out.append((sel * pur).sum(-1) / np.maximum(sel.sum(-1), 1))  # load-weighted mean over pathways
    return np.concatenate(out)


def purity_intervals(sample: RoutingSample, routers: dict[str, dict[int, np.ndarray]], num_pathways: int,
                     vocab_size: int, *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                     by_domain: bool = True, trained: str = "fine-tuned") -> pd.DataFrame:
    """Purity of each router with bootstrap intervals over held-out windows (the windows of the sample
    resampled with replacement; per domain, that domain's windows). The intervals are percentile intervals
    shifted by the bootstrap estimate of bias (mean of the resamples minus the estimate; Efron &
    Tibshirani 1993, section 10.2), reported as ``<stat>_bias``: plug-in purity is biased upward on a
    resample (repeated windows -> fewer distinct tokens), which would put a plain percentile interval
    above the estimate. One row per (router, layer,
    domain) -- layer "all" is the mean over routed layers, domain "all" every position: ``purity`` (the
    load-weighted mean purity, 1 - H/log V), ``excess`` (purity minus that of the same router's choices
    permuted across positions: the token association beyond the load pattern) and ``trained_minus``
    (the ``trained`` router's purity minus this one's, paired on the same resamples), each with
    ``_low``/``_high``."""
    if resamples < 1 or not 0 < confidence < 1:
        raise ConfigError(f"purity_intervals: need resamples >= 1 and 0 < confidence < 1, got {resamples}, {confidence}")
    if trained not in routers:
        raise ConfigError(f"purity_intervals: no router {trained!r} among {list(routers)}")
    tail = 100 * (1 - confidence) / 2
    scopes = [("all", np.ones(len(sample), dtype=bool))]
    if by_domain:
        scopes += [(d, sample.domains == d) for d in dict.fromkeys(sample.domains.tolist())]
    rows = []
    for domain, mask in scopes:
        seqs, seq_local = np.unique(sample.seq_ids[mask], return_inverse=True)
        rng = np.random.default_rng([seed, len(rows)])
        draws = np.vstack([np.ones(len(seqs), dtype=np.int64),
                           rng.multinomial(len(seqs), np.full(len(seqs), 1 / len(seqs)), size=resamples)])  # (1+B, S)
        values = {}  # (router, layer) -> (purity (1+B,), excess (1+B,))
        for name, sel in routers.items():
            for j, (layer, idx) in enumerate(sorted(sel.items())):
                shuffled = metrics.permuted_routing(idx, seed=seed + j)
                own, perm = (bootstrap_mean_purity(sample.tokens[mask], seq_local, s[mask], draws, num_pathways, vocab_size)
                             for s in (idx, shuffled))
                values[name, layer] = (own, own - perm)
        for name in routers:
            layers = sorted(routers[name])
            per_layer = {layer: values[name, layer] for layer in layers}
            per_layer["all"] = tuple(np.mean([values[name, la][i] for la in layers], axis=0) for i in (0, 1))
            for layer, (pur, exc) in per_layer.items():
                ref = (values[trained, layer][0] if layer != "all" else
                       np.mean([values[trained, la][0] for la in layers], axis=0))
                row = {"router": name, "layer": str(layer), "domain": domain, "windows": len(seqs)}
                for stat, v in (("purity", pur), ("excess", exc), ("trained_minus", ref - pur)):
                    bias = v[1:].mean() - v[0]  # the bootstrap estimate of the plug-in bias
                    low, high = np.percentile(v[1:], [tail, 100 - tail]) - bias
                    row.update({stat: float(v[0]), f"{stat}_low": float(low), f"{stat}_high": float(high),
                                f"{stat}_bias": float(bias)})
                rows.append(row)
    return pd.DataFrame(rows)


def pathway_table(sample: RoutingSample, num_pathways: int, vocab_size: int, decode, top_n: int = 8,
                  seed: int = 0) -> pd.DataFrame:
    """Every (layer, pathway) of the sample's router: load, selections, purity, the purity of the same
    pathway under the permuted control and the excess, ``rank`` (1 = purest of its layer) and the
    ``top_n`` most frequent tokens (``decode(id) -> str``) with their counts."""
    rows = []
    for j, (layer, idx) in enumerate(sorted(sample.selections.items())):
        m = metrics.pathway_metrics(sample.tokens, idx, num_pathways, vocab_size, top_n=top_n)
        perm = metrics.pathway_metrics(sample.tokens, metrics.permuted_routing(idx, seed=seed + j), num_pathways,
                                       vocab_size, top_n=0)
        order = np.argsort(-np.nan_to_num(m.purity, nan=-1.0), kind="stable")
        rank = np.empty(num_pathways, dtype=np.int64)
        rank[order] = np.arange(1, num_pathways + 1)
        for p in range(num_pathways):
            rows.append({"layer": layer, "pathway": p, "rank": int(rank[p]), "load": float(m.load[p]),
                         "selections": int(m.selections[p]), "purity": float(m.purity[p]),
                         "purity_permuted": float(perm.purity[p]), "excess": float(m.purity[p] - perm.purity[p]),
                         "top_tokens": " ".join(f"{decode(t)!r}:{c}" for t, c in m.top_tokens[p])})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ the run
def base_perplexity(cfg: PathwayStudyConfig, curve: dict[str, list], eval_data: dict[str, list]) -> dict:
    """The un-routed model's held-out perplexity: {"curve": overall on the curve set, "full": per domain}."""
    model, _ = load_base(cfg)
    return {"curve": evaluate(model, curve).perplexity["overall"], "full": evaluate(model, eval_data).perplexity}


def reference_data(cfg: PathwayStudyConfig, settings: ReferenceSettings, tokenizer) -> tuple[dict, dict]:
    """(curve, eval_data): held-out batches per domain for the training curve (``curve_windows``
    windows per domain) and for the final evaluation (``eval_windows``)."""
    curve = domain_eval_data(dataclasses.replace(cfg, eval_windows=settings.curve_windows), tokenizer)
    return curve, domain_eval_data(cfg, tokenizer)


def reference_run(cfg: PathwayStudyConfig, settings: ReferenceSettings, out_dir: str | Path = REFERENCE_DIR, *,
                  part: tuple[int, int] | None = None, only_runs: tuple[str, ...] = (),
                  command: str | None = None) -> dict | None:
    """Train the reference runs not yet finished and, unless ``part`` (this process's share,
    :func:`routelib.reference.split_parts`) or ``only_runs`` restricts the invocation, measure and write
    the manifest (returned; None for a restricted invocation)."""
    specs = reference_plan(cfg, settings)
    unknown = set(only_runs) - {s.name for s in specs}
    if unknown:
        raise ConfigError(f"only_runs: {', '.join(sorted(unknown))} not in the plan; runs: "
                          + ", ".join(s.name for s in specs))
    out = paths.in_repo(out_dir)
    for sub in ("history", "samples"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    log = InvocationLog(out, command)
    _, tok = load_base(cfg)
    curve, eval_data = reference_data(cfg, settings, tok)
    mine = split_parts(specs, part, cost=lambda s: 1.0) if part else [s for s in specs if s.name in only_runs] \
        if only_runs else specs
    todo = [s for s in mine if s.name not in load_records(out)]
    base = base_perplexity(cfg, curve, eval_data) if todo else None
    for spec in todo:
        train_and_record(spec, cfg, settings, out, curve, eval_data, base)
    if part or only_runs:
        log.finish()
        return None
    return _measure(cfg, settings, out, specs, eval_data, tok, log)


def _measure(cfg: PathwayStudyConfig, settings: ReferenceSettings, out: Path, specs: list[RunSpec],
             eval_data: dict[str, list], tokenizer, log: InvocationLog) -> dict:
    """The final invocation's measurements and files, then the manifest."""
    finals = load_records(out)
    runs = pd.DataFrame([finals[s.name] for s in specs]).set_index("run")
    flat = runs.drop(columns=["ppl_base", "ppl_untrained", "ppl_trained", "routed_layers"])
    for which in ("base", "untrained", "trained"):
        flat = flat.join(pd.DataFrame({n: finals[n][f"ppl_{which}"] for n in runs.index}).T.add_prefix(f"ppl_{which}_"))
    flat.to_csv(out / "runs.csv")
    model, _ = load_base(cfg)
    layers = cfg.layers(len(decoder_layers(model)))
    x, _ = probe_batch(eval_data, cfg.probe_windows)
    groupings = tuple(dict.fromkeys([cfg.grouping, settings.other_grouping or cfg.grouping]))
    grouping_error(model, cfg, x, tokenizer, groupings).to_csv(out / "grouping_error.csv")
    vocab, decode = model.config.vocab_size, (lambda t: tokenizer.decode([t]))
    frames = []
    for i, spec in enumerate(specs):
        trained, untrained = (load_sample(out / "samples" / f"{spec.name}.npz", r) for r in ("trained", "untrained"))
        routers = control_selections(trained, untrained, cfg.num_pathways, seed=spec.seed)
        frames.append(purity_intervals(trained, routers, cfg.num_pathways, vocab, resamples=settings.bootstrap,
                                       confidence=settings.confidence, seed=spec.seed, by_domain=i == 0)
                      .assign(run=spec.name))
        if i == 0:  # the first main run: every pathway with its top tokens (most / least pure by rank)
            table = pathway_table(trained, cfg.num_pathways, vocab, decode, cfg.top_tokens, seed=spec.seed)
            table.to_csv(out / f"pathways_{spec.name}.csv", index=False)
    pd.concat(frames, ignore_index=True).to_csv(out / "purity.csv", index=False)
    main = [s.name for s in specs if s.arm == "glbl" and s.grouping == cfg.grouping]
    summary = dict(main_runs=main, routed_layers=layers, tokens_per_step=cfg.batch_size * cfg.seq_len, vocab_size=vocab,
                   base_ppl=finals[main[0]]["ppl_base"]["overall"],
                   stop={n: {k: finals[n][k] for k in ("stop_reason", "stop_step", "stop_tokens", "curve_recovery",
                                                       "recovery_log", "recovery_linear")} for n in runs.index},
                   eval=f"validation split, {cfg.eval_windows} windows of {cfg.seq_len} tokens per domain "
                        f"({', '.join(cfg.domain_list())}); training curve on {settings.curve_windows} per domain")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    invocations = InvocationLog.summary(log.finish())
    params = dict(study_config=dataclasses.asdict(cfg), settings=dataclasses.asdict(settings))
    return write_manifest(out, command=log.command, params=params, wall_s=invocations.pop("wall_s"),
                          extra={**log.code, **invocations})


# ----------------------------------------------------------------------------------- reading it
def load_reference_if_made(out_dir: str | Path = REFERENCE_DIR) -> dict | None:
    """:func:`load_reference`, or None while the reference run has not been made (no manifest yet)."""
    return load_if_made(load_reference, out_dir)


def load_reference(out_dir: str | Path = REFERENCE_DIR) -> dict:
    """The reference run (every file checked against the manifest's sha256): manifest, configuration
    (``cfg``, ``settings``), summary, runs, histories, purity intervals, grouping error, the pathway table
    of the first main run, each run's selection error before and after training, ``sample(run, router)``
    loading a run's held-out routing and ``orders(run)`` its neuron grouping ({} for contiguous)."""
    out = paths.in_repo(out_dir)
    manifest = load_manifest(out)
    params = manifest["params"]
    summary = json.loads((out / "summary.json").read_text())
    return dict(
        manifest=manifest, summary=summary, cfg=from_params(PathwayStudyConfig, params["study_config"]),
        settings=from_params(ReferenceSettings, params["settings"]), runs=pd.read_csv(out / "runs.csv", index_col="run"),
        histories={p.stem: pd.read_csv(p) for p in sorted((out / "history").glob("*.csv"))},
        purity=pd.read_csv(out / "purity.csv", dtype={"layer": str}),
        grouping_error=pd.read_csv(out / "grouping_error.csv", header=[0, 1], index_col=0),
        pathways=pd.read_csv(out / f"pathways_{summary['main_runs'][0]}.csv"),
        sample=lambda run, router="trained": load_sample(out / "samples" / f"{run}.npz", router),
        orders=lambda run: load_orders(out / "groupings" / f"{run}.npz") if (out / "groupings" / f"{run}.npz").is_file() else {},
        selection_error={p.stem: pd.read_csv(p, index_col=["router_state", "layer"])
                         for p in sorted((out / "selection_error").glob("*.csv"))},
    )


def reference_routers(ref: dict, run: str | None = None) -> tuple[RoutingSample, dict[str, dict[int, metrics.PathwayMetrics]]]:
    """A reference run's held-out routing (default: the first main run) and :func:`router_metrics` of its
    trained router and the controls (:data:`ROUTERS`): what :func:`summary_table`, :func:`pathway_purities`,
    :func:`specialised_pathways` and the pathway explorer take."""
    run = run or ref["summary"]["main_runs"][0]
    cfg, seed = ref["cfg"], int(ref["runs"].loc[run, "seed"])
    trained, untrained = ref["sample"](run), ref["sample"](run, "untrained")
    routers = control_selections(trained, untrained, cfg.num_pathways, seed=seed)
    vocab = int(ref["summary"]["vocab_size"])
    return trained, router_metrics(trained, routers, cfg.num_pathways, vocab, cfg.min_load, cfg.top_tokens)


def recovery_curves(ref: dict) -> pd.DataFrame:
    """Held-out perplexity against training tokens for every run (long: run, arm, grouping, seed, step,
    tokens, ppl, recovery_log, recovery_linear), from step 0 (untrained routing), each run's recovery
    measured against its own untrained and the base perplexity on the curve windows."""
    frames = []
    for run, row in ref["runs"].iterrows():
        h = ref["histories"][run][["step", "tokens", "eval_ppl"]].dropna().rename(columns={"eval_ppl": "ppl"})
        for scale in RECOVERY_SCALES:
            h[f"recovery_{scale}"] = [recovery(p, row["curve_base_ppl"], row["curve_untrained_ppl"], scale) for p in h["ppl"]]
        frames.append(h.assign(run=run, arm=row["arm"], grouping=row["grouping"], seed=row["seed"]))
    cols = ["run", "arm", "grouping", "seed", "step", "tokens", "ppl", "recovery_log", "recovery_linear"]
    return pd.concat(frames, ignore_index=True)[cols]


def reference_header(ref: dict | None) -> str:
    """What the reference run was (command, commit, machine, wall time, shape, stop rule), or for ``None``
    the one line saying it has not been made and the command that makes it."""
    if ref is None:
        return f"reference run not yet made: {REFERENCE_LAUNCH}"
    man, cfg, s, st = ref["manifest"], ref["cfg"], ref["summary"], ref["settings"]
    env = man["environment"]
    layers = s["routed_layers"]
    return "\n".join([
        f"command: {man['command']}",
        f"commit {str(man['commit'])[:10]}; {env['device']}, torch {env['torch']}, {env['torch_threads']} thread(s); "
        f"{man['wall_s'] / 60:.0f} min of process wall time over {man['invocations']} invocations",
        f"{cfg.model_name}: {len(layers)} routed layers ({layers[0]}..{layers[-1]}, every {cfg.route_every_n_layers}), "
        f"top-{cfg.top_k_pathways} of {cfg.num_pathways} pathways, {cfg.train_scope} fine-tuned at lr {cfg.lr:g}, "
        f"{s['tokens_per_step']:,} tokens per step, cap {cfg.steps} steps",
        f"stop rule: recovery >= {st.recover_target:g} of the gap untrained routing -> base ({st.recovery_scale} scale), "
        f"or < {st.plateau_tol:.0%} change over the last {st.plateau_fraction:.0%} of steps (from step {st.min_steps}), "
        f"checked every {st.eval_every} steps",
        f"evaluation: {s['eval']}; purity intervals: {st.bootstrap} bootstrap resamples of held-out windows, "
        f"{st.confidence:.0%}",
    ])


def runs_table(ref: dict) -> pd.DataFrame:
    """One row per run: arm, grouping, seed, why and when it stopped (steps, training tokens), held-out
    perplexity (full evaluation set) of the base model, the untrained and the trained routing, and the
    share of the gap closed in loss and in perplexity."""
    r = ref["runs"]
    return pd.DataFrame({
        "arm": r["arm"], "grouping": r["grouping"], "seed": r["seed"], "stop": r["stop_reason"],
        "steps": r["stop_step"], "tokens": r["stop_tokens"], "ppl_base": r["ppl_base_overall"],
        "ppl_untrained": r["ppl_untrained_overall"], "ppl_trained": r["ppl_trained_overall"],
        "recovery_loss": r["recovery_log"], "recovery_ppl": r["recovery_linear"]})


def _interval(row, stat: str) -> str:
    return f"{row[stat]:.4f} [{row[f'{stat}_low']:.4f}, {row[f'{stat}_high']:.4f}]"


def interval_table(purity: pd.DataFrame, layer: str = "all", domain: str = "all") -> pd.DataFrame:
    """Rows of :func:`purity_intervals` (one run's, or a reference run's with its ``run`` column) at one
    ``layer`` ("all": mean over routed layers) and ``domain`` ("all": every held-out position), each
    statistic as ``value [low, high]`` (95 % bootstrap over held-out windows): ``purity``, ``excess``
    over the router's own permuted choices, and ``trained_minus`` (the trained router's purity minus
    this router's, paired on the same resamples). Indexed by (run, router), or router alone."""
    rows = purity[(purity["layer"] == str(layer)) & (purity["domain"] == domain)]
    if rows.empty:
        raise ConfigError(f"no purity rows for layer={str(layer)!r}, domain={domain!r}")
    keys = [k for k in ("run", "router") if k in rows.columns]
    return pd.DataFrame([{**{k: r[k] for k in keys}, **{s: _interval(r, s) for s in ("purity", "excess", "trained_minus")}}
                         for _, r in rows.iterrows()]).set_index(keys)


def purity_summary(ref: dict, layer: str = "all", domain: str = "all") -> pd.DataFrame:
    """:func:`interval_table` of every run of the reference run ``ref``: its trained routers and controls."""
    return interval_table(ref["purity"], layer, domain)


def selection_error_summary(ref: dict) -> pd.DataFrame:
    """Relative output error of the routed MLPs (mean over routed layers, :func:`selection_error`) per run,
    before and after training: the router's k of N, a random k of N and the best k of N."""
    frames = {run: e.groupby(level="router_state").mean() for run, e in ref["selection_error"].items()}
    return pd.concat(frames, names=["run"]).reindex(columns=["router", "random", "best_k"])


_TOP_TOKEN = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"):(\d+)""")  # repr(token):count


def first_top_token(top_tokens: str) -> tuple[str, int]:
    """The most frequent token of a :func:`pathway_table` ``top_tokens`` cell ("'.':120 ' of':17 ...",
    tokens as Python reprs, which may hold spaces, colons and quotes) and its count."""
    m = _TOP_TOKEN.match(top_tokens)
    if m is None:
        raise ConfigError(f"top_tokens {top_tokens[:40]!r}: expected repr(token):count")
    return m.group(1), int(m.group(2))


def reference_numbers(ref: dict) -> dict:
    """The facts the verdict rests on, from the run's files: per run how it stopped; for the main runs
    (layer "all", domain "all") the trained router's purity and the controls', and whether the paired
    interval of trained minus each control excludes 0; in how many (layer, run) and (domain, run) cells
    it does against the untrained router; the purest pathway of the first main run."""
    s, p = ref["summary"], ref["purity"]
    main = s["main_runs"]
    controls = [r for r in dict.fromkeys(p["router"]) if r != "fine-tuned"]
    overall = p[(p["layer"] == "all") & (p["domain"] == "all")].set_index(["run", "router"])
    above = {c: all(overall.loc[(r, c), "trained_minus_low"] > 0 for r in main) for c in controls}
    below = {c: all(overall.loc[(r, c), "trained_minus_high"] < 0 for r in main) for c in controls}
    overlap = {c: all(overall.loc[(r, c), "purity_high"] >= overall.loc[(r, "fine-tuned"), "purity_low"] for r in main)
               for c in controls}
    cells = {}
    for scope, mask in (("layer", (p["layer"] != "all") & (p["domain"] == "all")),
                        ("domain", (p["layer"] == "all") & (p["domain"] != "all"))):
        unt = p[mask & (p["router"] == "untrained") & p["run"].isin(main)]
        cells[scope] = (int((unt["trained_minus_low"] > 0).sum()), len(unt))
    trained = {r: tuple(float(overall.loc[(r, "fine-tuned"), f"{stat}{x}"]) for stat in ("purity", "excess")
                        for x in ("", "_low", "_high")) for r in dict.fromkeys(p["run"])}  # (purity, low, high, excess, ...)
    table = ref["pathways"]
    purest = table.loc[table["purity"].idxmax()]
    top_token, top_count = first_top_token(purest["top_tokens"])
    return dict(
        main_runs=main, stop=s["stop"], routed_layers=len(s["routed_layers"]), controls=controls,
        purity={c: float(np.mean([overall.loc[(r, c), "purity"] for r in main])) for c in ["fine-tuned", *controls]},
        excess={c: float(np.mean([overall.loc[(r, c), "excess"] for r in main])) for c in ["fine-tuned", *controls]},
        gain={c: {r: tuple(float(overall.loc[(r, c), f"trained_minus{x}"]) for x in ("", "_low", "_high")) for r in main}
              for c in controls},
        trained=trained,
        above=above, below=below, overlap=overlap, cells=cells,
        arms_overlap=bool(max(t[1] for t in trained.values()) <= min(t[2] for t in trained.values())),
        purest=dict(layer=int(purest["layer"]), pathway=int(purest["pathway"]), purity=float(purest["purity"]),
                    token=top_token, token_share=top_count / int(purest["selections"])),
        pathway_purity=(float(table["purity"].min()), float(table["purity"].median()), float(table["purity"].max())),
        max_token_share=float(max(first_top_token(t)[1] / n for t, n in zip(table["top_tokens"], table["selections"])
                                  if n > 0)),
    )


def reference_verdict(ref: dict) -> str:
    """The verdict of the reference run in a few Markdown sentences, every number from its files."""
    v = reference_numbers(ref)
    runs = ref["runs"]
    stops = "; ".join(f"{run}: {st['stop_reason']} at {st['stop_tokens']:,} tokens, perplexity "
                      f"{runs.loc[run, 'ppl_untrained_overall']:.0f} -> {runs.loc[run, 'ppl_trained_overall']:.1f} (gap "
                      f"closed {st['recovery_log']:.0%} in loss, {st['recovery_linear']:.0%} in perplexity)"
                      for run, st in v["stop"].items())
    trained = v["purity"]["fine-tuned"]
    if all(v["above"].values()):
        outcome = "**more token-specific than every control**, by intervals that exclude them"
    elif any(v["below"].values()):
        outcome = "**less token-specific than a control**"
    else:
        outcome = "**not distinguishable from the controls**: some intervals include them"
    gains = "; ".join(f"{c} " + " and ".join(f"{g:+.4f} [{lo:+.4f}, {hi:+.4f}]" for g, lo, hi in per_run.values())
                      for c, per_run in v["gain"].items())
    arms = "; ".join(f"{run} {t[0]:.4f} [{t[1]:.4f}, {t[2]:.4f}], excess {t[3]:.4f} [{t[4]:.4f}, {t[5]:.4f}]"
                     for run, t in v["trained"].items())
    gain_untrained = float(np.mean([g for g, _, _ in v["gain"]["untrained"].values()]))
    overl = [c for c, o in v["overlap"].items() if o]
    (nl, tl), (nd, td) = v["cells"]["layer"], v["cells"]["domain"]
    pu = v["purest"]
    lo, med, hi = v["pathway_purity"]
    return "\n\n".join([
        f"Training ({v['routed_layers']} routed layers; base model perplexity {ref['summary']['base_ppl']:.1f}): {stops}.",
        f"Trained routers of the main arm ({', '.join(v['main_runs'])}) are {outcome}: mean purity {trained:.4f} against "
        + ", ".join(f"{c} {v['purity'][c]:.4f}" for c in v["controls"])
        + f" (mean over the main runs). Trained minus control, paired on the same bootstrap resamples (95 %, one "
          f"interval per main run): {gains}.",
        (f"The separate intervals of purity overlap for the {', '.join(overl)} control{'s' if len(overl) > 1 else ''}: "
         "only the paired difference resolves it. " if overl else "")
        + f"Against the untrained router the paired interval excludes 0 in {nl} of {tl} (layer, main run) cells and "
          f"{nd} of {td} domains (first main run). Excess over the router's own permuted choices: trained "
          f"{v['excess']['fine-tuned']:.4f}, untrained {v['excess']['untrained']:.4f}.",
        f"Every run's trained router, purity and excess with intervals: {arms}; "
        + ("these intervals all overlap: neither the balance loss (GLBL or Switch) nor the grouping moves purity "
           "measurably." if v["arms_overlap"] else "not all of these intervals overlap (see the table)."),
        f"**The size says no to \"monosemantic\"**: the gain over the untrained router is {gain_untrained:.4f} "
        f"of purity ({gain_untrained / (1 - v['purity']['untrained']):.1%} of the way to a one-token pathway). "
        f"Per-pathway purity spans {lo:.2f}-{hi:.2f} (median {med:.2f}); the purest pathway (layer {pu['layer']}, "
        f"pathway {pu['pathway']}, purity {pu['purity']:.3f}) gives its most frequent token {pu['token']} "
        f"{pu['token_share']:.0%} of its selections, and no pathway gives any token more than "
        f"{v['max_token_share']:.0%} of its selections.",
    ])


def reproduce_first_steps(ref: dict, run: str, out_dir: str | Path) -> tuple[dict, dict]:
    """Re-train the first ``log_every`` steps of reference run ``run`` from the manifest's configuration
    on the manifest's number of torch threads, checkpoints under ``out_dir``. Returns the first history
    record of this re-run and the recorded one (equal on CPU, where training is deterministic)."""
    row = ref["runs"].loc[run]
    spec = RunSpec(str(row["arm"]), str(row["grouping"]), int(row["seed"]))
    settings = ref["settings"]
    cfg = run_config(dataclasses.replace(ref["cfg"], out_dir=str(out_dir), device="cpu"), spec)
    with torch_threads(ref["manifest"]["environment"]["torch_threads"]):
        model, tok = load_base(cfg)
        routed = build_routed(model, cfg, tokenizer=tok)  # the grouping recomputed, not read back
        stored = ref["orders"](run)
        if stored and any(not torch.equal(stored[i], o) for i, o in routed.neuron_orders.items()):
            raise ReferenceError(f"{run}: the recomputed {cfg.grouping} grouping differs from the stored one")
        result = fine_tune(routed, cfg, training_batches(cfg, tok), name=spec.name, stop_step=settings.log_every,
                           eval_every=settings.eval_every, log_every=settings.log_every)
    recorded = ref["histories"][run]
    return result.history[0], recorded[recorded["step"] > 0].iloc[0].to_dict()


# -------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``python -m routelib.studies.pathways reference [--out DIR] [--part i/n | --only_runs a,b] [--threads N]
    [--<field> value ...]``: notebook 01's reference run (:func:`reference_run`). Every field of
    PathwayStudyConfig (defaults: REFERENCE_DEFAULTS) and of ReferenceSettings is an option; lists are
    comma-separated. Side by side: one process per ``--part i/n``, then one without ``--part`` to measure."""
    return reference_main(argv, prog="python -m routelib.studies.pathways", description=main.__doc__, out=REFERENCE_DIR,
                          config=PathwayStudyConfig, settings=ReferenceSettings, run=reference_run,
                          defaults=REFERENCE_DEFAULTS,
                          report=lambda manifest, out: print(f"reference run written to {out} ({len(manifest['files'])} files)"))
