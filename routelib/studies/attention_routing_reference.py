"""Notebook 02's reference run (DESIGN.md §7): static vs dynamic GDN/softmax routing at a scale where the
models have learned something, on the CPU, its small result files committed under
``data/reference/02_dynamic_attention_routing/`` beside a manifest.

The runs (:func:`reference_plan`; models, training and measurements from
:mod:`routelib.studies.attention_routing`; the arms of one seed see the same batches):

1. ``lr_sweep``: both arms, first seed, ``sweep_steps`` steps, at every rate of ``lr_same``; the
   **shared rate** is the one with the lowest mean validation loss over both arms (:func:`sweep_table`);
2. ``shared``: both arms at the shared rate for every seed of ``seeds`` (the comparison);
3. ``seed_lrs``: static at ``lr_static``, dynamic at ``lr_dynamic`` (the seed's unequal rates), first seed;
4. ``alpha``: the dynamic arm at the shared rate at every alpha of ``alpha_sweep``, first seed,
   ``alpha_sweep_steps`` steps (0 = ``steps``).

A run two groups share is trained once. Every run checkpoints and resumes (``routelib.train``); its
history and final per-domain validation loss are written as soon as it finishes (``history/``,
``final/``), so several processes can train disjoint parts side by side (``part=(i, n)``), a part
waiting for the sweep before it starts its share of the rest. The invocation without a part trains
whatever is missing, measures (unigram reference, the dynamic - static difference with a 95 % t-interval
over seeds, training and prefill throughput interleaved in one run, routing by domain, token type and
position), and writes the manifest last. ``python -m routelib.studies.attention_routing_reference
--help`` lists the options; :data:`REFERENCE_DEFAULTS` is the configuration it runs by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats
import torch

from routelib import cli, paths
from routelib.bench import compare
from routelib.config import from_params
from routelib.data import load_tokenizer
from routelib.errors import ConfigError
from routelib.evaluation import domain_eval_data, perplexity_by_domain, train_tokens_per_s
from routelib.io import atomic_write_bytes
from routelib.models.hybrid import HybridLM
from routelib.reference import InvocationLog, load_manifest, write_manifest
from routelib.studies.attention_routing import (ARMS, HybridStudyConfig, RunSpec, inference_speed, route_tokens,
                                                routing_loss, softmax_share, train_run, training_batches, unigram_loss)
from routelib.train import TrainConfig, make_optimizer

REFERENCE_DIR = "data/reference/02_dynamic_attention_routing"  # committed results (DESIGN.md §7)
GROUPS = ("lr_sweep", "shared", "seed_lrs", "alpha")  # run groups, in training order

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
    sweep_steps: int = 175  # training steps of every LR-sweep run (the shared rate is picked from them)
    log_every: int = 10  # a training-history record (window means) every this many steps
    curve_batches: int = 1  # held-out batches (8 windows) per domain on the loss curve during training
    prefill_seq_lens: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])  # batch-1 prefill sweep
    speed_rounds: int = 3  # round-robin rounds of every timing (training step, prefill)
    position_bins: int = 8  # position buckets of the routing breakdown
    wait_s: float = 4 * 3600.0  # a part waits this long for the other parts' sweep runs, then stops (rerun resumes)

    def __post_init__(self):
        for name in ("sweep_steps", "log_every", "curve_batches", "speed_rounds", "position_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: need >= 1")
        if not self.prefill_seq_lens or min(self.prefill_seq_lens) < 1:
            raise ConfigError(f"prefill_seq_lens={self.prefill_seq_lens!r}: need positive lengths")
        if self.wait_s < 0:
            raise ConfigError(f"wait_s={self.wait_s!r}: need >= 0")


# ------------------------------------------------------------------------------------------- plan
def reference_plan(cfg: HybridStudyConfig, settings: ReferenceSettings, shared_lr: float | None = None) -> dict[str, list[RunSpec]]:
    """The runs of every group (see the module docstring); only ``lr_sweep`` until the shared rate is known."""
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


def split_runs(specs: list[RunSpec], part: tuple[int, int]) -> list[RunSpec]:
    """Part ``i`` of ``n`` (1-based) of ``specs``: runs dealt longest first to the part with the fewest
    steps so far (ties: the lower part), so the parts take about equal time; every run in one part."""
    i, n = part
    load, mine = [0] * n, []
    for spec in sorted(specs, key=lambda s: -s.steps):  # stable: plan order among equal lengths
        k = load.index(min(load))
        load[k] += spec.steps
        if k == i - 1:
            mine.append(spec)
    return [s for s in specs if s in mine]


# ------------------------------------------------------------------------------ results on disk
def load_finals(out: Path) -> dict[str, dict]:
    """Every finished run's final record (``final/<run>.json``), by run name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "final").glob("*.json"))}


def _history_frame(result, tokens_per_step: int) -> pd.DataFrame:
    """The run's history with the tokens seen at each record."""
    df = pd.DataFrame(result.history)
    df.insert(1, "tokens", df["step"] * tokens_per_step)
    return df


def _train_and_record(spec: RunSpec, cfg: HybridStudyConfig, settings: ReferenceSettings, out: Path,
                      curve: list, eval_data: dict[str, list]) -> dict:
    """Train (or resume) one run, then write its history and its final record: per-domain validation
    loss (nats/token, argmax routing), training tokens/s, steps and tokens."""
    model, result = train_run(spec, cfg, curve, log_every=settings.log_every)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    _history_frame(result, tokens_per_step).to_csv(out / "history" / f"{spec.name}.csv", index=False)
    ppl = perplexity_by_domain(model, eval_data)
    record = dict(run=spec.name, **dataclasses.asdict(spec), tokens=spec.steps * tokens_per_step,
                  train_tokens_per_s=train_tokens_per_s(result), params_M=model.num_parameters() / 1e6,
                  val_loss=math.log(ppl.pop("overall")), **{f"val_loss_{d}": math.log(v) for d, v in ppl.items()})
    atomic_write_bytes(out / "final" / f"{spec.name}.json", (json.dumps(record, indent=1) + "\n").encode())
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


def _await_sweep(cfg: HybridStudyConfig, settings: ReferenceSettings, out: Path, poll_s: float = 20.0) -> pd.DataFrame | None:
    """The sweep table once every sweep run has finished (other parts train theirs), polling for up to
    ``settings.wait_s`` seconds; None if they have not by then."""
    deadline = time.monotonic() + settings.wait_s
    while (table := sweep_table(cfg, settings, load_finals(out))) is None and time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    return table


# ---------------------------------------------------------------------------------- measurement
def t_interval(values, level: float = 0.95) -> dict[str, float]:
    """Mean of ``values`` with its two-sided Student-t confidence interval (n - 1 degrees of freedom):
    n, mean, std (ddof 1), half_width, low, high; the interval is NaN for fewer than two values."""
    v = np.asarray(values, dtype=float)
    n, mean = len(v), float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else float("nan")
    half = float(scipy.stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)) if n > 1 else float("nan")
    return dict(n=n, mean=mean, std=std, half_width=half, low=mean - half, high=mean + half)


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
    this process's share of every group (:func:`split_runs`), the sweep's before the rest; ``only_runs``:
    just these run names (the rest's names need the sweep finished)."""
    out = paths.in_repo(out_dir)
    for sub in ("history", "final"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    log = InvocationLog(out, command)
    eval_data = domain_eval_data(cfg)
    curve = [b for batches in eval_data.values() for b in batches[: settings.curve_batches]]

    def train_share(specs: list[RunSpec]) -> None:
        done = load_finals(out)
        mine = split_runs(specs, part) if part else [s for s in specs if s.name in only_runs] if only_runs else specs
        for spec in mine:
            if spec.name not in done:
                _train_and_record(spec, cfg, settings, out, curve, eval_data)

    sweep_specs = reference_plan(cfg, settings)["lr_sweep"]
    train_share(sweep_specs)
    sweep = _await_sweep(cfg, settings, out) if part else sweep_table(cfg, settings, load_finals(out))
    if sweep is None:  # a part or only_runs invocation while other invocations' sweep runs are unfinished
        missing = [s.name for s in sweep_specs if s.name not in load_finals(out)]
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
    finals = load_finals(out)
    groups = {s.name: ";".join(g for g in GROUPS if s in plan[g]) for s in unique_runs(plan)}
    runs = pd.DataFrame([{**finals[name], "groups": g} for name, g in groups.items()]).set_index("run")
    runs.to_csv(out / "runs.csv")
    sweep.to_csv(out / "lr_sweep.csv")
    shared_lr = float(sweep.index[sweep["chosen"]][0])
    deltas = delta_table(runs, shared_lr, cfg.seeds)
    deltas.to_csv(out / "delta.csv")
    def trained(spec: RunSpec) -> HybridLM:  # a finished checkpoint is loaded, not retrained
        return train_run(spec, cfg, log_every=settings.log_every)[0]

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
def reference_made(out_dir: str | Path = REFERENCE_DIR) -> bool:
    """Whether ``out_dir`` holds a finished reference run (its manifest exists)."""
    return (paths.in_repo(out_dir) / "manifest.json").is_file()


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
        _, result = train_run(spec, cfg, curve, log_every=every, stop_step=min(every, spec.steps))
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
    95 % interval of delta excludes 0, the unequal-rate gap, the routing split per alpha, and each
    run's margin below the unigram model (every run must end >= 1 nat below it)."""
    cfg, runs, summary = ref["cfg"], ref["runs"], ref["summary"]
    d = summary["delta"]
    seed_lrs = runs[runs["groups"].str.contains("seed_lrs")].set_index("arm")["val_loss"]
    share = alpha_table(ref).drop(columns="val_loss").rename(columns=lambda c: c[len("softmax_frac_"):])
    margin = summary["unigram_val_loss"] - runs["val_loss"]
    excludes = bool(d["low"] > 0 or d["high"] < 0)
    return dict(shared_lr=summary["shared_lr"], delta=d, better="dynamic" if d["mean"] < 0 else "static",
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
        f"Unigram model: {v['unigram']:.3f}; every run ends at least {v['min_margin']:.2f} nats below it "
        f"({'meets' if v['below_unigram_by_1nat'] else 'MISSES'} the 1-nat requirement).",
    ])


# -------------------------------------------------------------------------------- command line
def _part(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 1 <= i <= n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected i/n, e.g. 1/2") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= i <= n")
    return i, n


def main(argv: list[str] | None = None) -> int:
    """``python -m routelib.studies.attention_routing_reference [--out DIR] [--part i/n | --only_runs a,b]
    [--threads N] [--<field> value ...]``: notebook 02's reference run (module docstring). Every field of
    HybridStudyConfig (defaults: REFERENCE_DEFAULTS) and of ReferenceSettings is an option; lists are
    comma-separated. Side by side: one process per ``--part i/n``, then one without to measure."""
    parser = cli.ArgumentParser(prog="python -m routelib.studies.attention_routing_reference", description=main.__doc__)
    parser.add_argument("--out", default=REFERENCE_DIR, help=f"results folder (default {REFERENCE_DIR})")
    parser.add_argument("--part", type=_part, default=None, help="train only part i of n of every group, e.g. 1/2")
    parser.add_argument("--only_runs", default="", help="train only these runs (comma list of run names)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    cli.add_dataclass_options(parser, HybridStudyConfig, skip=("num_threads",))  # --threads sets it
    cli.add_dataclass_options(parser, ReferenceSettings)
    args = parser.parse_args(argv)
    if args.part and args.only_runs:
        raise ConfigError("give --part or --only_runs, not both")
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads}: need >= 0")
    cfg = from_params(HybridStudyConfig, {**REFERENCE_DEFAULTS, **cli.dataclass_options(args, HybridStudyConfig),
                                          "num_threads": args.threads})
    settings = from_params(ReferenceSettings, cli.dataclass_options(args, ReferenceSettings))
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = reference_run(cfg, settings, args.out, part=args.part,
                             only_runs=tuple(r for r in args.only_runs.split(",") if r))
    if manifest:
        print(reference_verdict(load_reference(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
