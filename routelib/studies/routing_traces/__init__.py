"""Notebook 04's parameters and its live-collection check.

:class:`TraceStudyConfig` holds the parameters of ``notebooks/04_mixtral_routing_collection.ipynb``;
:func:`consecutive_locality` runs the Mixtral paper's across-token routing analysis on a trace frame;
:func:`decoding_comparison` sets two trace sets of the same prompts (greedy and sampled decoding)
side by side on the measures the loops of greedy decoding inflate; :func:`live_collection` re-collects a few problems with a model and measures how far the fresh
routing agrees with a trace directory's, token by token -- the check that the shipped traces are
reproducible and that the collection path still works (it runs under nbval on every CI run).

The notebook runs on any trace folder, collected here or imported from another tool
(``python -m routelib.routing.record.convert``) without the model: :func:`live_check_problem` says in
one line why the live check cannot run on a folder, :func:`token_samples`, :func:`example_token` and
:func:`locality_number` take what the folder has (no prompt tokens, one dataset, short sequences).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from routelib import paths
from routelib.errors import ConfigError
from routelib.routing.record.traces import TraceInfo, load_traces, trace_arrays, trace_info


@dataclass
class TraceStudyConfig:
    trace_dir: str = "routing_data_collected/moe-subject"  # traces to study (any folder in the documented format:
    # collected, or imported with python -m routelib.routing.record.convert)
    compare_dir: str | None = "routing_data_collected/moe-subject-sampled"  # the same prompts decoded otherwise
    # (sampled), compared with trace_dir in the last section (None skips it)
    phase: str = "generated"  # which tokens to analyse: "generated" (the original project's journeys), "prompt" or "all"
    sample_size: int | None = 50_000  # tokens sampled for the statistics (the original project's SAMPLE_SIZE); None = all
    seed: int = 0  # seed of the token sample and of the permutation test
    permutations: int = 2000  # label shuffles of the problem-level permutation test
    top_paths: int = 10  # how many frequent paths / prefixes to list
    max_distance: int = 16  # consecutive-token locality: token distances d = 1..max_distance
    bootstrap: int = 1000  # problem-level bootstrap resamples of the locality rates' 95 % intervals
    live_model: str | None = "data/moe-subject"  # model that collected trace_dir, for the live collection check
    # (None skips it; so does a folder it did not collect, see live_check_problem)
    live_dataset: str = "humaneval"  # benchmark of the live collection
    live_problems: int = 4  # problems collected live (the first ones of the benchmark)
    live_new_tokens: int = 24  # tokens generated per live problem
    out_dir: str = "runs/04_mixtral_routing_collection"  # where the live traces are written

    def __post_init__(self):
        if self.phase not in ("generated", "prompt", "all"):
            raise ConfigError(f"phase must be 'generated', 'prompt' or 'all', got {self.phase!r}")
        if self.sample_size is not None and self.sample_size < 1:
            raise ConfigError(f"sample_size must be >= 1 or None (all tokens), got {self.sample_size}")
        for name in ("permutations", "top_paths", "max_distance", "live_problems", "live_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def phase_mask(df: pd.DataFrame, phase: str) -> np.ndarray:
    """(N,) bool: the rows of ``phase`` ("all" keeps every row)."""
    if phase == "all":
        return np.ones(len(df), bool)
    return (df["phase"] == phase).to_numpy()


def token_samples(df: pd.DataFrame, cfg: TraceStudyConfig) -> dict[str, np.ndarray]:
    """Row indices of the token sample of each phase the traces hold (generated and prompt, or all for
    ``cfg.phase="all"``): at most ``cfg.sample_size`` rows each, seeded. Imported traces may hold one
    phase only (a decode-only log); ``cfg.phase`` itself must have tokens (ConfigError)."""
    from routelib.routing.analyse.predictability import sample_tokens

    samples = {}
    for name in ("generated", "prompt") if cfg.phase != "all" else ("all",):
        rows = np.flatnonzero(phase_mask(df, name))
        if len(rows):
            samples[name] = rows[sample_tokens(len(rows), cfg.sample_size, cfg.seed)]
    if cfg.phase not in samples:
        held = sorted(set(df["phase"])) or ["none"]
        raise ConfigError(f"phase={cfg.phase!r}: the traces hold no {cfg.phase} tokens (phases: {', '.join(held)}); "
                          f"choose phase='all' or one of those")
    return samples


def example_token(df: pd.DataFrame, dataset: str = "gsm8k", phase: str = "generated", nth: int = 5) -> int:
    """Row of the ``nth`` ``phase`` token of ``dataset`` (the static example beside the dashboard); the
    first dataset the traces hold when they lack ``dataset``, any phase when they lack ``phase``, and
    the last such token when there are fewer than ``nth + 1``."""
    if len(df) == 0:
        raise ConfigError("the traces hold no tokens: no example to show")
    names = df["dataset"].to_numpy()
    of_dataset = names == (dataset if dataset in set(names) else names[0])
    rows = np.flatnonzero(of_dataset & phase_mask(df, phase))
    rows = rows if len(rows) else np.flatnonzero(of_dataset)
    return int(rows[min(nth, len(rows) - 1)])


def live_check_problem(cfg: TraceStudyConfig, info: TraceInfo) -> str | None:
    """Why the live collection check cannot run on the traces ``info`` describes (one line: what is
    missing and how to supply it), or None when it can: ``cfg.live_model`` is set, names a model here
    that is the one that collected the traces, and the traces record a collection of ``cfg.live_dataset``
    (its generation settings are repeated)."""
    from routelib.data.hub import local_model_folder
    from routelib.errors import ModelNotFoundError

    if cfg.live_model is None:
        return "live_model is None (set it to the local model folder that collected trace_dir to run the check)"
    if not info.generation_of(cfg.live_dataset):
        if info.imported:
            return (f"trace_dir was imported from {info.source}, not collected here: there is no collection of "
                    f"{cfg.live_dataset!r} to repeat (the check needs traces of python -m routelib.routing.record.collect)")
        return (f"trace_dir records no collection of {cfg.live_dataset!r} (datasets: {', '.join(info.datasets)}); "
                f"set live_dataset to one of them")
    try:
        local_model_folder(cfg.live_model)
    except ModelNotFoundError as err:
        return f"{err}; set live_model to the model folder that collected trace_dir"
    if info.model and not _same_model(info.model, cfg.live_model):
        return (f"live_model {cfg.live_model!r} is not the model that collected trace_dir ({info.model!r}); "
                f"set live_model to that model's folder")
    return None


def _same_model(a: str, b: str) -> bool:
    """Two model names or paths name the same model: equal, or the same local folder."""
    from routelib.data.hub import local_model_folder
    from routelib.errors import ModelNotFoundError

    if a == b:
        return True
    try:
        folders = [local_model_folder(name) for name in (a, b)]
    except ModelNotFoundError:
        return False
    return None not in folders and folders[0].resolve() == folders[1].resolve()


def locality_number(table: pd.DataFrame, measure: str, layer: int, phase: str = "prompt", column: str = "rate",
                    distance: int = 1) -> float | None:
    """One number of a :func:`consecutive_locality` table (all problems pooled), or None when the
    traces have no such token pairs (no prompt tokens, say)."""
    row = table[(table["group"] == "all") & (table["phase"] == phase) & (table["distance"] == distance)
                & (table["layer"] == layer) & (table["measure"] == measure)]
    return float(row[column].iloc[0]) if len(row) else None


def consecutive_locality(df: pd.DataFrame, arrays, cfg: TraceStudyConfig) -> pd.DataFrame:
    """The Mixtral paper's routing analysis across tokens (:func:`routelib.routing.analyse.locality.consecutive_routing`)
    on a trace frame: every dataset and phase, distances 1..``cfg.max_distance``, problems as sequences."""
    from routelib.routing.analyse.locality import consecutive_routing

    num_experts = trace_info(df.attrs["manifest"]).num_experts
    problem = (df["dataset"] + "/" + df["problem_id"]).to_numpy()
    return consecutive_routing(arrays.experts, problem, df["position"].to_numpy(), num_experts,
                               generated=(df["phase"] == "generated").to_numpy(), groups=df["dataset"].to_numpy(),
                               distances=range(1, cfg.max_distance + 1), bootstrap=cfg.bootstrap, seed=cfg.seed)


def decoding_comparison(sets: dict[str, pd.DataFrame], cfg: TraceStudyConfig) -> pd.DataFrame:
    """Trace sets of the same prompts (e.g. ``{"greedy": ..., "sampled": ...}``, from ``load_traces``)
    side by side, per set and dataset, on ``cfg.phase`` tokens: generated tokens, repetition rate
    (inside a repeated 4-gram of the same sequence, :mod:`routelib.routing.analyse.repetition`), adjacent-layer
    predictability (U and lookup gain over the prior at hop 1), distinct full-depth top-1 paths per
    1,000 tokens and the share of the 10 most frequent; per set (``dataset = "both"``) also the
    problem-level permutation test of HumanEval vs GSM8K expert usage (layers with p < 0.05, mean
    total-variation distance over layers)."""
    from routelib.routing.analyse import predictability as A
    from routelib.routing.analyse.repetition import repetition_rate

    rows = []
    for name, df in sets.items():
        num_experts = trace_info(df.attrs["manifest"]).num_experts
        experts = trace_arrays(df).experts  # (N, L, k)
        keep = phase_mask(df, cfg.phase)
        rep = repetition_rate(df)
        groups = [(d, keep & (df["dataset"] == d).to_numpy()) for d in sorted(df["dataset"].unique())]
        for dataset, rows_of in groups + [("both", keep)]:
            ex = experts[rows_of]
            hop = A.hop_curve(ex, num_experts).iloc[0]
            paths = A.path_counts(ex, top=10)
            row = {"decoding": name, "dataset": dataset, "tokens": int(rows_of.sum()),
                   "repetition_rate": float(rep.loc["all" if dataset == "both" else dataset, "repetition_rate"]),
                   "u_hop1": hop["uncertainty"], "lookup_gain_hop1": hop["gain"],
                   "distinct_paths_per_1k": 1000 * paths.attrs["distinct"] / max(len(ex), 1),
                   "top10_path_share": float(paths["share"].sum())}
            if dataset == "both" and len(groups) == 2:
                test = A.usage_difference_test(ex, (df["dataset"] + "/" + df["problem_id"]).to_numpy()[rows_of],
                                               df["dataset"].to_numpy()[rows_of], num_experts,
                                               permutations=cfg.permutations, seed=cfg.seed)
                row.update(layers_p_below_005=int((test["p_perm"] < 0.05).sum()),
                           tv_distance_mean=float(test["tv_distance"].mean()))
            rows.append(row)
    return pd.DataFrame(rows)


def live_collection(cfg: TraceStudyConfig, reference_dir: str | Path | None = None) -> tuple[pd.DataFrame, dict]:
    """Collect ``cfg.live_problems`` problems of ``cfg.live_dataset`` with ``cfg.live_model``, greedy,
    ``cfg.live_new_tokens`` new tokens, with the generation settings recorded in the reference traces
    (BOS, EOS stop), into ``<out_dir>/live``; then compare with the reference traces.

    Returns (agreement, manifest): agreement has one row per problem -- tokens compared (the live
    tokens whose position the reference also has), ``same_token`` (the same token id there: greedy
    decoding reproduced), ``same_top1`` and ``same_set`` (identical top-1 expert / top-k set at every
    layer) among tokens with the same id. Batch composition changes left padding and so the float
    rounding of attention, which can flip a near-tie in the router: agreement near, not always at, 1."""
    from routelib.routing.record.collect import benchmark_prompts, collect
    from routelib.routing.record.routers import load_model

    if cfg.live_model is None:
        raise ConfigError("live_model is None: no live collection to run")
    reference_dir = paths.in_repo(cfg.trace_dir if reference_dir is None else str(reference_dir))
    gen = trace_info(reference_dir).generation_of(cfg.live_dataset)
    bench = benchmark_prompts(cfg.live_dataset, limit=cfg.live_problems)
    model, tokenizer = load_model(str(paths.in_repo(cfg.live_model)))
    live_dir = paths.in_repo(cfg.out_dir) / "live"
    manifest = collect(model, tokenizer, dict(zip(bench.problem_ids, bench.prompts)), live_dir,
                       dataset=cfg.live_dataset, max_new_tokens=cfg.live_new_tokens,
                       batch_size=cfg.live_problems, prepend_bos=bool(gen.get("prepend_bos", False)),
                       stop_at_eos=bool(gen.get("stop_at_eos", True)), resume=False,
                       prompt_source=bench.source, prompt_template=bench.template, progress=False)
    live = load_traces(live_dir)
    ref = load_traces(reference_dir, datasets=[cfg.live_dataset])
    ref = ref[ref["problem_id"].isin(bench.problem_ids)]
    return routing_agreement(live, ref), manifest


def routing_agreement(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Token-by-token agreement of two trace frames over the (dataset, problem_id, position) both
    hold (both from :func:`load_traces`, same layout); one row per problem, see :func:`live_collection`."""
    keys = ["dataset", "problem_id", "position"]
    ea, eb = trace_arrays(a).experts, trace_arrays(b).experts  # (N, L, k)
    ia = pd.DataFrame({**{k: a[k].to_numpy() for k in keys}, "token_a": a["token_id"].to_numpy(), "ra": np.arange(len(a))})
    ib = pd.DataFrame({**{k: b[k].to_numpy() for k in keys}, "token_b": b["token_id"].to_numpy(), "rb": np.arange(len(b))})
    both = ia.merge(ib, on=keys)
    same_token = (both["token_a"] == both["token_b"]).to_numpy()
    xa, xb = ea[both["ra"].to_numpy()], eb[both["rb"].to_numpy()]  # (M, L, k)
    both["same_token"] = same_token
    both["same_top1"] = (xa[:, :, 0] == xb[:, :, 0]).all(1) & same_token
    both["same_set"] = (np.sort(xa, -1) == np.sort(xb, -1)).all((1, 2)) & same_token
    out = both.groupby(["dataset", "problem_id"], sort=False).agg(
        tokens=("position", "size"), same_token=("same_token", "mean"),
        same_top1=("same_top1", "sum"), same_set=("same_set", "sum"), matched=("same_token", "sum"))
    out["same_top1"] = out["same_top1"] / out["matched"].clip(lower=1)
    out["same_set"] = out["same_set"] / out["matched"].clip(lower=1)
    return out.drop(columns="matched").reset_index()
