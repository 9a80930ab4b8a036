"""Notebook 03's reference run: the three arms (and the compute-matched equal-total arm) at a size that
can decide, on the same batches, for several seeds; its results are committed under
``data/reference/03_moe_speedup/`` with a manifest, and read back here for the notebook:
``python -m routelib.studies.moe_vs_dense reference [--only_runs <arm>_seed<k>,...]``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import math
from pathlib import Path

import pandas as pd

from routelib import paths
from routelib.errors import ConfigError
from routelib.evaluation import domain_eval_data, perplexity_by_domain
from routelib.models import LM
from routelib.reference import (InvocationLog, load_manifest, reference_main, split_parts, t_interval, torch_threads,
                                write_manifest, write_record)
from routelib.train import TrainResult, load_checkpoint
from routelib.studies.moe_vs_dense import (ARMS, MATCHED, MoEStudyConfig, capacity_sweep, comparison_table, flops_formula,
                                        flops_split, latency, load_balance, routing_records, saving, seed_claims,
                                        train_arm, training_batches)


# ------------------------------------------------------------------------------- reference run
REFERENCE_DIR = "data/reference/03_moe_speedup"  # committed results of the reference run (docs/design.md §7)


def _history_frame(result: TrainResult, tokens_per_step: int, train_flops_per_token: float) -> pd.DataFrame:
    df = pd.DataFrame(result.history)
    df.insert(1, "tokens", df["step"] * tokens_per_step)
    df.insert(2, "train_flops", df["tokens"] * train_flops_per_token)
    return df


def _reference_eval_list(eval_data: dict[str, list], per_domain: int) -> list:
    """The held-out batches logged during training: the first ``per_domain`` of every domain."""
    return [b for batches in eval_data.values() for b in batches[:per_domain]]


REFERENCE_DEFAULTS = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256,
                          num_experts=8, top_k=2, seq_len=256, batch_size=16, steps=750, lr=0.002, warmup_steps=50,
                          ckpt_every=75, eval_windows=32, out_dir="runs/03_reference")  # the committed run's shape


@dataclass
class ReferenceSettings:
    seeds: str = "0"  # comma list of seeds; the first trains every arm and is the one measured
    seed_arms: str = ",".join(ARMS)  # arms trained for the other seeds (comma list)
    eval_every: int = 50  # held-out loss on the training curve every this many steps
    log_every: int = 10  # training-loss record every this many steps
    eval_per_domain: int = 2  # held-out windows per domain on the training curve
    train_only: str = ""  # only train these arms of the first seed and stop (comma list)

    def seed_list(self) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in self.seeds.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--seeds {self.seeds!r}: expected a comma list of integers") from None

    def arms(self, text: str, option: str) -> tuple[str, ...]:
        arms = tuple(a for a in text.split(",") if a)
        if not set(arms) <= set(ARMS):
            raise ConfigError(f"--{option} {text!r}: choose from {', '.join(ARMS)}")
        return arms


def run_names(cfg: MoEStudyConfig, settings: ReferenceSettings) -> list[str]:
    """Every training run of the reference run: each arm of the first seed, ``seed_arms`` of the others."""
    seeds = settings.seed_list()
    return [run_name(a, seeds[0]) for a in ARMS] + [run_name(a, s) for s in seeds[1:]
                                                    for a in settings.arms(settings.seed_arms, "seed_arms")]


def run_reference(cfg: MoEStudyConfig, settings: ReferenceSettings, out_dir: str | Path = REFERENCE_DIR, *,
                  part: tuple[int, int] | None = None, only_runs: tuple[str, ...] = ()) -> dict:
    """The reference command (:func:`routelib.reference.reference_main`): ``only_runs`` or ``part`` i/n of
    :func:`run_names` trains and evaluates those runs (:func:`train_runs`, processes side by side) and stops;
    otherwise the whole :func:`reference_run`, its manifest last."""
    cfg = dataclasses.replace(cfg, dense_baselines=True)
    if part is not None:
        cost = {"moe": 1.2, "dense_active": 1.0, "dense_total": 2.0, MATCHED: 1.0}  # relative CPU time per run
        only_runs = tuple(split_parts(run_names(cfg, settings), part, lambda name: cost[parse_run_name(name)[0]]))
    if only_runs:
        for name in only_runs:
            parse_run_name(name)
        train_runs(cfg, only_runs, out_dir, settings.eval_every, settings.log_every, settings.eval_per_domain)
        return {}
    return reference_run(cfg, out_dir, settings.seed_list(), settings.arms(settings.seed_arms, "seed_arms"),
                         settings.eval_every, settings.log_every, settings.eval_per_domain,
                         train_only=settings.arms(settings.train_only, "train_only"))


def main(argv: list[str] | None = None) -> int:
    """``python -m routelib.studies.moe_vs_dense reference [--out DIR] [--part i/n | --only_runs a,b] [--threads N]
    [--<field> value ...]``: notebook 03's reference run. Every field of MoEStudyConfig (defaults: the committed
    run's shape, REFERENCE_DEFAULTS) and of ReferenceSettings is an option. ``--only_runs`` takes
    ``<arm>_seed<k>`` names (arms: the three of the study and the compute-matched ``dense_total_matched``)."""
    return reference_main(argv, prog="python -m routelib.studies.moe_vs_dense", description=main.__doc__,
                          out=REFERENCE_DIR, config=MoEStudyConfig, settings=ReferenceSettings, run=run_reference,
                          defaults=REFERENCE_DEFAULTS,
                          report=lambda manifest, out: print(reference_verdict(load_reference(out))))


def reference_run(cfg: MoEStudyConfig, out_dir: str | Path = REFERENCE_DIR, seeds: tuple[int, ...] = (0,),
                  seed_arms: tuple[str, ...] = ARMS, eval_every: int = 50, log_every: int = 10,
                  eval_per_domain: int = 2, command: str | None = None, train_only: tuple[str, ...] = ()) -> dict:
    """Notebook 03's reference run: the three arms on the same batches for ``seeds[0]`` (and the arms
    in ``seed_arms`` for the other seeds, each seed its own init and batch order), then, on the first
    seed's models: perplexity per domain, round-robin latency, one MoE layer against transformers'
    MixtralSparseMoeBlock at the same shape, expert specialisation by domain over the MoE arm's
    checkpoints, load balance, the capacity sweep and the original project's claims. Results are written as each
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
    several processes can train different runs side by side, and under ``torchrun`` the ranks train each
    run data-parallel on the same global batch (rank 0 alone writes). Returns the records."""
    from routelib.train import process_group

    out = paths.in_repo(out_dir)
    with process_group() as (rank, _):  # under torchrun: one group for every run; rank 0 alone writes
        return _train_runs(cfg, runs, out, eval_every, log_every, eval_per_domain, command, rank == 0)


def _train_runs(cfg, runs, out, eval_every, log_every, eval_per_domain, command, writer: bool):
    if writer:
        (out / "history").mkdir(parents=True, exist_ok=True)
    log = InvocationLog(out, command) if writer else None
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
        ppl = perplexity_by_domain(model, eval_data)
        tokens = cfg_s.steps * batches.tokens_per_step
        records[name] = dict(arm=arm, seed=seed, steps=cfg_s.steps, warmup_steps=cfg_s.warmup_steps, tokens=tokens,
                             train_flops=3 * fwd * tokens, forward_flops_per_token=fwd, wall_s=result.wall_s,
                             perplexity=ppl, loss_nats={d: math.log(v) for d, v in ppl.items()})
        if writer:
            _history_frame(result, batches.tokens_per_step, 3 * fwd).to_csv(out / "history" / f"{name}.csv", index=False)
            write_record(out, name, records[name])
            print(f"{name}: perplexity {ppl['overall']:.2f} ({result.wall_s:.0f} s)", flush=True)
    if writer:
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
        # written when later seeds were merged in (routelib.studies.moe_vs_dense.merge); None before
        throughput=pd.read_csv(out / "throughput.csv") if (out / "throughput.csv").is_file() else None,
        runs=pd.read_csv(out / "runs.csv") if (out / "runs.csv").is_file() else None,
    )


def reproduce_first_steps(ref: dict, run: str, out_dir: str | Path) -> tuple[dict, dict]:
    """Re-train the first ``log_every`` steps of reference run ``run`` (``<arm>_seed<k>``) from the
    manifest's configuration on the manifest's number of torch threads, checkpoints under ``out_dir``.
    Returns the first history record of this re-run and the recorded one (equal on CPU, where training
    is deterministic)."""
    arm, seed = parse_run_name(run)
    man = ref["manifest"]
    params = man["params"]
    cfg = MoEStudyConfig(**{**params["study_config"], "out_dir": str(out_dir), "device": "cpu", "seed": seed})
    lm_cfg = cfg.arm_configs()["dense_total" if arm == MATCHED else arm]
    cfg = matched_config(cfg) if arm == MATCHED else cfg
    with torch_threads(man["environment"]["torch_threads"]):
        _, result = train_arm(arm, lm_cfg, cfg, training_batches(cfg), log_every=params["log_every"],
                              stop_step=params["log_every"])
    return result.history[0], ref["histories"][run].iloc[0].to_dict()


#: The comparisons of notebook 03, as (name, arm whose loss is subtracted from, arm subtracted).
COMPARISONS = (("moe - dense_active", "moe", "dense_active"), ("moe - dense_total", "moe", "dense_total"),
               ("dense_total_matched - moe", MATCHED, "moe"))


def seed_gaps(perplexity: pd.DataFrame, domain: str = "overall") -> pd.DataFrame:
    """perplexity: rows (arm, seed, domain, perplexity) -> one row per comparison and seed, then one
    "mean" row per comparison with its 95 % t-interval over the seeds both arms ran: columns
    comparison, seed, gap_nats (log ppl_a - log ppl_b), gap_ppl (ppl_a - ppl_b), and for the mean rows
    n, low/high (nats) and ppl_low/ppl_high."""
    table = perplexity[perplexity["domain"] == domain].pivot_table(index="seed", columns="arm", values="perplexity")
    rows = []
    for name, a, b in COMPARISONS:
        if a not in table or b not in table:
            continue
        both = table[[a, b]].dropna()
        nats = (both[a].map(math.log) - both[b].map(math.log))
        ppl = both[a] - both[b]
        rows += [dict(comparison=name, seed=str(s), gap_nats=nats[s], gap_ppl=ppl[s]) for s in both.index]
        ti, tp = t_interval(nats.to_numpy()), t_interval(ppl.to_numpy())
        rows.append(dict(comparison=name, seed="mean", gap_nats=ti["mean"], gap_ppl=tp["mean"], n=ti["n"],
                         low=ti["low"], high=ti["high"], ppl_low=tp["low"], ppl_high=tp["high"]))
    return pd.DataFrame(rows)


def reference_perplexity(ppl: pd.DataFrame) -> pd.DataFrame:
    """Overall and per-domain validation perplexity per arm: mean over the seeds the arm ran, and
    the number of seeds (rows: arms; columns: domains + ``seeds``)."""
    table = ppl.pivot_table(index="arm", columns="domain", values="perplexity", aggfunc="mean")
    table["seeds"] = ppl.groupby("arm")["seed"].nunique()
    order = [a for a in (*ARMS, MATCHED) if a in table.index]
    cols = [c for c in ("overall", "code", "math", "fiction", "encyclopedic", "news") if c in table.columns] + ["seeds"]
    return table.loc[order, cols]


def reference_claims(ref: dict) -> pd.DataFrame:
    """The original project's claims beside the reference run: :func:`seed_claims` on seed 0's comparison
    table, the perplexity row as means over every seed each arm ran, plus the FLOPs saving on the
    non-embedding (transformer-block) FLOPs, where the experts live."""
    claims = seed_claims(ref["comparison"])
    ppl = ref["perplexity"]
    mean = ppl[ppl["domain"] == "overall"].groupby("arm")["perplexity"].mean()
    n = ppl.groupby("arm")["seed"].nunique().min()
    claims.loc["perplexity MoE vs dense", "this run"] = (
        f"{mean['moe']:.1f} vs {mean['dense_active']:.1f} (equal active) / {mean['dense_total']:.1f} (equal total), "
        f"mean over {n} seed{'s' * int(n > 1)}")
    split = ref["flops_split"]["non_embedding"]
    extra = pd.DataFrame({"original project": ["78 %"], "this run": [
        f"{saving(split['moe'], split['dense_total'])} vs equal-total dense; "
        f"{saving(split['moe'], split['dense_active'])} vs equal-active (non-embedding FLOPs)"]},
        index=pd.Index(["FLOPs reduction, transformer blocks only"], name="claim"))
    return pd.concat([claims, extra])


def reference_verdict(ref: dict) -> str:
    """The verdict of the reference run in words, every number read from its files: perplexities (mean
    over seeds), the gaps over seeds with 95 % t-intervals (:func:`seed_gaps`), the FFN's share of the
    forward FLOPs both ways, and the arms' training speed (side by side in one process when measured so)."""
    ppl = ref["perplexity"]
    mean = ppl[ppl["domain"] == "overall"].groupby("arm")["perplexity"].mean()
    seeds = ppl.groupby("arm")["seed"].nunique()
    cmp_, split = ref["comparison"], ref["flops_split"]
    tokens = ref["manifest"]["params"]["tokens_per_arm"]
    gaps = seed_gaps(ppl).query("seed == 'mean'").set_index("comparison")

    def gap(name: str) -> str:
        g = gaps.loc[name]
        interval = f", 95 % t-interval [{g['low']:+.3f}, {g['high']:+.3f}]" if g["n"] > 1 else ""
        n = int(g["n"])
        return f"{g['gap_nats']:+.3f} nats{interval} ({g['gap_ppl']:+.2f} perplexity, {n} seed{'s' * (n > 1)})"

    text = (f"After {tokens / 1e6:.2f} M training tokens per arm, validation perplexity (all domains, mean over "
            f"seeds) is {mean['moe']:.2f} for the MoE ({seeds['moe']} seed{'s' * int(seeds['moe'] > 1)}), {mean['dense_active']:.2f} for the "
            f"dense model with equal active parameters ({seeds['dense_active']}) and {mean['dense_total']:.2f} for "
            f"the one with equal total parameters ({seeds['dense_total']}). MoE − equal-active: "
            f"{gap('moe - dense_active')}; MoE − equal-total: {gap('moe - dense_total')}.")
    if MATCHED in mean:
        steps = ref["runs"].query("arm == @MATCHED")["steps"].iloc[0] if ref.get("runs") is not None else None
        text += (f" Trained on the MoE's training FLOPs with a complete schedule of its own"
                 f"{f' ({steps} steps)' if steps else ''}, the equal-total model reaches {mean[MATCHED]:.2f}: "
                 f"equal-FLOPs dense − MoE {gap('dense_total_matched - moe')}.")
    moe = split.loc["moe"]
    text += (f" The MoE's forward pass costs {moe['non_embedding'] / split.loc['dense_total', 'non_embedding']:.2f}× the "
             f"equal-total model's non-embedding FLOPs; its FFN is {100 * moe['ffn_share']:.0f} % of its "
             f"non-embedding forward FLOPs")
    if "ffn_share_all" in split:
        text += f" and {100 * moe['ffn_share_all']:.0f} % of all of them (the LM head included)"
    speed = ref.get("throughput")
    how = (f"measured side by side in one process on {int(speed['threads'].iloc[0])} thread"
           f"{'s' if speed['threads'].iloc[0] > 1 else ''}" if speed is not None else "from the training runs")
    return text + (
        f". Training speed ({how}): {cmp_.loc['moe', 'train_tokens_per_s']:,.0f} tokens/s for the MoE against "
        f"{cmp_.loc['dense_active', 'train_tokens_per_s']:,.0f} (equal active) and "
        f"{cmp_.loc['dense_total', 'train_tokens_per_s']:,.0f} (equal total); prefill "
        f"{cmp_.loc['dense_total', 'prefill_ms'] / cmp_.loc['moe', 'prefill_ms']:.2f}× the equal-total model's speed.")