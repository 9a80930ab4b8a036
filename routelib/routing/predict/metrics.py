"""How well a ranking of experts predicts one MoE layer's routing: four metrics and their chance levels (notebook 05).

The Mixtral routing project that notebook 05 tests reports top-1 and top-2 accuracy of next-layer expert predictors on
Mixtral-8x7B (random 12.5 %, lookup tables 42 %, an MLP 55.6 % top-1 / 73.2 % top-2); these are its
metrics, plus two about the whole top-k set. Every predictor (:mod:`.predictors`) returns *scores*
``(N, E)`` for the target layer (higher = more likely); the metrics read only the ranking. Ties are
broken towards the lower expert id (a stable sort of ``-scores``, :func:`rank_experts`).

Metrics (:func:`routing_metrics`), per token, then averaged over the test tokens of one source layer;
"averaged over layers" is the unweighted mean over source layers (each layer sees the same tokens):

==============  ==================================================================================
``top1``        top-1 accuracy: the predicted top-1 expert is the true top-1 (highest gate weight)
``top2_hit``    the true top-1 expert is among the predicted top-2
``set_recall``  ``|predicted top-k ∩ true top-k| / k`` (k = the model's experts per token)
``exact_set``   the predicted top-k *set* equals the true top-k set (order ignored)
==============  ==================================================================================

Chance (a uniformly random ranking, :func:`chance_metrics`): top1 = 1/E, top2_hit = 2/E,
set_recall = k/E, exact_set = 1/C(E, k) -- for E = 8, k = 2: 12.5 %, 25 %, 25 %, 3.57 %.
"""

from __future__ import annotations

import math

import numpy as np

from routelib.routing.predict.dataset import PredictorError

METRICS = ("top1", "top2_hit", "set_recall", "exact_set")


def rank_experts(scores: np.ndarray, m: int | None = None) -> np.ndarray:
    """(N, E) scores -> (N, m) expert ids, best first; ties go to the lower expert id."""
    order = np.argsort(-np.asarray(scores, np.float64), axis=1, kind="stable")  # (N, E)
    return order if m is None else order[:, :m]


def routing_metrics_per_token(scores: np.ndarray, experts: np.ndarray) -> dict[str, np.ndarray]:
    """The four metrics (module docstring) per token: scores (N, E), true experts (N, k), slot 0 the
    top-1. Returns {metric: (N,) float}."""
    scores, experts = np.asarray(scores), np.asarray(experts)
    if scores.ndim != 2 or experts.ndim != 2 or scores.shape[0] != experts.shape[0]:
        raise PredictorError(f"scores (N, E) and experts (N, k) expected, got {scores.shape} and {experts.shape}")
    num_experts, k = scores.shape[1], experts.shape[1]
    if num_experts < 2 or k > num_experts:
        raise PredictorError(f"need E >= 2 experts and k <= E, got E={num_experts}, k={k}")
    ranked = rank_experts(scores, max(k, 2))  # (N, max(k, 2))
    hits = (ranked[:, :k, None] == experts[:, None, :]).any(2)  # (N, k): predicted slot j is a true expert
    return {"top1": (ranked[:, 0] == experts[:, 0]).astype(float),
            "top2_hit": (ranked[:, :2] == experts[:, :1]).any(1).astype(float),
            "set_recall": hits.mean(1),
            "exact_set": hits.all(1).astype(float)}


def routing_metrics(scores: np.ndarray, experts: np.ndarray) -> dict[str, float]:
    """The four metrics averaged over tokens (NaN for no tokens)."""
    per = routing_metrics_per_token(scores, experts)
    return {name: float(v.mean()) if v.size else float("nan") for name, v in per.items()}


def chance_metrics(num_experts: int, top_k: int) -> dict[str, float]:
    """Expected metrics of a uniformly random ranking of E experts against a true top-k set."""
    if num_experts < 2 or not 1 <= top_k <= num_experts:
        raise PredictorError(f"need E >= 2 and 1 <= k <= E, got E={num_experts}, k={top_k}")
    return {"top1": 1 / num_experts, "top2_hit": 2 / num_experts, "set_recall": top_k / num_experts,
            "exact_set": 1 / math.comb(num_experts, top_k)}
