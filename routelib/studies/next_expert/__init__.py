"""Notebook 05's parameters and the parts of its pipeline that are more than a call: next-layer
expert prediction from recorded traces (the seed ``004``, section 3).

The predictors, the leak-free splits and the evaluation over them are a library
(:mod:`routelib.routing.predict.predictors`, also ``python -m routelib.routing.predict <trace_dir>``);
this module adds what notebook 05 measures on top: the cost of a prediction against one MoE layer
of the studied model (:func:`latency`) and the comparison with the seed's numbers
(:func:`seed_gap`), and the predictors' ranking on greedy against sampled traces of the same prompts
(:func:`decoding_rankings`).

The notebook runs on any trace folder, imported ones included, with or without the model that routed
them: :func:`hidden_states` attaches the routers' inputs when the model is here and otherwise says why
not (the notebook then leaves the hidden-state predictors and the cost against the model's layer out);
:func:`fit_hops` keeps the hops the traces' layers allow; :func:`order_checks` lists the orders of the
predictors the notebook reports (asserted on the shipped traces only, :func:`reports_shipped_traces`);
:func:`headline` keeps the numbers the run has. :func:`hops_by_split` tabulates the predictors at hops
1-3 on the problem and dataset splits. Section 9 (what prediction buys in tokens per second):
:func:`prefetch_guesses` turns each fitted predictor of :data:`PREFETCH_SOURCES` into guesses issued
``hop`` layers ahead, :func:`offload_runs` replays them through the offloading model on every machine
profile and cache policy, and :func:`offload_order` checks the order of :data:`OFFLOAD_ORDER`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from routelib.errors import ConfigError
from routelib.routing.predict import offload, prefetch
from routelib.routing.predict.dataset import HiddenStates, HiddenStatesUnavailable, RoutingData, attach_hidden_states
from routelib.routing.predict.evaluation import SEED_CLAIMS, EvalConfig, SplitResult, metric_table
from routelib.routing.predict.predictors import HIDDEN_PREDICTORS, PRE_ATTENTION_PREDICTORS
from routelib.routing.record.traces import resolve_trace_dir


@dataclass
class NextExpertConfig(EvalConfig):
    """:class:`~routelib.routing.predict.predictors.EvalConfig` (traces, splits, predictors, their training)
    plus notebook 05's cost measurement."""

    latency_batch: int = 256  # tokens per call in the batched latency measurement (at most the test tokens)
    bench_min_time_s: float = 0.1  # time each latency measurement for at least this long
    offload_tokens: int = 4000  # generated test tokens replayed through the expert caches and the offloading model
    offload_predictor: str = "mlp"  # the trained predictor that drives prefetching there (one of predictors)
    compare_dir: str | None = "routing_data_collected/moe-subject-sampled"  # the same prompts decoded by
    # sampling: the predictors again on its held-out problems (None skips that section)


#: The orders of the predictors (one hop, held-out problems, top-1) that notebook 05 reports on the
#: shipped traces: (better, worse).
ORDERS = (("ngram", "lookup"), ("lookup", "prior"), ("prior", "chance"), ("hidden_router", "lookup"),
          ("ngram", "hidden_router"), ("mlp", "ngram"), ("history", "ngram"), ("hidden_probe", "mlp"),
          ("hidden_probe", "hidden_router"), ("hidden_probe", "pre_attn_probe"), ("pre_attn_probe", "mlp"))

#: Section 9's prefetch sources: label -> (predictor, hop), or None for no prefetch. A hop-h source
#: predicts layer l from layer l - h and is issued h layer visits ahead (``lead=h``); "perfect" is the
#: true experts, the bound of any predictor at that lead.
PREFETCH_SOURCES = {"none": None, "mlp": ("mlp", 1), "hidden_probe": ("hidden_probe", 1),
                    "hidden_probe_h2": ("hidden_probe", 2), "hidden_probe_h3": ("hidden_probe", 3),
                    "pre_attn_probe": ("pre_attn_probe", 1), "perfect": ("perfect", 1), "perfect_h3": ("perfect", 3)}

#: The order of prefetch sources by tokens per second that section 9 reports on the shipped traces,
#: for every machine profile and cache policy (best first).
OFFLOAD_ORDER = ("perfect", "none", "hidden_probe", "pre_attn_probe", "mlp")


def reports_shipped_traces(cfg: EvalConfig) -> bool:
    """``cfg.trace_dir`` is the shipped trace folder whose findings the notebook's text reports."""
    shipped = resolve_trace_dir(EvalConfig.trace_dir).resolve()
    return resolve_trace_dir(cfg.trace_dir).resolve() == shipped


def fit_hops(cfg: NextExpertConfig, num_layers: int) -> tuple[NextExpertConfig, str | None]:
    """``cfg`` with the hops that traces of ``num_layers`` MoE layers allow (h <= L - 1), and one line
    naming the hops left out (None when all fit); ConfigError when none fits."""
    hops = cfg.hop_list()
    kept = [h for h in hops if h < num_layers]
    if not kept:
        raise ConfigError(f"hops={cfg.hops!r}: the traces have {num_layers} MoE layer(s), so no hop fits "
                          f"(a hop h needs h + 1 layers)")
    if kept == hops:
        return cfg, None
    dropped = ", ".join(str(h) for h in hops if h >= num_layers)
    return (dataclasses.replace(cfg, hops=",".join(map(str, kept))),
            f"hops {dropped} left out: the traces have {num_layers} MoE layers (hops up to {num_layers - 1})")


def hidden_states(data: RoutingData, cfg: EvalConfig) -> tuple[HiddenStates | None, str | None]:
    """(the hidden states, None) attached to ``data`` when ``cfg`` asks for a hidden-state predictor
    and the model that routed the traces can be loaded here (the pre-attention states too when it asks
    for ``pre_attn_probe``); else (None, why not in one line)."""
    names = set(cfg.predictor_names())
    if not names & set(HIDDEN_PREDICTORS):
        return None, ("no hidden-state predictor among the predictors (add hidden_router,hidden_probe,pre_attn_probe, "
                      "with the model)")
    try:
        return attach_hidden_states(data, cfg.model, batch_tokens=cfg.hidden_batch_tokens, device=cfg.device,
                                    pre_attention=bool(names & set(PRE_ATTENTION_PREDICTORS))), None
    except HiddenStatesUnavailable as err:
        return None, " ".join(str(err).split())


def without_hidden(cfg: NextExpertConfig) -> NextExpertConfig:
    """``cfg`` with the hidden-state predictors left out (ConfigError if no predictor is left)."""
    kept = [name for name in cfg.predictor_names() if name not in HIDDEN_PREDICTORS]
    if not kept:
        raise ConfigError(f"predictors={cfg.predictors!r}: only hidden-state predictors, and the hidden states are "
                          f"unavailable; add predictors that read the routing (e.g. lookup,ngram,mlp)")
    return dataclasses.replace(cfg, predictors=",".join(kept))


def order_checks(hop1: pd.DataFrame) -> pd.DataFrame:
    """The :data:`ORDERS` among the predictors of ``hop1`` (predictor x metric, one hop): one row per
    order with both top-1 accuracies and whether the order holds."""
    rows = [{"order": f"{better} > {worse}", "better": hop1.loc[better, "top1"], "worse": hop1.loc[worse, "top1"]}
            for better, worse in ORDERS if better in hop1.index and worse in hop1.index]
    table = pd.DataFrame(rows, columns=["order", "better", "worse"])
    return table.assign(holds=table["better"] > table["worse"])


def latency(result: SplitResult, hidden, cfg: NextExpertConfig) -> pd.DataFrame:
    """Per predictor and batch size (1 and ``cfg.latency_batch`` tokens, at most the test tokens):
    microseconds per token and the share of one MoE layer of the studied model (``hidden.model``,
    layer 0) on the same tokens."""
    batches = sorted({1, min(cfg.latency_batch, len(result.test))})
    return prefetch.latency_table(
        prefetch.predictor_latency(result.predictors, result.test, batch_sizes=batches, min_time_s=cfg.bench_min_time_s),
        prefetch.moe_layer_latency(hidden.model, result.test.hidden.x[:, 0], batch_sizes=batches,
                            min_time_s=cfg.bench_min_time_s))


def hops_by_split(summary: pd.DataFrame, hops=(1, 2, 3), metric: str = "top1") -> pd.DataFrame:
    """``metric`` on all test tokens as predictor x (split, hop), for the problem and dataset splits at
    ``hops`` (the token split, run at one hop, is left out); a split is named "problem" or by its
    direction ("gsm8k -> humaneval")."""
    rows = summary[(summary["subset"] == "all") & summary["hop"].isin(list(hops)) & (summary["split"] != "token")]
    rows = rows.assign(split=rows["split"].where(rows["split"] == "problem", rows["train"] + " -> " + rows["test"]))
    table = metric_table(rows, ["split", "hop"], metric)
    return table.reindex(columns=sorted(table.columns, key=lambda c: (c[0] != "problem", c[0], c[1])))


def prefetch_guesses(test: RoutingData, predictors: dict, k: int, tokens: int, hops=(1, 2, 3),
                     sources: dict = PREFETCH_SOURCES) -> tuple[np.ndarray, dict]:
    """(requests (T, L, k), {label: (guesses (T, L, k) or None, lead)}) for the first ``tokens`` generated
    test tokens in decoding order (:func:`routelib.routing.predict.offload.predictor_predictions`), one
    entry per source of ``sources`` whose predictor was fitted (``predictors``, for the ``hops``) and
    whose hop the layers allow."""
    requests = offload.decoding_requests(test)[:tokens]
    out = {}
    for label, source in sources.items():
        if source is None:
            out[label] = (None, 1)
            continue
        name, hop = source
        fitted = name == "perfect" or (name in predictors and hop in hops)
        if hop >= test.num_layers or not fitted:
            continue
        guesses = requests if name == "perfect" else \
            offload.predictor_predictions(test, predictors[name], m=k, hop=hop)[1][:tokens]
        out[label] = (guesses, hop)
    return requests, out


def offload_runs(requests: np.ndarray, guesses: dict, num_experts: int, policies=("lru", "belady"),
                 profiles=tuple(offload.PROFILES)) -> pd.DataFrame:
    """:func:`routelib.routing.predict.offload.simulate` for every profile x policy x prefetch source of
    ``guesses`` (from :func:`prefetch_guesses`): one row each (policy, prefetch, lead and
    :meth:`~routelib.routing.predict.offload.OffloadResult.row`)."""
    rows = []
    for profile in profiles:
        for policy in policies:
            for label, (predicted, lead) in guesses.items():
                result = offload.simulate(requests, num_experts, offload.PROFILES[profile], policy=policy,
                                          predictions=predicted, lead=lead)
                rows.append({"policy": policy, "prefetch": label, "lead": lead, **result.row()})
    return pd.DataFrame(rows)


def offload_order(runs: pd.DataFrame, order=OFFLOAD_ORDER) -> pd.DataFrame:
    """Per (profile, policy) of ``runs``: the tokens per second of the sources of ``order`` that were run,
    best first, and whether they fall in that order."""
    table = runs.pivot_table(index=["profile", "policy"], columns="prefetch", values="tokens_per_s")
    present = [name for name in order if name in table.columns]
    out = table[present]
    return out.assign(holds=(out.diff(axis=1).iloc[:, 1:] < 0).all(axis=1))


def seed_gap(by_split: pd.DataFrame, by_subset: pd.DataFrame) -> pd.DataFrame:
    """Top-1 of the seed (Mixtral-8x7B, a random split over single layer transitions) beside ours on
    the token split (the closest to the seed's), on held-out problems, and on held-out problems'
    unique journeys. ``by_split``: predictor x split direction; ``by_subset``: predictor x subset.
    Rows: the predictors of the seed's table and ours that were run."""
    seed = pd.Series({name: SEED_CLAIMS[name]["top1"] for name in ("lookup", "mlp")})
    rows = [name for name in ("lookup", "ngram", "mlp", "hidden_router", "hidden_probe") if name in by_split.index]
    return pd.DataFrame({
        "seed (Mixtral-8x7B, random split)": seed,
        "ours, token split": by_split.filter(like="token").iloc[:, 0],
        "ours, held-out problems": by_split.filter(like="problem").iloc[:, 0],
        "ours, held-out problems, unique journeys": by_subset.get("unique"),
    }).reindex(rows)


def headline(hop1: pd.DataFrame, by_split: pd.DataFrame, by_subset: pd.DataFrame, hit: pd.DataFrame | None,
             latencies: pd.DataFrame | None, k: int, by_hop: pd.DataFrame | None = None) -> dict:
    """Notebook 05's headline numbers, in a fixed order, as far as the run has them: a number whose
    predictor was left out, whose test tokens are absent or whose section was skipped (``hit``,
    ``latencies`` or ``by_hop`` -- predictor x hop on held-out problems -- None) is left out."""
    token_split = by_split.filter(like="token")
    wanted = {
        "problem_split_top1_lookup": (hop1, "lookup", "top1"),
        "problem_split_top1_ngram": (hop1, "ngram", "top1"),
        "problem_split_top1_mlp": (hop1, "mlp", "top1"),
        "problem_split_top2_hit_mlp": (hop1, "mlp", "top2_hit"),
        "problem_split_top1_hidden_router": (hop1, "hidden_router", "top1"),
        "problem_split_top1_hidden_probe": (hop1, "hidden_probe", "top1"),
        "problem_split_top1_pre_attn_probe": (hop1, "pre_attn_probe", "top1"),
        "token_split_top1_mlp": (token_split, "mlp", token_split.columns[0] if len(token_split.columns) else None),
        "unique_journeys_top1_mlp": (by_subset, "mlp", "unique"),
        "cache_hit_at_k_hidden_probe": (hit, "hidden_probe", k),
        "cache_hit_at_k_lru": (hit, "lru", k),
        "problem_split_top1_prev_token": (hop1, "prev_token", "top1"),
        "problem_split_top1_history": (hop1, "history", "top1"),
        "problem_split_top1_mlp_history": (hop1, "mlp_history", "top1"),
        "generated_top1_history": (by_subset, "history", "generated"),
        "generated_top1_ngram": (by_subset, "ngram", "generated"),
        "cache_hit_at_k_history": (hit, "history", k),
        "cache_hit_at_k_ngram": (hit, "ngram", k),
        "problem_split_hop2_top1_hidden_probe": (by_hop, "hidden_probe", 2),
        "problem_split_hop3_top1_hidden_probe": (by_hop, "hidden_probe", 3),
        "problem_split_hop3_top1_pre_attn_probe": (by_hop, "pre_attn_probe", 3),
    }
    out = {}
    for name, (table, row, column) in wanted.items():
        if table is not None and row in table.index and column in table.columns and pd.notna(table.loc[row, column]):
            out[name] = float(table.loc[row, column])
    if latencies is not None:
        mlp = latencies.query("name == 'mlp' and batch == 1")["pct_of_layer"]
        if len(mlp):
            out["mlp_pct_of_layer_batch1"] = float(mlp.iloc[0])
    return out


def decoding_rankings(summaries: dict[str, pd.DataFrame], subsets=("all", "unique")) -> pd.DataFrame:
    """Top-1 and rank of every predictor, one hop, held-out problems, per decoding (e.g. ``{"greedy":
    summary, "sampled": summary}``, each from ``predictors.summarize``) and test subset; ``attrs``
    hold the Spearman correlation of the rankings between the first two decodings, per subset."""
    cols = {}
    for name, summary in summaries.items():
        for subset in subsets:
            top1 = metric_table(summary, "subset", "top1", split="problem", hop=1)[subset].drop(index="chance", errors="ignore")
            cols[(name, subset, "top1")] = top1
            cols[(name, subset, "rank")] = top1.rank(ascending=False, method="min")
    table = pd.DataFrame(cols).sort_values(list(cols)[0], ascending=False)
    first, second = list(summaries)[:2]
    table.attrs["spearman"] = {subset: float(table[(first, subset, "top1")].corr(table[(second, subset, "top1")],
                                                                               method="spearman"))
                               for subset in subsets}
    return table
