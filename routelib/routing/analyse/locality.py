"""Routing across consecutive tokens: how often a token goes to the experts of the token before it.

The routing analysis of the Mixtral paper (Jiang et al. 2024, "Mixtral of Experts", §5) is across
*tokens*, not layers: per layer and per domain, the share of consecutive tokens assigned the same
expert -- as first choice, and as "first or second choice" -- against random assignment. It finds
little domain specialisation but strong *locality*: consecutive tokens share experts far more often
than chance at the later layers (layers 15 and 31), barely at layer 0. Locality is what makes an
expert cache work during decoding (the next token tends to need the experts still loaded), which
expert-offloading systems rely on (Eliseev & Mazur 2023; MoE-Infinity, Xue et al. 2024).

For the token at position t and the token at t - d of the same sequence (distance d >= 1; d = 1:
consecutive), per MoE layer, three measures (:data:`MEASURES`):

* ``top1_same``: the top-1 experts are equal (the paper's "first choice");
* ``set_shared``: the top-k sets share at least one expert (with k = 2, the paper's "first or second
  choice", as we read it: its random level for 8 experts, 46 %, is exactly 1 - C(6,2)/C(8,2));
* ``set_overlap``: |S_t ∩ S_{t-d}| / k, the expected share of the k experts a cache holding the
  earlier token's set would already have.

Chance levels. Uniform routing gives 1/E, 1 - C(E-k, k)/C(E, k) and k/E -- but a trained router
does not use its experts uniformly, and a skewed layer repeats itself by chance more often. So the
main chance level is *independence with the layer's actual usage*: the earlier and the later
tokens of the pairs drawn independently from their observed distributions p (of the earlier
tokens) and q (of the later ones) -- for ``top1_same`` sum_e p_e q_e (= sum_e p_e^2 when the two
are equal); for ``set_overlap`` sum_e π_e ρ_e / k, where π_e, ρ_e are the shares of earlier/later
tokens whose top-k set contains e (E|S ∩ S'| = sum_e P(e ∈ S) P(e ∈ S') for independent S, S');
for ``set_shared`` 1 - sum_{S, S'} p_S q_S' [S ∩ S' = ∅] over the observed top-k *sets* (their
distribution, not the experts', decides whether two sets meet). ``chance_in_sequence`` is the same
with each sequence's own distributions (averaged with the sequences' pair counts): a sequence
about one topic uses few experts, so part of the locality over the pooled chance is "the same
text", not "the adjacent token"; the excess over this level is what adjacency adds (the plug-in
estimate sum_e p̂_e^2 from n tokens is biased up by about (1 - sum_e p_e^2) / n: small for
sequences of hundreds of tokens).

The interval is a problem-level bootstrap (Efron & Tibshirani 1993): whole sequences resampled
with replacement, the rate recomputed as pooled hits over pooled pairs, the percentile interval --
consecutive tokens of one sequence are dependent, so resampling pairs would be far too narrow.

Phases: ``prompt`` pairs have both tokens in the prompt, ``generated`` both generated; ``all``
counts every pair, including the one across the boundary.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from routelib.errors import RoutelibError

MEASURES = ("top1_same", "set_shared", "set_overlap")
PHASES = ("all", "prompt", "generated")
#: The paper's names for the measures (Jiang et al. 2024, §5, Table 5 / Figure 10).
PAPER_NAMES = {"top1_same": "first choice", "set_shared": "first or second choice"}


class LocalityError(RoutelibError, ValueError):
    """Arrays or parameters the consecutive-token analysis cannot use."""


def previous_rows(sequence: np.ndarray, position: np.ndarray, distance: int = 1) -> np.ndarray:
    """(N,) the row of the token ``distance`` positions earlier in the same sequence, -1 where there
    is none (the first ``distance`` tokens of a sequence, or that row is not among these rows).

    sequence: (N,) integer sequence (problem) ids; position: (N,) positions within it."""
    seq, pos = np.asarray(sequence, np.int64), np.asarray(position, np.int64)
    if seq.shape != pos.shape or seq.ndim != 1:
        raise LocalityError(f"sequence and position must be equal-length 1-D arrays, got {seq.shape}, {pos.shape}")
    if not isinstance(distance, (int, np.integer)) or distance < 1:
        raise LocalityError(f"distance must be an integer >= 1, got {distance!r}")
    if len(seq) == 0:
        return np.zeros(0, np.int64)
    if pos.min() < 0:
        raise LocalityError("positions must be >= 0")
    span = int(pos.max()) + 1
    key = seq * span + pos  # (N,) one key per (sequence, position)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    if (np.diff(sorted_key) == 0).any():
        raise LocalityError("a (sequence, position) occurs twice: positions must be unique within a sequence")
    want = key - distance
    idx = np.minimum(np.searchsorted(sorted_key, want), len(key) - 1)
    found = (sorted_key[idx] == want) & (pos >= distance)
    return np.where(found, order[idx], -1)


def uniform_chance(num_experts: int, top_k: int) -> dict[str, float]:
    """The measures for uniformly random, independent top-k sets: 1/E, 1 - C(E-k, k)/C(E, k), k/E."""
    if not 1 <= top_k <= num_experts:
        raise LocalityError(f"need 1 <= k <= E, got k={top_k}, E={num_experts}")
    disjoint = math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return {"top1_same": 1 / num_experts, "set_shared": 1 - disjoint, "set_overlap": top_k / num_experts}


def pair_hits(experts: np.ndarray, earlier: np.ndarray, later: np.ndarray) -> np.ndarray:
    """(M, L, 3) per pair and layer: top1_same, set_shared, set_overlap (the order of :data:`MEASURES`).

    experts: (N, L, k) expert ids, slot 0 the highest gate weight; earlier, later: (M,) row indices."""
    a, b = experts[earlier], experts[later]  # (M, L, k)
    equal = a[..., :, None] == b[..., None, :]  # (M, L, k, k)
    shared = equal.any(-1).sum(-1)  # (M, L): experts of a also in b (sets: no repeats)
    return np.stack([a[..., 0] == b[..., 0], shared > 0, shared / experts.shape[2]], -1).astype(np.float64)


def _set_ids(experts_layer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) expert ids -> (N,) id of each row's top-k *set* and (U, k) the sorted sets."""
    rows = np.sort(experts_layer, 1)  # (N, k)
    base = int(rows.max()) + 1 if rows.size else 1
    if base ** rows.shape[1] >= 2 ** 62:  # too many possible sets for one integer code
        sets, ids = np.unique(rows, axis=0, return_inverse=True)
        return ids.ravel(), sets
    codes = rows @ (base ** np.arange(rows.shape[1] - 1, -1, -1, dtype=np.int64))  # (N,) base-E digits
    uniq, first, ids = np.unique(codes, return_index=True, return_inverse=True)
    return ids.ravel(), rows[first]


def _disjoint_mass(ga: np.ndarray, gb: np.ndarray, sets: np.ndarray, num_experts: int,
                   chunk: int = 1024) -> np.ndarray:
    """(S,) sum_{u, v} ga[s, u] gb[s, v] [sets u and v are disjoint], for set distributions ga, gb (S, U)."""
    multihot = np.zeros((len(sets), num_experts), np.float32)  # (U, E)
    np.put_along_axis(multihot, sets, 1.0, axis=1)
    out = np.zeros(ga.shape[0])
    for lo in range(0, len(sets), chunk):
        disjoint = (multihot @ multihot[lo:lo + chunk].T) == 0  # (U, C)
        out += ((ga @ disjoint) * gb[:, lo:lo + chunk]).sum(1)  # (S,)
    return out


def set_ids(experts: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer: (N,) id of each token's top-k set and (U, k) the sorted sets; experts (N, L, k)."""
    return [_set_ids(experts[:, layer]) for layer in range(experts.shape[1])]


def chance_levels(experts: np.ndarray, earlier: np.ndarray, later: np.ndarray, seq: np.ndarray,
                  num_experts: int, sets: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Chance of every measure per layer, for the pairs (earlier[i], later[i]) in sequence seq[i]
    (0..S-1): (L, 3) with the pooled usage distributions and (L, 3) with each sequence's own,
    averaged with the sequences' pair counts (module docstring). sets: :func:`set_ids` of
    ``experts`` (computed here when None)."""
    sets = set_ids(experts) if sets is None else sets
    num_pairs = len(earlier)
    num_seq = int(seq.max()) + 1
    n = np.bincount(seq, minlength=num_seq).astype(np.float64)  # (S,) pairs per sequence
    weight = n / num_pairs  # (S,)
    num_layers, k = experts.shape[1:]
    pooled, within = np.zeros((num_layers, 3)), np.zeros((num_layers, 3))

    def dist(values: np.ndarray, size: int) -> np.ndarray:
        """(S, size) per-sequence distribution of values (M, j) (j slots per pair), rows sum to j."""
        idx = np.repeat(seq, values.shape[1]) * size + values.ravel()
        counts = np.bincount(idx, minlength=num_seq * size).reshape(num_seq, size)
        return counts / np.maximum(n, 1)[:, None]

    for layer in range(num_layers):
        ea, eb = experts[earlier, layer], experts[later, layer]  # (M, k)
        top_a, top_b = dist(ea[:, :1], num_experts), dist(eb[:, :1], num_experts)  # (S, E)
        inc_a, inc_b = dist(ea, num_experts), dist(eb, num_experts)  # (S, E) inclusion shares
        ids, layer_sets = sets[layer]
        set_a = dist(ids[earlier, None], len(layer_sets))  # (S, U)
        set_b = dist(ids[later, None], len(layer_sets))
        for j, (pa, pb) in enumerate(((top_a, top_b), (inc_a, inc_b))):
            scale = 1.0 if j == 0 else 1.0 / k
            pooled[layer, 2 * j] = scale * (weight @ pa) @ (weight @ pb)
            within[layer, 2 * j] = scale * weight @ (pa * pb).sum(1)
        pooled[layer, 1] = 1 - _disjoint_mass((weight @ set_a)[None], (weight @ set_b)[None], layer_sets,
                                              num_experts)[0]
        within[layer, 1] = 1 - weight @ _disjoint_mass(set_a, set_b, layer_sets, num_experts)
    return pooled, within


def bootstrap_interval(hits: np.ndarray, seq: np.ndarray, resamples: int = 1000, seed=0,
                       confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of the pooled rate hits.mean(0) when whole sequences are resampled with
    replacement. hits: (M, C) per pair (any number of columns); seq: (M,) sequence index 0..S-1.
    Returns (low, high), each (C,); NaN for both when ``resamples`` is 0."""
    if not 0 < confidence < 1:
        raise LocalityError(f"confidence must lie in (0, 1), got {confidence}")
    columns = hits.shape[1]
    if resamples < 1:
        return np.full(columns, np.nan), np.full(columns, np.nan)
    present, seq = np.unique(seq, return_inverse=True)
    num_seq = len(present)
    sums = np.stack([np.bincount(seq, weights=hits[:, c], minlength=num_seq) for c in range(columns)], 1)  # (S, C)
    counts = np.bincount(seq, minlength=num_seq).astype(np.float64)  # (S,)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(num_seq, np.full(num_seq, 1 / num_seq), size=resamples).astype(np.float64)  # (B, S)
    rates = (draws @ sums) / np.maximum(draws @ counts, 1)[:, None]  # (B, C)
    tail = 100 * (1 - confidence) / 2
    return np.percentile(rates, tail, axis=0), np.percentile(rates, 100 - tail, axis=0)


def consecutive_routing(experts: np.ndarray, sequence: Sequence, position: np.ndarray, num_experts: int, *,
                        generated: np.ndarray | None = None, groups: Sequence | None = None,
                        distances: Sequence[int] = (1,), phases: Sequence[str] = PHASES, bootstrap: int = 1000,
                        seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """The three measures (module docstring) for every group, phase, distance, layer, with chance levels
    and a sequence-level bootstrap interval.

    experts: (N, L, k) expert ids (slot 0 the highest gate weight); sequence: (N,) sequence labels
    (any hashable: a problem); position: (N,) positions within the sequence; generated: (N,) bool
    phase (None: all "prompt", and only the phase "all" is meaningful); groups: (N,) labels such as
    the dataset (a sequence must lie in one group), reported one by one and pooled as "all".

    One row per (group, phase, distance, layer, measure), columns: group, phase, distance, layer,
    measure, pairs, sequences, rate, ci_low, ci_high, chance (independence with the usage of these
    tokens), chance_in_sequence (with each sequence's own usage), chance_uniform (uniform routing)
    and lift = rate / chance. Groups or phases without pairs at a distance are left out.
    """
    experts = np.asarray(experts, np.int64)
    if experts.ndim != 3 or experts.shape[2] < 1:
        raise LocalityError(f"experts must be (tokens, layers, k), got shape {experts.shape}")
    n, num_layers, k = experts.shape
    if experts.size and (experts.min() < 0 or experts.max() >= num_experts):
        raise LocalityError(f"expert ids must lie in [0, {num_experts}), found {experts.min()}..{experts.max()}")
    seq_codes, _ = pd.factorize(pd.Series(list(sequence)) if not isinstance(sequence, np.ndarray) else sequence)
    seq_codes = np.asarray(seq_codes, np.int64)
    position = np.asarray(position, np.int64)
    generated = np.zeros(n, bool) if generated is None else np.asarray(generated, bool)
    group_labels = np.asarray(groups, dtype=object) if groups is not None else np.full(n, "all", dtype=object)
    if not (len(seq_codes) == len(position) == len(generated) == len(group_labels) == n):
        raise LocalityError(f"sequence, position, generated and groups need one entry per token ({n})")
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise LocalityError(f"unknown phase(s) {unknown or phases!r}; choose from {PHASES}")
    distances = list(distances)
    if not distances or min(distances) < 1:
        raise LocalityError(f"distances must be integers >= 1, got {distances}")
    if n and pd.Series(group_labels).groupby(seq_codes).nunique().max() > 1:
        raise LocalityError("a sequence has tokens in two groups: groups must be constant within a sequence")
    names = list(dict.fromkeys(group_labels.tolist()))
    group_sets = [("all", np.ones(n, bool))] + ([(g, group_labels == g) for g in names] if groups is not None else [])
    uniform = uniform_chance(num_experts, k)
    sets = set_ids(experts)
    rows = []
    for distance in distances:
        earlier_all = previous_rows(seq_codes, position, distance)
        later_all = np.flatnonzero(earlier_all >= 0)
        earlier_all = earlier_all[later_all]
        hits_all = pair_hits(experts, earlier_all, later_all) if len(later_all) else np.zeros((0, num_layers, 3))
        for gi, (group, in_group) in enumerate(group_sets):
            for pi, phase in enumerate(phases):
                keep = in_group[later_all]
                if phase != "all":
                    want = phase == "generated"
                    keep &= (generated[later_all] == want) & (generated[earlier_all] == want)
                if not keep.any():
                    continue
                a, b = earlier_all[keep], later_all[keep]
                seq = np.unique(seq_codes[b], return_inverse=True)[1].ravel()  # 0..S-1
                hits = hits_all[keep]  # (M, L, 3)
                pooled, within = chance_levels(experts, a, b, seq, num_experts, sets)
                low, high = bootstrap_interval(hits.reshape(len(a), -1), seq, bootstrap, [seed, gi, pi, distance],
                                               confidence)
                rate = hits.mean(0)  # (L, 3)
                low, high = low.reshape(num_layers, 3), high.reshape(num_layers, 3)
                for layer in range(num_layers):
                    for m, measure in enumerate(MEASURES):
                        rows.append({"group": group, "phase": phase, "distance": distance, "layer": layer,
                                     "measure": measure, "pairs": len(a), "sequences": int(seq.max()) + 1,
                                     "rate": rate[layer, m], "ci_low": low[layer, m], "ci_high": high[layer, m],
                                     "chance": pooled[layer, m], "chance_in_sequence": within[layer, m],
                                     "chance_uniform": uniform[measure]})
    table = pd.DataFrame(rows)
    if not table.empty:
        table["lift"] = table["rate"] / table["chance"]
    return table


def paper_view(table: pd.DataFrame, *, distance: int = 1, phase: str = "all",
               layers: Sequence[int] | None = None) -> pd.DataFrame:
    """The Mixtral paper's presentation (Table 5): the first and the last layer and the middle one
    (index L // 2, by default), "first choice" and "first or second choice" per group, each beside its
    chance level; rows (group, layer), columns (measure, rate / chance / chance_uniform)."""
    rows = table[(table["distance"] == distance) & (table["phase"] == phase) & table["measure"].isin(PAPER_NAMES)]
    if rows.empty:
        raise LocalityError(f"no rows for distance {distance}, phase {phase!r}")
    num_layers = int(table["layer"].max()) + 1
    layers = sorted({0, num_layers // 2, num_layers - 1}) if layers is None else list(layers)
    rows = rows[rows["layer"].isin(layers)].assign(measure=lambda df: df["measure"].map(PAPER_NAMES))
    out = rows.pivot_table(index=["group", "layer"], columns="measure", values=["rate", "chance", "chance_uniform"],
                           sort=False)
    return out.swaplevel(0, 1, axis=1).sort_index(axis=1, level=0, sort_remaining=False)[
        [(m, v) for m in PAPER_NAMES.values() for v in ("rate", "chance", "chance_uniform")]]
