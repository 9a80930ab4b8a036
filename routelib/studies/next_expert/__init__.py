"""Notebook 05's parameters and the parts of its pipeline that are more than a call: next-layer
expert prediction from recorded traces (the seed ``004``, section 3).

The predictors, the leak-free splits and the evaluation over them are a library
(:mod:`routelib.routing.predict.predictors`, also ``python -m routelib.routing.predict <trace_dir>``);
this module adds what notebook 05 measures on top: the cost of a prediction against one MoE layer
of the studied model (:func:`latency`) and the comparison with the seed's numbers
(:func:`seed_gap`), and the predictors' ranking on greedy against sampled traces of the same prompts
(:func:`decoding_rankings`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from routelib.routing.predict import prefetch
from routelib.routing.predict.evaluation import SEED_CLAIMS, EvalConfig, SplitResult, metric_table


@dataclass
class NextExpertConfig(EvalConfig):
    """:class:`~routelib.routing.predict.predictors.EvalConfig` (traces, splits, predictors, their training)
    plus notebook 05's cost measurement."""

    latency_batch: int = 256  # tokens per call in the batched latency measurement
    bench_min_time_s: float = 0.1  # time each latency measurement for at least this long
    compare_dir: str | None = "routing_data_collected/moe-subject-sampled"  # the same prompts decoded by
    # sampling: the predictors again on its held-out problems (None skips that section)


def latency(result: SplitResult, hidden, cfg: NextExpertConfig) -> pd.DataFrame:
    """Per predictor and batch size (1 and ``cfg.latency_batch`` tokens): microseconds per token and
    the share of one MoE layer of the studied model (``hidden.model``, layer 0) on the same tokens."""
    batches = (1, cfg.latency_batch)
    return prefetch.latency_table(
        prefetch.predictor_latency(result.predictors, result.test, batch_sizes=batches, min_time_s=cfg.bench_min_time_s),
        prefetch.moe_layer_latency(hidden.model, result.test.hidden.x[:, 0], batch_sizes=batches,
                            min_time_s=cfg.bench_min_time_s))


def seed_gap(by_split: pd.DataFrame, by_subset: pd.DataFrame) -> pd.DataFrame:
    """Top-1 of the seed (Mixtral-8x7B, a random split over single layer transitions) beside ours on
    the token split (the closest to the seed's), on held-out problems, and on held-out problems'
    unique journeys. ``by_split``: predictor x split direction; ``by_subset``: predictor x subset."""
    seed = pd.Series({name: SEED_CLAIMS[name]["top1"] for name in ("lookup", "mlp")})
    return pd.DataFrame({
        "seed (Mixtral-8x7B, random split)": seed,
        "ours, token split": by_split.filter(like="token").iloc[:, 0],
        "ours, held-out problems": by_split.filter(like="problem").iloc[:, 0],
        "ours, held-out problems, unique journeys": by_subset["unique"],
    }).loc[["lookup", "ngram", "mlp", "hidden_router", "hidden_probe"]]


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
