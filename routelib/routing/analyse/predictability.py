"""Statistics of expert routing traces: how predictable one layer's expert is from another's, the
paths tokens take through the layers, and how two datasets use the experts differently.

All functions take plain arrays from :func:`routelib.routing.record.traces.trace_arrays`: ``experts`` is
(N, L, k) expert ids (slot 0 = the highest gate weight), so ``experts[:, :, 0]`` is each token's
top-1 expert per layer. They follow the questions of the original project (a small public Mixtral routing analysis):
which experts each layer picks, whether layer j's expert can be read off layer i's, which full-depth
paths recur, and whether code (HumanEval) and math (GSM8K) route differently.

Predictability (:func:`predictability_matrix`) is measured on the top-1 experts X_i, X_j with two
plug-in estimates from the joint counts:

* the **uncertainty coefficient** U(j|i) = I(X_i; X_j) / H(X_j) (Theil 1970): the fraction of the
  entropy of layer j's choice that layer i's choice removes -- 0 when independent, 1 when X_j is a
  function of X_i. It is the heatmap's measure because it does not reward a skewed layer: a layer
  that sends 60 % of tokens to one expert is 60 % "predictable" by accuracy with no information at
  all, but has U = 0 unless X_i tells something.
* the **lookup accuracy** sum_a max_b p(a, b): the accuracy of the best table "expert at i ->
  expert at j" fit on the same tokens (an in-sample bound; notebook 05 measures held-out accuracy),
  next to the **prior accuracy** max_b p(b) of always guessing layer j's most used expert.

Plug-in estimates are biased upwards by about (E-1)^2 / (2 N ln 2) bits of mutual information (Miller
1955): 0.0004 bits for E = 8 and N = 50,000 -- negligible here; with few tokens and many experts
(OLMoE, 64) use more tokens.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from routelib.errors import RoutelibError


class AnalysisError(RoutelibError, ValueError):
    """A routing array or parameter the analysis cannot use (wrong shape, ids out of range, ...)."""


def top1(experts: np.ndarray) -> np.ndarray:
    """(N, L, k) expert ids -> (N, L) top-1 expert per token and layer (slot 0, the highest gate)."""
    experts = np.asarray(experts)
    if experts.ndim != 3 or experts.shape[2] < 1:
        raise AnalysisError(f"experts must be (tokens, layers, k), got shape {experts.shape}")
    return experts[:, :, 0].astype(np.int64)


def _check_ids(ids: np.ndarray, num_experts: int) -> None:
    if num_experts < 1:
        raise AnalysisError(f"num_experts must be >= 1, got {num_experts}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise AnalysisError(f"expert ids must lie in [0, {num_experts}), found {ids.min()}..{ids.max()}")


def joint_counts(src: np.ndarray, dst: np.ndarray, num_experts: int) -> np.ndarray:
    """(E, E) counts C[a, b] = #tokens with expert a at the source layer and b at the destination.

    src, dst: (N,) expert ids of the same tokens at two layers."""
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    if src.shape != dst.shape or src.ndim != 1:
        raise AnalysisError(f"src and dst must be equal-length 1-D arrays, got {src.shape} and {dst.shape}")
    _check_ids(src, num_experts)
    _check_ids(dst, num_experts)
    flat = np.bincount(src * num_experts + dst, minlength=num_experts * num_experts)
    return flat.reshape(num_experts, num_experts)  # (E_src, E_dst)


def _entropy_bits(p: np.ndarray, axis=None) -> np.ndarray:
    """Shannon entropy in bits of probabilities ``p`` (0 log 0 = 0) along ``axis``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=axis)


def uncertainty_coefficient(joint: np.ndarray) -> float:
    """U(dst | src) = I(src; dst) / H(dst) from (E, E) joint counts (rows src, columns dst).

    0 for independent layers, 1 when dst is determined by src; NaN when dst never varies (H = 0)."""
    joint = np.asarray(joint, np.float64)
    total = joint.sum()
    if total <= 0:
        raise AnalysisError("no tokens: the joint counts are all zero")
    p = joint / total
    h_dst = _entropy_bits(p.sum(0))
    if h_dst <= 0:
        return float("nan")
    mutual = _entropy_bits(p.sum(1)) + h_dst - _entropy_bits(p)
    return float(np.clip(mutual / h_dst, 0.0, 1.0))


def lookup_accuracy(joint: np.ndarray) -> float:
    """Accuracy of the best table src expert -> dst expert on the counted tokens: sum_a max_b p(a, b)."""
    joint = np.asarray(joint, np.float64)
    return float(joint.max(1).sum() / joint.sum())


def prior_accuracy(joint: np.ndarray) -> float:
    """Accuracy of always guessing the destination layer's most frequent expert: max_b p(b)."""
    joint = np.asarray(joint, np.float64)
    return float(joint.sum(0).max() / joint.sum())


_MEASURES = {"uncertainty": uncertainty_coefficient, "lookup_accuracy": lookup_accuracy,
             "prior_accuracy": prior_accuracy}


def predictability_matrix(experts: np.ndarray, num_experts: int, measure: str = "uncertainty") -> pd.DataFrame:
    """(L, L) table: entry [i, j] = how predictable layer j's top-1 expert is from layer i's.

    measure: "uncertainty" (U(j|i), the default; see the module docstring for why),
    "lookup_accuracy" or "prior_accuracy" (the latter ignores i: a reference row)."""
    if measure not in _MEASURES:
        raise AnalysisError(f"unknown measure {measure!r}; choose one of {sorted(_MEASURES)}")
    first = top1(experts)  # (N, L)
    num_layers = first.shape[1]
    fn = _MEASURES[measure]
    out = np.empty((num_layers, num_layers))
    for i in range(num_layers):
        for j in range(num_layers):
            out[i, j] = fn(joint_counts(first[:, i], first[:, j], num_experts))
    names = [f"L{i}" for i in range(num_layers)]
    return pd.DataFrame(out, index=pd.Index(names, name="from"), columns=pd.Index(names, name="to"))


def hop_curve(experts: np.ndarray, num_experts: int) -> pd.DataFrame:
    """How well layer l + h's top-1 expert follows from layer l's, for every hop h = 1 .. L-1,
    averaged over the source layers l (each (l, l+h) pair weighted equally).

    Columns: hop, pairs (how many layer pairs), uncertainty, lookup_accuracy, prior_accuracy and
    gain = lookup - prior (what knowing layer l adds over the destination's most used expert)."""
    first = top1(experts)  # (N, L)
    num_layers = first.shape[1]
    if num_layers < 2:
        raise AnalysisError("a hop curve needs at least two MoE layers")
    rows = []
    for hop in range(1, num_layers):
        joints = [joint_counts(first[:, l], first[:, l + hop], num_experts) for l in range(num_layers - hop)]
        row = {"hop": hop, "pairs": len(joints)}
        for name, fn in _MEASURES.items():
            row[name] = float(np.nanmean([fn(j) for j in joints]))
        rows.append(row)
    table = pd.DataFrame(rows)
    table["gain"] = table["lookup_accuracy"] - table["prior_accuracy"]
    return table


def path_counts(experts: np.ndarray, depth: int | None = None, top: int = 10) -> pd.DataFrame:
    """The most frequent top-1 expert paths through layers 0 .. depth-1 (all layers by default).

    Returns the ``top`` paths ("3-0-7-..." = layer 0's expert first) with their count, share of
    tokens and cumulative share; ``df.attrs`` holds ``distinct`` (paths seen), ``tokens`` and ``depth``."""
    first = top1(experts)  # (N, L)
    depth = first.shape[1] if depth is None else depth
    if not 1 <= depth <= first.shape[1]:
        raise AnalysisError(f"depth must be in 1..{first.shape[1]} (the number of layers), got {depth}")
    if top < 1:
        raise AnalysisError(f"top must be >= 1, got {top}")
    paths, counts = np.unique(first[:, :depth], axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:top]
    total = len(first)
    table = pd.DataFrame({"path": ["-".join(map(str, p)) for p in paths[order]],
                          "count": counts[order], "share": counts[order] / total})
    table["cumulative"] = table["share"].cumsum()
    table.attrs.update(distinct=int(len(paths)), tokens=int(total), depth=depth)
    return table


def prefix_concentration(experts: np.ndarray, num_experts: int, top: Sequence[int] = (1, 10)) -> pd.DataFrame:
    """For every prefix depth d = 1..L: distinct paths seen, the possible E^d, and the share of
    tokens covered by the ``top`` most frequent prefixes: how fast paths spread out with depth."""
    first = top1(experts)
    rows = []
    for depth in range(1, first.shape[1] + 1):
        _, counts = np.unique(first[:, :depth], axis=0, return_counts=True)
        counts = np.sort(counts)[::-1]
        row = {"depth": depth, "distinct": len(counts), "possible": num_experts ** depth,
               "entropy_bits": float(_entropy_bits(counts / counts.sum()))}
        for t in top:
            row[f"top{t}_share"] = float(counts[:t].sum() / counts.sum())
        rows.append(row)
    return pd.DataFrame(rows)


def expert_usage(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """(L, E) share of routing slots each expert receives per layer (all k slots counted; rows sum to 1)."""
    experts = np.asarray(experts, np.int64)
    if experts.ndim != 3:
        raise AnalysisError(f"experts must be (tokens, layers, k), got shape {experts.shape}")
    _check_ids(experts, num_experts)
    n, num_layers, k = experts.shape
    if n == 0:
        raise AnalysisError("no tokens to count")
    offsets = np.arange(num_layers)[None, :, None] * num_experts  # (1, L, 1)
    counts = np.bincount((experts + offsets).ravel(), minlength=num_layers * num_experts)
    return counts.reshape(num_layers, num_experts) / (n * k)  # (L, E)


def _usage_distance(usage_a: np.ndarray, usage_b: np.ndarray) -> np.ndarray:
    """Per layer total variation distance 0.5 * sum_e |a_e - b_e| between two (L, E) usage tables."""
    return 0.5 * np.abs(usage_a - usage_b).sum(-1)


def _problem_counts(experts: np.ndarray, groups: np.ndarray, num_experts: int) -> np.ndarray:
    """(P, L, E) expert slot counts per problem (groups: (N,) problem index 0..P-1)."""
    n, num_layers, k = experts.shape
    num_groups = int(groups.max()) + 1
    idx = (groups[:, None, None] * num_layers + np.arange(num_layers)[None, :, None]) * num_experts + experts
    counts = np.bincount(idx.ravel(), minlength=num_groups * num_layers * num_experts)
    return counts.reshape(num_groups, num_layers, num_experts)


def usage_difference_test(experts: np.ndarray, problems: Sequence, labels: Sequence, num_experts: int,
                          permutations: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Do two datasets use the experts differently? Per layer, two tests of the same hypothesis.

    * **chi-square** of the (dataset x expert) slot-count table (Pearson): treats every routing slot as
      an independent draw. Tokens of one problem are not independent (shared context, and a small
      model's generations repeat), so its p-values are far too small; shown because it is what one
      usually reaches for.
    * **problem-level permutation test**: statistic = total variation distance between the two
      datasets' expert usage; the null distribution comes from shuffling the dataset labels of whole
      problems (``permutations`` times), so within-problem dependence is respected. The p-value is
      (1 + #{perm >= observed}) / (1 + permutations); a max-statistic over layers also gives a
      family-wise p-value (``p_perm_fwer``).

    experts: (N, L, k); problems: (N,) a problem key per token; labels: (N,) exactly two dataset
    names, constant within a problem."""
    experts = np.asarray(experts, np.int64)
    codes, problem_idx = np.unique(np.asarray(problems), return_inverse=True)
    labels = np.asarray(labels)
    names = list(dict.fromkeys(labels.tolist()))
    if len(names) != 2:
        raise AnalysisError(f"the test compares exactly two datasets, got {names}")
    if len(labels) != len(experts) or len(problem_idx) != len(experts):
        raise AnalysisError("experts, problems and labels must have one entry per token")
    _check_ids(experts, num_experts)
    if permutations < 1:
        raise AnalysisError(f"permutations must be >= 1, got {permutations}")
    per_problem = _problem_counts(experts, problem_idx, num_experts)  # (P, L, E)
    problem_label = np.zeros(len(codes), bool)
    problem_label[problem_idx] = labels == names[1]
    mixed = np.zeros(len(codes), np.int64)
    np.add.at(mixed, problem_idx, (labels == names[1]).astype(np.int64))
    if np.any((mixed > 0) & (mixed < np.bincount(problem_idx))):
        raise AnalysisError("a problem has tokens of both datasets: give problem keys unique across datasets")

    def distance(is_b: np.ndarray) -> np.ndarray:  # is_b: (P,) -> (L,)
        a, b = per_problem[~is_b].sum(0), per_problem[is_b].sum(0)  # (L, E)
        return _usage_distance(a / a.sum(-1, keepdims=True), b / b.sum(-1, keepdims=True))

    observed = distance(problem_label)  # (L,)
    rng = np.random.default_rng(seed)
    null = np.stack([distance(rng.permutation(problem_label)) for _ in range(permutations)])  # (R, L)
    rows = []
    for layer in range(experts.shape[1]):
        table = np.stack([per_problem[~problem_label, layer].sum(0), per_problem[problem_label, layer].sum(0)])
        table = table[:, table.sum(0) > 0]  # experts neither dataset used carry no information
        chi2, dof, p_chi2 = chi_square(table)
        rows.append({"layer": layer, "tv_distance": observed[layer], "null_mean": null[:, layer].mean(),
                     "chi2": chi2, "dof": dof, "p_chi2": p_chi2,
                     "p_perm": (1 + (null[:, layer] >= observed[layer]).sum()) / (1 + permutations)})
    out = pd.DataFrame(rows)
    max_null = null.max(1)  # (R,): the largest distance over layers in each permutation
    out["p_perm_fwer"] = [(1 + (max_null >= d).sum()) / (1 + permutations) for d in observed]
    out.attrs.update(datasets=names, problems=len(codes), permutations=permutations,
                     min_p=1 / (1 + permutations))
    return out


def chi_square(table: np.ndarray) -> tuple[float, int, float]:
    """Pearson's chi-square test of independence of an (R, C) contingency table of counts.

    Returns (statistic, degrees of freedom, p-value); p = Q(dof/2, stat/2), the regularised upper
    incomplete gamma function (the chi-square survival function), computed in float64 by torch."""
    import torch

    table = np.asarray(table, np.float64)
    if table.ndim != 2 or min(table.shape) < 2:
        raise AnalysisError(f"a contingency table needs at least 2 rows and 2 columns, got {table.shape}")
    if (table.sum(0) == 0).any() or (table.sum(1) == 0).any():
        raise AnalysisError("a contingency table has an all-zero row or column")
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    dof = (table.shape[0] - 1) * (table.shape[1] - 1)
    p = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    return stat, dof, float(p)


def sample_tokens(num_tokens: int, sample_size: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``sample_size`` tokens drawn without replacement (all when None or larger)."""
    if sample_size is not None and sample_size < 1:
        raise AnalysisError(f"sample_size must be >= 1 or None (all tokens), got {sample_size}")
    if sample_size is None or sample_size >= num_tokens:
        return np.arange(num_tokens)
    return np.sort(np.random.default_rng(seed).choice(num_tokens, size=sample_size, replace=False))


def chance_uncertainty(num_tokens: int, num_experts: int) -> float:
    """Expected plug-in U for independent uniform layers: Miller's bias (E-1)^2 / (2 N ln 2) bits over
    H = log2 E -- the floor below which a heatmap entry means nothing."""
    return (num_experts - 1) ** 2 / (2 * num_tokens * math.log(2)) / math.log2(num_experts)


def path_tokens(experts: np.ndarray, token_texts: Sequence[str], paths: Sequence[str], top: int = 5) -> pd.DataFrame:
    """For each path of :func:`path_counts` ("4-7-0-..."), the ``top`` most frequent tokens that took
    it, as "text ×count" strings, and how many distinct tokens did."""
    first = top1(experts)  # (N, L)
    texts = np.asarray(token_texts, dtype=object)
    if len(texts) != len(first):
        raise AnalysisError(f"{len(texts)} token texts for {len(first)} tokens")
    rows = []
    for path in paths:
        route = np.array([int(e) for e in path.split("-")])
        on = (first[:, :len(route)] == route).all(1)
        counts = pd.Series(texts[on]).value_counts()
        rows.append({"path": path, "distinct_tokens": len(counts),
                     "top_tokens": "  ".join(f"{t!r}×{c}" for t, c in counts.head(top).items())})
    return pd.DataFrame(rows)
