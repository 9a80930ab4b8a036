"""One set of routing statistics for every model, from counts: a real MoE's published aggregates
(:mod:`routelib.routing.record.olmoe_analysis`) and a subject's traces reduce to the same count tables,
so the same functions compare them like with like.

- :func:`usage_stats`: how evenly a layer uses its experts -- the entropy of expert usage over log E
  (1 = uniform) and the largest expert's share of the routings (uniform: 1/E);
- :func:`domain_stats`: how much the domain decides the experts -- the total variation distance of each
  domain's usage from the pooled usage (0: the domain does not matter), and the lift of its most-used
  expert over the uniform share (a specialised domain sends far more than 1/E of its routings to one expert);
- :func:`transition_stats`: how much one depth's first choice says about another's -- the uncertainty
  coefficient U(later | earlier) (0: independent, 1: determined) and the accuracy of a lookup table
  (the most frequent later expert for each earlier one) against always guessing the most used;
- :func:`vocabulary_stats`: how much the token decides the expert -- the share of a token id's routings
  that go to its most frequent expert, weighted by the token's routings, and (times k) the share of its
  occurrences that get that expert (1: every token has its expert).

Counts in, numbers out: a routing (one token's choice at one layer, any of its k) counts once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from routelib.errors import ConfigError


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _as_counts(counts, name: str) -> np.ndarray:
    arr = np.asarray(counts, float)
    if (arr < 0).any() or arr.sum() <= 0:
        raise ConfigError(f"{name}: need non-negative counts with a positive total")
    return arr


def usage_stats(counts) -> dict[str, float]:
    """Counts per expert (E,) -> normalised entropy (log E = 1) and the largest share."""
    c = _as_counts(counts, "usage counts")
    p = c / c.sum()
    return {"entropy": _entropy(p) / np.log(len(p)), "max_share": float(p.max()), "uniform_share": 1 / len(p)}


def domain_stats(counts: pd.DataFrame) -> pd.DataFrame:
    """``counts`` (domains x experts) -> per domain: ``tv_from_pooled`` (total variation distance of the
    domain's usage from all domains pooled) and ``top_lift`` (its most used expert's share x E)."""
    c = _as_counts(counts.to_numpy(), "domain x expert counts")
    p = c / c.sum(1, keepdims=True)  # (D, E) each domain's usage
    pooled = c.sum(0) / c.sum()
    return pd.DataFrame({"tv_from_pooled": 0.5 * np.abs(p - pooled).sum(1), "top_lift": p.max(1) * c.shape[1]},
                        index=counts.index)


def transition_stats(joint) -> dict[str, float]:
    """``joint`` (E_earlier x E_later) first-choice counts -> U(later | earlier), lookup accuracy and the
    prior's (always the most used later expert)."""
    j = _as_counts(joint, "transition counts")
    total = j.sum()
    later = j.sum(0) / total
    h_later = _entropy(later)
    rows = j.sum(1)
    h_cond = sum(rows[i] / total * _entropy(j[i] / rows[i]) for i in range(len(rows)) if rows[i] > 0)
    return {"uncertainty_coefficient": (h_later - h_cond) / h_later if h_later > 0 else 0.0,
            "lookup_accuracy": float(j.max(1).sum() / total), "prior_accuracy": float(later.max())}


def vocabulary_stats(token_expert: pd.DataFrame, min_count: int = 1, top_k: int = 1) -> dict[str, float]:
    """``token_expert``: columns token_id, expert, count -> the routing-weighted mean over token ids (with
    at least ``min_count`` routings) of the share going to the token's most frequent expert
    (``top_expert_share``), and the number of token ids counted.

    With top-k routing every occurrence of a token is k routings to k different experts, so that share
    is at most 1/k. ``top_expert_rate`` = ``top_k`` x share is the share of the token's *occurrences*
    that its most frequent expert is among the chosen (1: the token always gets its expert; uniform
    routing: about k/E) -- the OLMoE paper's vocabulary specialization of a token's top expert, and
    the figure to compare between models of different k."""
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if not {"token_id", "expert", "count"} <= set(token_expert.columns):
        raise ConfigError("token_expert: need columns token_id, expert, count")
    per = token_expert.groupby(["token_id", "expert"])["count"].sum()
    totals = per.groupby(level=0).sum()
    top = per.groupby(level=0).max()
    keep = totals >= min_count
    if not keep.any():
        raise ConfigError(f"no token id has {min_count} routings")
    share = float(top[keep].sum() / totals[keep].sum())
    return {"top_expert_share": share, "top_expert_rate": top_k * share, "tokens": int(keep.sum())}


# --------------------------------------------------------------------------- counts from traces
def layer_counts(experts: np.ndarray, layer: int, num_experts: int, first_only: bool = False) -> np.ndarray:
    """(E,) routings per expert at ``layer`` of traces (N, L, k); ``first_only``: the first choice only."""
    chosen = experts[:, layer, :1] if first_only else experts[:, layer]
    return np.bincount(np.asarray(chosen).ravel(), minlength=num_experts)


def domain_counts(experts: np.ndarray, layer: int, num_experts: int, domains) -> pd.DataFrame:
    """(domains x experts) routings at ``layer``, ``domains`` labelling each row of the traces."""
    domains = np.asarray(domains)
    names = sorted(set(domains.tolist()))
    return pd.DataFrame([layer_counts(experts[domains == d], layer, num_experts) for d in names], index=names)


def transition_counts(experts: np.ndarray, earlier: int, later: int, num_experts: int) -> np.ndarray:
    """(E x E) first-choice counts from layer ``earlier`` to ``later`` of the same tokens."""
    joint = np.zeros((num_experts, num_experts), np.int64)
    np.add.at(joint, (np.asarray(experts[:, earlier, 0]), np.asarray(experts[:, later, 0])), 1)
    return joint


def token_expert_counts(experts: np.ndarray, layer: int, token_ids) -> pd.DataFrame:
    """Columns token_id, expert, count at ``layer`` (every one of the k choices)."""
    k = experts.shape[2]
    frame = pd.DataFrame({"token_id": np.repeat(np.asarray(token_ids), k), "expert": np.asarray(experts[:, layer]).ravel()})
    return frame.groupby(["token_id", "expert"]).size().rename("count").reset_index()


def relative_depths(num_layers: int, fractions=(0.0, 0.25, 0.5)) -> list[int]:
    """Layers at the given fractions of a model's depth: by default the first, about a quarter and about
    half of the way, where the published aggregates sit in Mixtral-8x7B (its layers 0, 7 and 15 of 32)."""
    return sorted({min(num_layers - 1, int(round(f * (num_layers - 1)))) for f in fractions})
