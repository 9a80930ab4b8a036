"""MoEfication's router objective: a linear router trained to predict which experts matter for a token.

Zhang et al. 2022 (MoEfication, §3.2) train each layer's router as a multi-label classifier: the
label of expert e on token x is 1 when e is among the experts whose outputs matter most for x, and the
router is fitted on the dense model's own inputs to that layer, before any further training. Here the
experts that matter are the k with the largest output norm ||y_e(x)|| (the oracle of
:class:`routelib.subject.moefy.MoEfiedMLP`), and the router is fitted by full-batch Adam on binary
cross-entropy -- the routers then rank experts by how likely each is to be among the k largest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from routelib.errors import ConfigError


@dataclass(frozen=True)
class RouterFitConfig:
    """How one layer's router is fitted."""

    steps: int = 300  # full-batch Adam steps
    lr: float = 0.01  # Adam learning rate
    weight_decay: float = 0.0  # L2 on the router weights
    seed: int = 0  # initialisation of the router weights


def oracle_labels(norms: torch.Tensor, top_k: int) -> torch.Tensor:
    """norms: (n, E) output norms ||y_e|| -> (n, E) float 0/1, 1 on each token's ``top_k`` largest."""
    if not 1 <= top_k <= norms.shape[1]:
        raise ConfigError(f"top_k={top_k} must be in [1, {norms.shape[1]}]")
    labels = torch.zeros_like(norms, dtype=torch.float32)
    return labels.scatter_(1, torch.topk(norms, top_k, dim=1).indices, 1.0)


def fit_router(x: torch.Tensor, norms: torch.Tensor, top_k: int, cfg: RouterFitConfig = RouterFitConfig()
               ) -> tuple[torch.Tensor, dict]:
    """Fit a bias-free linear router: x (n, H) a layer's MLP inputs, norms (n, E) its experts' output
    norms -> (weight (E, H), stats). stats: final BCE loss and the router's top-k agreement with the
    oracle (mean fraction of the k experts both pick) on the fitting tokens."""
    if x.ndim != 2 or norms.ndim != 2 or x.shape[0] != norms.shape[0]:
        raise ConfigError(f"fit_router: x (n, H) and norms (n, E) must have the same n, got "
                          f"{tuple(x.shape)} and {tuple(norms.shape)}")
    labels = oracle_labels(norms, top_k)  # (n, E)
    x = x.float()
    scale = x.pow(2).mean().sqrt().clamp_min(1e-6)  # inputs to unit RMS: one learning rate fits every layer
    xs = x / scale  # (n, H), scaled once
    g = torch.Generator().manual_seed(cfg.seed)
    w = (torch.randn(norms.shape[1], x.shape[1], generator=g) * 0.01).requires_grad_(True)  # (E, H)
    opt = torch.optim.Adam([w], lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xs @ w.T, labels)
        loss.backward()
        opt.step()
    weight = (w.detach() / scale)  # (E, H): the router acts on unscaled inputs
    with torch.no_grad():
        picked = torch.topk(x @ weight.T, top_k, dim=1).indices  # (n, k)
        agree = labels.gather(1, picked).mean().item()
    return weight, {"bce": float(loss.item()), "agreement": agree}


__all__ = ["RouterFitConfig", "fit_router", "oracle_labels"]
