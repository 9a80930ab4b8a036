"""Notebook 02's reference run (docs/design.md §7): static vs dynamic GDN/softmax routing of
:mod:`routelib.studies.attention_routing` at a scale where the models have learned something, on the
CPU -- the plan, training side by side, the measurements, the manifest -- and the functions notebook 02
reads its committed files with. Command: ``python -m routelib.studies.attention_routing reference``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from routelib import paths
from routelib.bench import compare
from routelib.config import from_params
from routelib.data import load_tokenizer
from routelib.errors import ConfigError
from routelib.evaluation import domain_eval_data, perplexity_by_domain, train_tokens_per_s
from routelib.models.hybrid import HybridLM
from routelib.reference import (InvocationLog, load_if_made, load_manifest, load_records, reference_main, split_parts,
                                t_interval, torch_threads, wait_for, write_manifest, write_record)
from routelib.studies.attention_routing import (
    ARMS,
    HybridStudyConfig,
    RunSpec,
    inference_speed,
    route_tokens,
    routing_loss,
    softmax_share,
    train_run,
    training_batches,
    unigram_loss,
)
from routelib.train import TrainConfig, make_optimizer

# Notebook 02's reference run (docs/design.md §7): static vs dynamic GDN/softmax routing at a scale where the
# models have learned something, on the CPU, its small result files committed under
# ``data/reference/02_dynamic_attention_routing/`` beside a manifest.
#
# The runs (:func:`reference_plan`; the models, training and measurements above; the arms of one seed
# see the same batches):
#
# 1. ``lr_sweep``: both arms, first seed, ``sweep_steps`` steps, at every rate of ``lr_same``; the
#    **shared rate** is the one with the lowest mean validation loss over both arms (:func:`sweep_table`);
# 2. ``shared``: both arms at the shared rate for every seed of ``seeds`` (the comparison);
# 3. ``seed_lrs``: static at ``lr_static``, dynamic at ``lr_dynamic`` (the original project's unequal rates), first seed;
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
REFERENCE_DIR = "data/reference/02_dynamic_attention_routing"  # committed results (docs/design.md §7)
GROUPS = ("lr_sweep", "shared", "seed_lrs", "alpha")  # run groups, in training order
STEP_COST = {"static": 1.1, "dynamic": 1.0}  # relative CPU time of a training step (pilot, hidden 128-256)

#: The reference configuration (HybridStudyConfig fields the command line overrides), sized by the
#: pilot to fit ~100 min as two 1-thread processes on an idle 2-core CPU (README, notebook 02).
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
                      curve: list, eval_data: dict[str, list], writer: bool = True) -> dict | None:
    """Train (or resume) one run, then write its history and its final record: per-domain validation
    loss (nats/token, argmax routing), training tokens/s, steps and tokens. Under ``torchrun`` every
    rank trains; the others (``writer`` False) return None without evaluating."""
    model, result = train_run(spec, cfg, curve, log_every=settings.log_every, ckpt_every=settings.ckpt_every)
    if not writer:
        return None
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
    just these run names (the rest's names need the sweep finished).

    Under ``torchrun`` (``routelib.train.process_group``) the ranks train every run data-parallel on the
    same global batch (``batch_size`` windows a step, split over the ranks), acting on rank 0's view of
    which runs are done; rank 0 alone writes histories, records, the invocation log, and -- after the
    group has closed and the other ranks have exited, so that its timings run alone -- the measurements
    and the manifest. Checkpoints are rank 0's too, and resume under any number of processes."""
    from routelib.train import process_group

    out = paths.in_repo(out_dir)
    with process_group("nccl" if cfg.device_().type == "cuda" else "gloo") as (rank, _):
        writer = rank == 0
        if writer:
            (out / "history").mkdir(parents=True, exist_ok=True)
        log = InvocationLog(out, command) if writer else None
        trained = _train_plan(cfg, settings, out, part, only_runs, writer)
        models = None if trained is None or part or only_runs else _measured_models(cfg, settings, trained[0])
    if not writer:
        return None
    if models is None:
        log.finish()
        return None
    plan, sweep, eval_data = trained
    return _measure(cfg, settings, out, plan, sweep, eval_data, log, models)


def _train_plan(cfg: HybridStudyConfig, settings: ReferenceSettings, out: Path, part: tuple[int, int] | None,
                only_runs: tuple[str, ...], writer: bool) -> tuple[dict[str, list[RunSpec]], pd.DataFrame, dict] | None:
    """This invocation's training (see :func:`reference_run`): (plan, sweep table, held-out data), or
    None while the LR sweep is unfinished. Every rank of a process group calls it."""
    from routelib.train import rank0_value

    eval_data = domain_eval_data(cfg)
    curve = [b for batches in eval_data.values() for b in batches[: settings.curve_batches]]

    def train_share(specs: list[RunSpec]) -> None:
        """Train this invocation's share of ``specs`` that no invocation has finished yet."""
        if part:
            specs = split_parts(specs, part, cost=lambda s: s.steps * STEP_COST[s.arm])
        elif only_runs:
            specs = [s for s in specs if s.name in only_runs]
        done = load_records(out)
        for spec in rank0_value([s for s in specs if s.name not in done]):
            _train_and_record(spec, cfg, settings, out, curve, eval_data, writer)

    sweep_specs = reference_plan(cfg, settings)["lr_sweep"]
    train_share(sweep_specs)
    sweep = (wait_for(lambda: sweep_table(cfg, settings, load_records(out)), settings.wait_s) if part
             else sweep_table(cfg, settings, load_records(out)))
    sweep = rank0_value(sweep)  # each rank polled the files; rank 0's answer counts
    if sweep is None:  # a part or only_runs invocation while other invocations' sweep runs are unfinished
        missing = [s.name for s in sweep_specs if s.name not in load_records(out)]
        if writer:
            print(f"the LR sweep is not complete ({', '.join(missing)}); run this command again once they are", flush=True)
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
    return plan, sweep, eval_data


def _measured_models(cfg: HybridStudyConfig, settings: ReferenceSettings, plan: dict[str, list[RunSpec]]) -> dict[str, HybridLM]:
    """The finished runs the measurements use, by name, loaded from their checkpoints (not retrained):
    both arms of the first seed at the shared rate and every dynamic run of the comparison, the original
    project's rates and the alpha sweep. Loaded inside the process group (``train`` joins it to load), so that
    rank 0 can measure after the group has closed."""
    specs = [s for s in plan["shared"] if s.seed == cfg.seeds[0]]
    specs += [s for s in unique_runs(plan, ("shared", "seed_lrs", "alpha")) if s.arm == "dynamic"]
    return {s.name: train_run(s, cfg, log_every=settings.log_every, ckpt_every=settings.ckpt_every)[0]
            for s in dict.fromkeys(specs)}


def _measure(cfg: HybridStudyConfig, settings: ReferenceSettings, out: Path, plan: dict[str, list[RunSpec]],
             sweep: pd.DataFrame, eval_data: dict[str, list], log: InvocationLog, models: dict[str, HybridLM]) -> dict:
    """The final invocation's measurements and files (``models``: :func:`_measured_models`), then the manifest."""
    finals = load_records(out)
    groups = {s.name: ";".join(g for g in GROUPS if s in plan[g]) for s in unique_runs(plan)}
    runs = pd.DataFrame([{**finals[name], "groups": g} for name, g in groups.items()]).set_index("run")
    runs.to_csv(out / "runs.csv")
    sweep.to_csv(out / "lr_sweep.csv")
    shared_lr = float(sweep.index[sweep["chosen"]][0])
    deltas = delta_table(runs, shared_lr, cfg.seeds)
    deltas.to_csv(out / "delta.csv")
    first = {s.arm: models[s.name] for s in plan["shared"] if s.seed == cfg.seeds[0]}
    train_speed(cfg, shared_lr, settings.speed_rounds).to_csv(out / "train_speed.csv", index=False)
    prefill_speed(first["static"], first["dynamic"], cfg, settings).to_csv(out / "prefill_speed.csv", index=False)
    tokenizer = load_tokenizer(cfg.tokenizer)
    routing = [routing_breakdown(models[s.name], eval_data, tokenizer, settings.position_bins).assign(run=s.name)
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
    return load_if_made(load_reference, out_dir)


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
    with torch_threads(ref["manifest"]["environment"]["torch_threads"]):
        every = ref["settings"].log_every
        _, result = train_run(spec, cfg, curve, log_every=every, ckpt_every=ref["settings"].ckpt_every,
                              stop_step=min(every, spec.steps))
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
        f"At the original project's unequal rates (static {ref['cfg'].lr_static:g}, dynamic {ref['cfg'].lr_dynamic:g}) the gap is "
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
    return reference_main(argv, prog="python -m routelib.studies.attention_routing", description=main.__doc__,
                          out=REFERENCE_DIR, config=HybridStudyConfig, settings=ReferenceSettings, run=reference_run,
                          defaults=REFERENCE_DEFAULTS, skip=("num_threads",),  # --threads sets num_threads
                          config_extra=lambda args: {"num_threads": args.threads},
                          report=lambda manifest, out: print(reference_verdict(load_reference(out))))
