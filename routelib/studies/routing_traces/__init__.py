"""Notebook 04's parameters and its live-collection check.

:class:`TraceStudyConfig` holds the parameters of ``notebooks/04_mixtral_routing_collection.ipynb``;
:func:`consecutive_locality` runs the Mixtral paper's across-token routing analysis on a trace frame;
:func:`decoding_comparison` sets two trace sets of the same prompts (greedy and sampled decoding)
side by side on the measures the loops of greedy decoding inflate; :func:`real_moe_comparison` sets
the subject's routing statistics beside those of Mixtral-8x7B and OLMoE-1B-7B (from the published
aggregates of allenai/OLMoE's routing analysis) and the Mixtral paper's Table 5, at the same relative
depths; :func:`live_collection` re-collects a few problems with a model and measures how far the fresh
routing agrees with a trace directory's, token by token -- the check that the shipped traces are
reproducible and that the collection path still works (it runs under nbval on every CI run).

The notebook runs on any trace folder, collected here or imported from another tool
(``python -m routelib.routing.record.convert``) without the model: :func:`live_check_problem` says in
one line why the live check cannot run on a folder, :func:`token_samples`, :func:`example_token` and
:func:`locality_number` take what the folder has (no prompt tokens, one dataset, short sequences).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    text_dir: str | None = "routing_data_collected/moe-subject-text"  # the same model reading plain text of
    # five domains, set against real MoEs in section 8 (None leaves that column out)
    olmoe_routing: str | None = None  # the routing_output folder of allenai/OLMoE's routing analysis
    # (section 8); None: $ROUTELIB_OLMOE_ROUTING; without it section 8 shows the subject and the paper only

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
    from routelib.errors import ModelNotFoundError
    from routelib.subject.build import model_folder

    if cfg.live_model is None:
        return "live_model is None (set it to the local model folder that collected trace_dir to run the check)"
    if not info.generation_of(cfg.live_dataset):
        if info.imported:
            return (f"trace_dir was imported from {info.source}, not collected here: there is no collection of "
                    f"{cfg.live_dataset!r} to repeat (the check needs traces of python -m routelib.routing.record.collect)")
        return (f"trace_dir records no collection of {cfg.live_dataset!r} (datasets: {', '.join(info.datasets)}); "
                f"set live_dataset to one of them")
    try:
        model_folder(cfg.live_model)
    except ModelNotFoundError as err:
        return f"{err}; set live_model to the model folder that collected trace_dir"
    if info.model and not _same_model(info.model, cfg.live_model):
        return (f"live_model {cfg.live_model!r} is not the model that collected trace_dir ({info.model!r}); "
                f"set live_model to that model's folder")
    return None


def _same_model(a: str, b: str) -> bool:
    """Two model names or paths name the same model: equal, or the same local folder."""
    from routelib.errors import ModelNotFoundError
    from routelib.subject.build import model_folder

    if a == b:
        return True
    try:
        folders = [model_folder(name) for name in (a, b)]
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


# --------------------------------------------------------------------------- against real MoEs (section 8)
#: Relative depths compared (layer index over the last index) and their names.
DEPTHS = {"first": 0.0, "quarter": 0.25, "half": 0.5, "last": 1.0}
#: First-choice transitions compared, by depth. The published aggregates hold layers 0 -> 7 -> 15: for
#: Mixtral-8x7B (32 layers) first -> quarter -> half, for OLMoE-1B-7B (16 layers) first -> half -> last.
TRANSITIONS = (("first", "quarter"), ("quarter", "half"), ("first", "half"), ("half", "last"))
#: The statistics compared (key -> what the number is), in the order they are shown.
STATISTICS = {
    "usage_entropy": "usage entropy / log E (1 = uniform)",
    "max_share": "largest expert's share of routings (uniform 1/E)",
    "domain_tv": "domain: TV of its usage from pooled (mean over domains)",
    "transition_u": "first choice: U(later | earlier)",
    "lookup_accuracy": "first choice: lookup top-1 accuracy",
    "prior_accuracy": "first choice: prior (most used later expert)",
    "vocabulary": "vocabulary: occurrences routed to the token's top expert",
    "repeat_top1": "consecutive tokens: same first choice",
    "repeat_chance": "same first choice by chance (independent, usage of the domain)",
    "repeat_top2": "consecutive tokens: share a first or second choice",
}
PAPER = "Mixtral paper, Table 5"
PAPER_SOURCE = ('Jiang et al. 2024, "Mixtral of Experts" (arXiv:2401.04088), Table 5: a quoted external figure, '
                "not recomputed here")
PAPER_LAYERS = (0, 15, 31)  # of Mixtral-8x7B's 32 layers
_TABLE5 = {  # domain of The Pile: (first choice at layers 0, 15, 31), (first or second choice), in %
    "ArXiv": ((14.0, 27.9, 22.7), (46.5, 62.3, 52.9)),
    "DM Mathematics": ((14.1, 28.4, 19.7), (44.9, 67.0, 44.5)),
    "Github": ((14.9, 28.1, 19.7), (49.9, 66.9, 49.2)),
    "Gutenberg": ((13.9, 26.1, 26.3), (49.5, 63.1, 52.2)),
    "PhilPapers": ((13.6, 25.3, 22.1), (46.9, 61.9, 51.3)),
    "PubMed Abstracts": ((14.2, 24.6, 22.0), (48.6, 61.6, 51.8)),
    "StackExchange": ((13.6, 27.2, 23.6), (48.2, 64.6, 53.6)),
    "Wikipedia (en)": ((14.4, 23.6, 25.3), (49.8, 62.1, 51.8)),
}
_COLUMNS = ["model_name", "statistic", "depth", "layer", "relative_depth", "value", "low", "high"]


@dataclass
class RoutingCounts:
    """One model's routing reduced to count tables at some of its layers -- what the published
    aggregates hold and what traces reduce to, so that both give the same statistics
    (:func:`routing_statistics`)."""

    model: str
    num_layers: int
    num_experts: int
    top_k: int
    usage: dict  # layer -> (E,) routings per expert, every one of the k choices
    transitions: dict  # (earlier, later) -> (E, E) first-choice counts of the same tokens
    domains: dict = field(default_factory=dict)  # layer -> (domains x E) routings; empty: no domains
    tokens: dict = field(default_factory=dict)  # layer -> columns token_id, expert, count; empty: none
    first_choice: dict = field(default_factory=dict)  # layer -> (domains x E) first choices (one row "all"
    # without domains): the chance level of the consecutive-token rate
    notes: list = field(default_factory=list)  # what the counts lack or pool, in words


def depth_name(layer: int, num_layers: int) -> str:
    """The name in :data:`DEPTHS` nearest to ``layer``'s relative depth layer / (num_layers - 1)."""
    if not 0 <= layer < num_layers:
        raise ConfigError(f"layer {layer} is outside the model's {num_layers} layers")
    relative = layer / max(num_layers - 1, 1)
    return min(DEPTHS, key=lambda name: abs(DEPTHS[name] - relative))


def depth_layers(num_layers: int) -> dict[str, int]:
    """Depth name -> the layer at that relative depth (:func:`routelib.routing.analyse.usage.relative_depths`);
    a layer that two names would share keeps the first."""
    from routelib.routing.analyse.usage import relative_depths

    chosen = {}
    for name, fraction in DEPTHS.items():
        layer = relative_depths(num_layers, (fraction,))[0]
        if layer not in chosen.values():
            chosen[name] = layer
    return chosen


def mixtral_table5() -> pd.DataFrame:
    """The Mixtral paper's Table 5 as quoted (:data:`PAPER_SOURCE`), in %: rows the domains of The Pile,
    columns (measure, layer) -- the share of consecutive tokens with the same first-choice expert and
    sharing an expert as first or second choice, at layers 0, 15 and 31."""
    columns = pd.MultiIndex.from_product([["first choice", "first or second choice"], PAPER_LAYERS],
                                         names=["measure", "layer"])
    return pd.DataFrame([first + second for first, second in _TABLE5.values()], index=list(_TABLE5), columns=columns)


def _row(model, statistic, depth, layer, relative_depth, value, low=np.nan, high=np.nan) -> dict:
    return dict(zip(_COLUMNS, (model, statistic, depth, str(layer), relative_depth, float(value), float(low),
                               float(high))))


def paper_statistics() -> pd.DataFrame:
    """Table 5 as rows of the comparison: per measure and layer the mean over its 8 domains (value) and
    their range (low, high), as fractions."""
    table = mixtral_table5() / 100
    rows = []
    for statistic, measure in (("repeat_top1", "first choice"), ("repeat_top2", "first or second choice")):
        for layer in PAPER_LAYERS:
            col = table[(measure, layer)]
            rows.append(_row(PAPER, statistic, depth_name(layer, 32), layer, layer / 31, col.mean(), col.min(),
                             col.max()))
    return pd.DataFrame(rows, columns=_COLUMNS)


def _frames_of_domains(read, root, model: str) -> tuple[pd.DataFrame | None, list[str]]:
    """One reader of :mod:`routelib.routing.record.olmoe_analysis` over every domain: the frames with a
    ``domain`` column (None when no file is there) and the domains whose file is missing."""
    from routelib.routing.record import olmoe_analysis as O

    frames, missing = [], []
    for domain in O.DOMAINS:
        try:
            frames.append(read(root, model, domain).assign(domain=domain))
        except O.AnalysisDataMissing:
            missing.append(domain)
    return (pd.concat(frames, ignore_index=True) if frames else None), missing


def _joint(part: pd.DataFrame, num_experts: int) -> np.ndarray:
    joint = np.zeros((num_experts, num_experts), np.int64)
    np.add.at(joint, (part["from_expert"].to_numpy(), part["to_expert"].to_numpy()), part["count"].to_numpy())
    return joint


def aggregate_counts(root, model: str) -> RoutingCounts:
    """A real MoE's counts from the published aggregates (``model`` a key of
    :data:`routelib.routing.record.olmoe_analysis.MODELS`, e.g. ``"mistral"`` or ``"olmoe"``), all five
    domains pooled where one figure is wanted; raises AnalysisDataMissing when the folder or the
    model's expert counts are not there (a missing domain file of the other kinds is noted)."""
    from routelib.routing.record import olmoe_analysis as O

    if model not in O.MODELS:
        raise ConfigError(f"model {model!r}: choose from {', '.join(O.MODELS)}")
    root, meta = O.find_root(root), O.MODELS[model]
    num_experts = meta["experts"]
    counts, missing = _frames_of_domains(O.expert_counts, root, model)
    if counts is None:
        raise O.AnalysisDataMissing(f"{root / model}: no expert_counts files; the data is {O.WHERE}")
    notes = [f"{meta['name']}: no expert counts of {', '.join(missing)}"] if missing else []
    first, _ = _frames_of_domains(lambda *args: O.expert_counts(*args, top1=True), root, model)
    first_choice = {} if first is None else {
        int(layer): part.pivot_table(index="domain", columns="expert", values="count", aggfunc="sum", fill_value=0)
        for layer, part in first.groupby("layer")}
    usage = {int(layer): np.bincount(part["expert"], weights=part["count"], minlength=num_experts)
             for layer, part in counts.groupby("layer")}
    domains = {int(layer): part.pivot_table(index="domain", columns="expert", values="count", aggfunc="sum",
                                            fill_value=0).reindex(columns=range(num_experts), fill_value=0)
               for layer, part in counts.groupby("layer")}
    transitions, tokens = {}, {}
    flows, missing = _frames_of_domains(O.transitions_top1, root, model)
    if flows is not None:
        transitions = {(int(a), int(b)): _joint(part, num_experts)
                       for (a, b), part in flows.groupby(["from_layer", "to_layer"])}
    if missing:
        notes.append(f"{meta['name']}: first-choice transitions pooled without {', '.join(missing)} (file missing)")
    per_token, missing = _frames_of_domains(O.expert_tokens, root, model)
    if per_token is not None:
        summed = per_token.groupby(["layer", "token_id", "expert"], as_index=False)["count"].sum()
        tokens = {int(layer): part.drop(columns="layer") for layer, part in summed.groupby("layer")}
    if missing:
        notes.append(f"{meta['name']}: vocabulary pooled without {', '.join(missing)} (file missing)")
    return RoutingCounts(meta["name"], meta["layers"], num_experts, meta["top_k"], usage, transitions, domains,
                         tokens, first_choice, notes)


def trace_counts(experts: np.ndarray, num_experts: int, model: str, layers, pairs, domains=None,
                 token_ids=None) -> RoutingCounts:
    """The same counts from traces: ``experts`` (N, L, k) of the tokens compared, ``layers`` to count,
    ``pairs`` (earlier, later) of first-choice transitions, ``domains`` (N,) labels (None: no domain
    statistic) and ``token_ids`` (N,) (None: no vocabulary statistic)."""
    from routelib.routing.analyse import usage as U

    experts = np.asarray(experts)
    if experts.ndim != 3 or len(experts) == 0:
        raise ConfigError(f"experts must be a non-empty (tokens, layers, k) array, got shape {experts.shape}")
    num_layers, top_k = experts.shape[1:]
    usage = {layer: U.layer_counts(experts, layer, num_experts) for layer in layers}
    transitions = {(a, b): U.transition_counts(experts, a, b, num_experts) for a, b in pairs}
    by_domain = {} if domains is None else {layer: U.domain_counts(experts, layer, num_experts, domains)
                                            for layer in layers}
    tokens = {} if token_ids is None else {layer: U.token_expert_counts(experts, layer, token_ids) for layer in layers}
    labels = np.full(len(experts), "all", dtype=object) if domains is None else np.asarray(domains)
    first_choice = {layer: pd.DataFrame({d: U.layer_counts(experts[labels == d], layer, num_experts, first_only=True)
                                         for d in sorted(set(labels.tolist()))}).T for layer in layers}
    return RoutingCounts(model, num_layers, num_experts, top_k, usage, transitions, by_domain, tokens, first_choice)


def repeat_chance(first_choice: pd.DataFrame) -> pd.Series:
    """Per row (domain) of first-choice counts (domains x E): sum_e p_e^2, the share of consecutive tokens
    with the same first choice if each were drawn independently from the domain's usage (uniform: 1/E)."""
    c = np.asarray(first_choice, float)
    if (c < 0).any() or (c.sum(1) <= 0).any():
        raise ConfigError("first-choice counts: need non-negative counts with a positive total per row")
    p = c / c.sum(1, keepdims=True)
    return pd.Series((p ** 2).sum(1), index=first_choice.index)


def routing_statistics(counts: RoutingCounts, min_occurrences: int = 10) -> pd.DataFrame:
    """Every statistic of :data:`STATISTICS` the counts allow (not the consecutive-token ones: counts
    have no order), one row each: columns model_name, statistic, depth, layer, relative_depth, value, low,
    high (low/high: the range over domains, where a statistic is a mean over them). The vocabulary
    statistic counts token ids seen at least ``min_occurrences`` times (no row when none is)."""
    from routelib.routing.analyse import usage as U

    rows, last = [], counts.num_layers - 1
    for layer in sorted(counts.usage):
        where = (counts.model, depth_name(layer, counts.num_layers), layer, layer / max(last, 1))
        stats = U.usage_stats(counts.usage[layer])
        rows += [_row(where[0], "usage_entropy", *where[1:], stats["entropy"]),
                 _row(where[0], "max_share", *where[1:], stats["max_share"])]
        if layer in counts.domains:
            tv = U.domain_stats(counts.domains[layer])["tv_from_pooled"]
            rows.append(_row(where[0], "domain_tv", *where[1:], tv.mean(), tv.min(), tv.max()))
        tokens, least = counts.tokens.get(layer), min_occurrences * counts.top_k
        if tokens is not None and (tokens.groupby("token_id")["count"].sum() >= least).any():  # else too few tokens
            vocab = U.vocabulary_stats(tokens, min_count=least, top_k=counts.top_k)
            rows.append(_row(where[0], "vocabulary", *where[1:], vocab["top_expert_rate"]))
        if layer in counts.first_choice:
            chance = repeat_chance(counts.first_choice[layer])
            rows.append(_row(where[0], "repeat_chance", *where[1:], chance.mean(), chance.min(), chance.max()))
    for (a, b), joint in counts.transitions.items():
        depth = f"{depth_name(a, counts.num_layers)}→{depth_name(b, counts.num_layers)}"
        stats = U.transition_stats(joint)
        for statistic, key in (("transition_u", "uncertainty_coefficient"), ("lookup_accuracy", "lookup_accuracy"),
                               ("prior_accuracy", "prior_accuracy")):
            rows.append(_row(counts.model, statistic, depth, f"{a}→{b}", np.nan, stats[key]))
    return pd.DataFrame(rows, columns=_COLUMNS)


def locality_statistics(df: pd.DataFrame, experts: np.ndarray, num_experts: int, model: str, layers) -> pd.DataFrame:
    """The consecutive-token rates (the Mixtral paper's Table 5 measures, :mod:`routelib.routing.analyse.locality`)
    of the tokens of ``df`` (its rows are ``experts``' (N, L, k)) at ``layers``: every pair of adjacent
    tokens both in ``df``, pooled (value) and the range over its datasets (low, high)."""
    from routelib.routing.analyse.locality import consecutive_routing

    num_layers = experts.shape[1]
    table = consecutive_routing(experts, (df["dataset"] + "/" + df["problem_id"]).to_numpy(), df["position"].to_numpy(),
                                num_experts, groups=df["dataset"].to_numpy(), distances=(1,), phases=("all",),
                                bootstrap=0)
    if table.empty:
        return pd.DataFrame(columns=_COLUMNS)
    rows = []
    for statistic, measure in (("repeat_top1", "top1_same"), ("repeat_top2", "set_shared")):
        for layer in layers:
            part = table[(table["layer"] == layer) & (table["measure"] == measure)]
            groups = part[part["group"] != "all"]["rate"]
            rows.append(_row(model, statistic, depth_name(layer, num_layers), layer, layer / max(num_layers - 1, 1),
                             part[part["group"] == "all"]["rate"].iloc[0], groups.min(), groups.max()))
    return pd.DataFrame(rows, columns=_COLUMNS)


def subject_statistics(df: pd.DataFrame, model: str, phase: str = "all", by_domain: bool = True,
                       min_occurrences: int = 10) -> pd.DataFrame:
    """A trace frame's rows for the comparison (``phase`` tokens; ``by_domain``: its datasets are the
    domains): every statistic at the layers of :func:`depth_layers`, the transitions of
    :data:`TRANSITIONS` and the consecutive-token rates."""
    info = trace_info(df.attrs["manifest"])
    keep = phase_mask(df, phase)
    if not keep.any():
        raise ConfigError(f"phase={phase!r}: the traces hold no such tokens")
    part, experts = df[keep], trace_arrays(df).experts[keep]
    at = depth_layers(info.num_layers)
    layers = sorted(at.values())
    pairs = list(dict.fromkeys((at[a], at[b]) for a, b in TRANSITIONS if a in at and b in at))
    token_ids = part["token_id"] if "token_id" in part and part["token_id"].notna().all() else None
    counts = trace_counts(experts, info.num_experts, model, layers, pairs,
                          domains=part["dataset"].to_numpy() if by_domain else None,
                          token_ids=None if token_ids is None else token_ids.to_numpy())
    return pd.concat([routing_statistics(counts, min_occurrences),
                      locality_statistics(part, experts, info.num_experts, model, layers)], ignore_index=True)


def subject_columns(cfg: TraceStudyConfig, traces: pd.DataFrame) -> list[pd.DataFrame]:
    """The subject's frames for the comparison: ``cfg.text_dir``'s plain text ("subject text", its
    datasets the domains; left out when None) and the ``cfg.phase`` tokens of ``traces`` (the benchmarks
    are no text domains: no domain statistic), named "subject <phase>" when the same model collected
    both and "trace_dir <phase>" when not."""
    columns, label = [], "subject"
    if cfg.text_dir is not None:
        text = load_traces(paths.in_repo(cfg.text_dir))
        columns.append(subject_statistics(text, "subject text"))
        same = trace_info(text.attrs["manifest"]).model == trace_info(traces.attrs["manifest"]).model
        label = "subject" if same else "trace_dir"
    columns.append(subject_statistics(traces, f"{label} {cfg.phase}", phase=cfg.phase, by_domain=False))
    return columns


def real_moe_comparison(subjects, root=None, min_occurrences: int = 10,
                        models: tuple[str, ...] = ("mistral", "olmoe")) -> tuple[pd.DataFrame, str | None]:
    """The comparison table: Mixtral-8x7B and OLMoE-1B-7B from the published aggregates in ``root``
    (None: ``$ROUTELIB_OLMOE_ROUTING``), then ``subjects`` (frames of :func:`subject_statistics`), then
    the Mixtral paper's Table 5. Returns (table, missing): ``missing`` is None, or -- when the
    aggregates are not on this machine -- one line saying where they come from, and the table holds
    the subjects and the paper only. ``table.attrs["notes"]``: what the aggregates lack or pool."""
    from routelib.routing.record.olmoe_analysis import AnalysisDataMissing

    real, notes, missing = [], [], None
    try:
        for model in models:
            counts = aggregate_counts(root, model)
            real.append(routing_statistics(counts, min_occurrences))
            notes += counts.notes
    except AnalysisDataMissing as err:
        real, notes, missing = [], [], str(err)
    table = pd.concat([*real, *subjects, paper_statistics()], ignore_index=True)
    table.attrs["notes"] = notes
    return table, missing


def _depth_order(depth: str) -> int:
    order = list(DEPTHS) + [f"{a}→{b}" for a, b in TRANSITIONS]
    return order.index(depth) if depth in order else len(order)


def comparison_view(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The comparison for reading: rows (statistic, depth) in :data:`STATISTICS` order, a column per
    model in the table's order, cells the value and, for a mean over domains, their range in brackets;
    empty where a model has no such figure."""
    def cell(row) -> str:
        text = f"{row['value']:.{digits}f}"
        if np.isfinite(row["low"]) and np.isfinite(row["high"]) and row["low"] != row["high"]:
            text += f" [{row['low']:.{digits}f}–{row['high']:.{digits}f}]"
        return text

    shown = table.assign(cell=table.apply(cell, axis=1), what=table["statistic"].map(STATISTICS))
    view = shown.pivot_table(index=["statistic", "what", "depth"], columns="model_name", values="cell", aggfunc="first",
                             fill_value="")
    view = view[list(dict.fromkeys(table["model_name"]))]
    order = sorted(view.index, key=lambda i: (list(STATISTICS).index(i[0]), _depth_order(i[2])))
    return view.loc[order].droplevel("statistic").rename_axis(index=["statistic", "depth"], columns=None)


def compared_layers(table: pd.DataFrame) -> pd.DataFrame:
    """Which layer of each model sits at each depth (and each transition) of the comparison."""
    view = table.pivot_table(index="depth", columns="model_name", values="layer", aggfunc="first", fill_value="")
    view = view[list(dict.fromkeys(table["model_name"]))]
    return view.loc[sorted(view.index, key=_depth_order)].rename_axis(columns=None)
