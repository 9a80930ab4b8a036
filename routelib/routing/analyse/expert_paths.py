"""Paths, not experts: does a token's sequence of experts over the layers say more about the token than
any single layer's expert -- beyond what splitting tokens into more, smaller groups gives by itself?

Ye, Yuan & Sharkey (2026, "Polysemantic Experts, Monosemantic Paths: Routing as Control in MoEs",
arXiv 2604.17837) report that single experts stay polysemantic while paths cluster tokens by function,
and that each layer's hidden state splits into a *control* part -- its projection onto the row space of
the router's weight matrix, all the router sees -- and an orthogonal *content* part. This module holds
the measurements, for any routing (the project's pathways and MoE traces alike):

- :func:`path_ids`: each token's path over chosen layers (top-1 per layer, or the top-k set per layer);
- :func:`specificity`: normalised mutual information between a label (token id, role) and a grouping
  (expert, pathway, path), against a **permutation null** -- the same groups with the same sizes,
  labels shuffled -- so that many small groups cannot produce the result (paths have many more groups
  than experts, which alone raises naive purity); the excess over the null is what counts;
- :func:`independent_layers`: the controls that keep every layer's expert marginals -- overall, or
  given a label such as the token id -- and break the dependence between layers;
- :func:`control_content`: the split of hidden states by a router matrix, exact: control + content =
  the state, and the router's logits depend on the control part only;
- :func:`principal_angles`: how far two layers' control subspaces are rotated from each other, beside
  :func:`random_subspace_angles`, the same for random subspaces of the same dimensions.
"""

from __future__ import annotations

import numpy as np

from routelib.errors import ConfigError


def path_ids(experts: np.ndarray, layers=None, top1: bool = True) -> np.ndarray:
    """(N,) int ids of each token's path over ``layers`` (default all) of ``experts`` (N, L, k): the
    first choice per layer, or (``top1=False``) the unordered top-k set per layer."""
    experts = np.asarray(experts)
    if experts.ndim != 3:
        raise ConfigError(f"experts: expected (tokens, layers, k), got shape {experts.shape}")
    layers = list(range(experts.shape[1])) if layers is None else list(layers)
    if not layers or min(layers) < 0 or max(layers) >= experts.shape[1]:
        raise ConfigError(f"layers {layers}: choose among 0..{experts.shape[1] - 1}")
    chosen = experts[:, layers, :1] if top1 else np.sort(experts[:, layers], axis=2)
    return row_ids(chosen.reshape(len(experts), -1))


def row_ids(rows: np.ndarray) -> np.ndarray:
    """(N,) ids of the distinct rows of ``rows`` (N, m), ascending in their lexicographic order: one 1-D
    ``unique`` of a mixed-radix code of each row where it fits in int64 (many times faster than a row-wise
    ``unique``, which bootstraps need), else the row-wise ``unique`` itself."""
    rows = np.asarray(rows).astype(np.int64)
    base = int(rows.max()) + 1 if rows.size else 1
    if rows.size and rows.min() >= 0 and base ** rows.shape[1] < 2 ** 62:
        code = rows @ (base ** np.arange(rows.shape[1] - 1, -1, -1, dtype=np.int64))  # (N,)
        return np.unique(code, return_inverse=True)[1].ravel()
    return np.unique(rows, axis=0, return_inverse=True)[1].ravel()


def _entropy_of(ids: np.ndarray) -> float:
    counts = np.bincount(ids)
    p = counts[counts > 0] / len(ids)
    return float(-(p * np.log(p)).sum())


def normalized_mi(labels: np.ndarray, groups: np.ndarray) -> float:
    """I(label; group) / H(label): the share of the label's entropy that the group removes (0..1)."""
    _, lab = np.unique(np.asarray(labels), return_inverse=True)
    _, grp = np.unique(np.asarray(groups), return_inverse=True)
    h_label = _entropy_of(lab)
    if h_label == 0:
        return 0.0
    joint = lab * (grp.max() + 1) + grp
    mi = h_label + _entropy_of(grp) - _entropy_of(np.unique(joint, return_inverse=True)[1])
    return float(mi / h_label)


def specificity(labels: np.ndarray, groups: np.ndarray, permutations: int = 20, seed: int = 0) -> dict[str, float]:
    """Normalised MI of ``labels`` with ``groups``, the mean and 95th percentile of the same with the
    labels shuffled over the tokens (same groups, same sizes: the size-matched null), and the excess
    (observed minus null mean). ``groups`` may be experts, pathways or :func:`path_ids`."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    if len(labels) != len(groups) or len(labels) < 2:
        raise ConfigError(f"labels and groups: need two or more tokens of each, got {len(labels)} and {len(groups)}")
    rng = np.random.default_rng(seed)
    observed = normalized_mi(labels, groups)
    null = np.array([normalized_mi(rng.permutation(labels), groups) for _ in range(permutations)])
    return {"nmi": observed, "null_mean": float(null.mean()), "null_p95": float(np.quantile(null, 0.95)),
            "excess": observed - float(null.mean()), "groups": int(len(np.unique(groups)))}


def independent_layers(experts: np.ndarray, seed: int = 0, within: np.ndarray | None = None) -> np.ndarray:
    """``experts`` (N, L, k) with each layer's rows permuted independently: across all tokens (every
    layer's usage kept; the dependence between layers and on the token broken), or, with ``within``
    (a label per token, e.g. its token id), only among tokens of the same label (each layer's
    label -> expert statistics kept; the dependence between layers *given* the label broken)."""
    rng = np.random.default_rng(seed)
    experts = np.asarray(experts)
    if within is None:
        return np.stack([experts[rng.permutation(len(experts)), layer] for layer in range(experts.shape[1])], axis=1)
    within = np.asarray(within)
    if len(within) != len(experts):
        raise ConfigError(f"within: one label per token, got {len(within)} for {len(experts)}")
    order = np.argsort(within, kind="stable")
    starts = np.flatnonzero(np.r_[True, within[order][1:] != within[order][:-1]])
    out = experts.copy()
    for layer in range(experts.shape[1]):
        shuffled = order.copy()
        for a, b in zip(starts, np.r_[starts[1:], len(order)]):
            shuffled[a:b] = rng.permutation(order[a:b])
        out[order, layer] = experts[shuffled, layer]
    return out


def control_content(hidden: np.ndarray, router: np.ndarray, rtol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Split hidden states (N, H) by a router matrix (E, H): control = the projection onto the router's
    row space (what its logits read), content = the rest. control + content = hidden exactly (up to
    float error) and router @ content = 0."""
    hidden, router = np.asarray(hidden, np.float64), np.asarray(router, np.float64)
    if hidden.ndim != 2 or router.ndim != 2 or hidden.shape[1] != router.shape[1]:
        raise ConfigError(f"hidden (N, H) and router (E, H) must share H: got {hidden.shape} and {router.shape}")
    basis = row_space(router, rtol)  # (r, H) orthonormal rows
    control = hidden @ basis.T @ basis  # (N, H)
    return control, hidden - control


def row_space(matrix: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """An orthonormal basis (r, H) of the row space of ``matrix`` (E, H), rank r by singular values
    above ``rtol`` times the largest."""
    _, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    return vt[s > rtol * s.max()] if s.size and s.max() > 0 else vt[:0]


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between the row spaces of ``a`` (E1, H) and ``b`` (E2, H)."""
    qa, qb = row_space(a), row_space(b)
    s = np.linalg.svd(qa @ qb.T, compute_uv=False)
    return np.arccos(np.clip(s, -1.0, 1.0))


def random_subspace_angles(rank_a: int, rank_b: int, dim: int, draws: int = 20, seed: int = 0) -> np.ndarray:
    """(draws, min(rank_a, rank_b)) principal angles between random subspaces of ``dim``-space: the null
    for :func:`principal_angles` (random subspaces of a large space are nearly orthogonal)."""
    rng = np.random.default_rng(seed)
    return np.stack([principal_angles(rng.standard_normal((rank_a, dim)), rng.standard_normal((rank_b, dim)))
                     for _ in range(draws)])
