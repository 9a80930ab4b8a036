"""Pathway routing inside the MLPs of a pretrained causal LM, with Global-Batch Load Balancing.

The idea (from the pathway-routing project notebook 01 tests): split each routed MLP into N "pathways", let a learned router pick the
top-k of them per token (16 pathways, top-4, every other layer), train with a load-balancing loss
"GLBL = N x sum_i frequency_i x score_i" kept honest by momentum-updated global statistics, then
ask whether pathways become monosemantic (see :mod:`routelib.metrics`).

References:
1) Lepikhin et al. 2020, "GShard" and Fedus et al. 2021, "Switch Transformer" -- top-k softmax
   routing and the per-batch auxiliary loss ``N * sum_i f_i * P_i`` (here :func:`switch_loss`,
   which is :func:`routelib.models.moe.load_balancing_loss`).
2) Qiu et al. 2025, "Demons in the Detail: On Implementing Load Balancing Loss for Training
   Specialized Mixture-of-Expert Models" (ACL 2025) -- global-batch load balancing: compute the
   frequencies f_i over the *global* batch (all data-parallel ranks, all micro-batches) instead of
   each micro-batch, which lets experts specialise by domain while staying balanced overall.
3) Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts" --
   splitting the neurons of a pretrained dense FFN into groups that act as experts.

Pathways. A routed MLP keeps the pretrained weights and splits its intermediate dimension I into
N contiguous neuron groups: pathway p owns neurons [p*I/N, (p+1)*I/N) -- those rows of gate_proj
and up_proj (Llama/SmolLM2/Qwen/Mistral gated MLP) or of c_fc (GPT-2), their biases, and those
columns of down_proj / c_proj. Because the output projection is linear,

    MLP(x) = sum_{p=1..N} MLP_p(x) + b_out          (b_out: the output bias, shared, added once)

exactly, so the routed layer ``y = b_out + sum_{p in topk(x)} w_p(x) * MLP_p(x)`` reproduces the
pretrained MLP when every pathway is on with w_p = 1 (``mode="all"``, used to check exactness).
Gates: the router's top-k probabilities renormalised over the k chosen and multiplied by k
(``normalize_topk=True``; False uses N * p), so a uniform router gives every chosen pathway weight
1: an untrained router starts as "the plain sum of the chosen pathways of the pretrained MLP"
(``gate_scale`` multiplies all gates, e.g. N/k for an unbiased estimate of the full MLP).

Two implementations of the same function (``impl``):

- ``dense_masked``  compute all N pathways (the whole MLP), zero the unchosen ones, weight the rest;
                    no compute saved -- the original project's approach, kept as the reference;
- ``sparse``        sort the token-slots (token, chosen pathway) by pathway and run grouped GEMMs
                    (:func:`routelib.models.moe.grouped_matmul`) over the pathways' weight slices,
                    which are *views* of the pretrained weights: only k/N of the MLP FLOPs.

What the code of the original project ("Pathway LLM", docs/design.md §6) got wrong and what this
module does instead:

- its pathways were block-diagonal slices of *both* MLP dimensions, so all 16 did not add up to
  the original MLP -> here pathways split the intermediate dimension only and sum to it exactly;
- every pathway was computed and masked -> ``sparse`` computes only the chosen ones;
- its "GLBL" used the mean router probability as both frequency and score (``16 * sum_i pbar_i^2``)
  and its momentum statistics never entered the loss -> here frequency_i is the fraction of top-k
  *selections* going to pathway i (a count, no gradient), accumulated over the global batch and
  smoothed by a momentum EMA that *is* the frequency in the loss; score_i is the mean router
  probability of the current batch (differentiable):

    L_GLBL = N * sum_i fbar_i * P_i,   fbar <- m * fbar + (1 - m) * f_global   (before use)

  with f_global = (selections of i summed over all ranks) / (all selections), all_reduced when
  torch.distributed is initialised. With m = 0 on one process it equals the Switch loss. Balanced
  routing gives 1; k pathways taking everything gives N/k.

Usage::

    model, tok = load_pretrained("smollm2-135m")
    routed = RoutedLLM(model, RoutingConfig(num_pathways=16, top_k_pathways=4))   # edits model in place
    out = routed(input_ids, labels=input_ids)       # out.logits, out.loss (= LM + aux), out.aux_loss
    out.routing[0].indices                          # (B, T, k) pathways chosen at the first routed layer
    routed.set_mode("all")                          # every pathway, unit weights: the base model's logits
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from routelib.errors import ConfigError
from routelib.models.moe import grouped_matmul, load_balancing_loss

IMPLS = ("sparse", "dense_masked")
MODES = ("routed", "all")
ROUTER_INITS = ("normal", "zeros")


@dataclass
class RoutingConfig:
    num_pathways: int = 16  # N: neuron groups each routed MLP is split into (I must be divisible by N)
    top_k_pathways: int = 4  # k: pathways active per token
    route_every_n_layers: int = 2  # route the MLP of layers 0, n, 2n, ... (the original project: every other layer)
    routed_layers: tuple[int, ...] | None = None  # explicit decoder-layer indices; overrides the above
    normalize_topk: bool = True  # gates = k * (top-k probs renormalised over k), summing to k;
    # False: gates = N * probs. Either way a uniform router gives every chosen pathway weight 1
    gate_scale: float = 1.0  # multiplies every gate; N/k makes a uniformly random choice of pathways an
    # unbiased estimate of the full MLP (1.0: the chosen pathways' plain sum at a uniform router)
    glbl_weight: float = 0.01  # weight of the Global-Batch Load Balancing loss in aux_loss
    switch_weight: float = 0.0  # weight of the per-batch Switch loss in aux_loss (0: computed, logged only)
    momentum: float = 0.9  # EMA of the global selection frequencies: fbar <- m*fbar + (1-m)*f_batch;
    # 0 = the current global batch only. The first update sets fbar = f_batch
    sync_across_ranks: bool = True  # all_reduce the selection counts over data-parallel ranks (if initialised);
    # False = per-rank EMA (DDP still broadcasts rank 0's buffers each forward unless broadcast_buffers=False)
    router_init: Literal["normal", "zeros"] = "normal"  # "normal": N(0, router_init_std) weights, so tokens
    # spread over pathways from the start; "zeros": uniform probs, ties -> every token picks pathways 0..k-1
    router_init_std: float = 0.02  # std of the router weights for router_init="normal"
    impl: Literal["sparse", "dense_masked"] = "sparse"  # same outputs; sparse computes only the chosen pathways

    def __post_init__(self):
        for name in ("num_pathways", "top_k_pathways", "route_every_n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"RoutingConfig.{name} must be a positive int, got {value!r}")
        if self.top_k_pathways > self.num_pathways:
            raise ConfigError(f"RoutingConfig.top_k_pathways={self.top_k_pathways} > num_pathways="
                              f"{self.num_pathways}: a token cannot choose more pathways than exist")
        if self.routed_layers is not None:
            layers = tuple(self.routed_layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ConfigError(f"RoutingConfig.routed_layers must be non-empty non-negative ints or None, "
                                  f"got {self.routed_layers!r}")
            self.routed_layers = tuple(sorted(set(layers)))
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"RoutingConfig.momentum must be in [0, 1), got {self.momentum!r}")
        if not self.gate_scale > 0:
            raise ConfigError(f"RoutingConfig.gate_scale must be > 0, got {self.gate_scale!r}")
        for name in ("glbl_weight", "switch_weight", "router_init_std"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"RoutingConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.router_init not in ROUTER_INITS:
            raise ConfigError(f"RoutingConfig.router_init={self.router_init!r}: choose one of {ROUTER_INITS}")
        if self.impl not in IMPLS:
            raise ConfigError(f"RoutingConfig.impl={self.impl!r}: choose one of {IMPLS}")

    def layers_to_route(self, num_layers: int) -> list[int]:
        """Indices of the decoder layers whose MLP is routed, for a model of ``num_layers`` layers."""
        if self.routed_layers is None:
            return list(range(0, num_layers, self.route_every_n_layers))
        bad = [i for i in self.routed_layers if i >= num_layers]
        if bad:
            raise ConfigError(f"RoutingConfig.routed_layers {bad} out of range: the model has {num_layers} layers")
        return list(self.routed_layers)

    def check_intermediate_size(self, intermediate_size: int) -> int:
        """Neurons per pathway, I / N; ConfigError if I is not divisible by N."""
        if intermediate_size % self.num_pathways:
            divisors = [d for d in range(1, intermediate_size + 1) if intermediate_size % d == 0 and d <= 256]
            raise ConfigError(f"intermediate size {intermediate_size} is not divisible by num_pathways="
                              f"{self.num_pathways}; choose a divisor, e.g. one of {divisors[-8:]}")
        return intermediate_size // self.num_pathways


# ----------------------------------------------------------------------------------------------
# losses


def selection_counts(indices: torch.Tensor, num_pathways: int) -> torch.Tensor:
    """(n, k) chosen pathways -> (N,) float32 number of top-k selections of each pathway."""
    return torch.bincount(indices.reshape(-1), minlength=num_pathways).to(torch.float32)


def glbl_loss(probs: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Global-Batch Load Balancing loss ``N * sum_i frequency_i * score_i``.

    probs: (n, N) router probabilities of this batch; score_i = mean_n probs[n, i] (differentiable).
    frequency: (N,) fraction of top-k selections per pathway over the global batch -- the momentum
    EMA kept by :class:`GlobalFrequency`; treated as a constant (detached). Returns an fp32 scalar;
    1.0 when frequency and score are both uniform."""
    num_pathways = probs.shape[-1]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    score = probs.float().mean(dim=0)  # (N,)
    return num_pathways * torch.sum(frequency.detach().float().to(score.device) * score)


def switch_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Per-batch Switch loss ``N * sum_i f_i * P_i`` with f from this batch only (no sync, no EMA).

    The same function as :func:`routelib.models.moe.load_balancing_loss`. probs: (n, N); indices: (n, k)."""
    return load_balancing_loss(probs, indices, probs.shape[-1])


class GlobalFrequency(nn.Module):
    """Momentum EMA of the global-batch selection frequencies of one routed layer.

    ``update(counts)`` all_reduces this rank's (N,) selection counts over the data-parallel group
    (when torch.distributed is initialised and ``sync``), turns them into frequencies (sum 1) and
    folds them into the EMA: ``ema <- momentum * ema + (1 - momentum) * f`` (the first update sets
    ema = f). Buffers, so the EMA travels with state_dict and checkpoints."""

    def __init__(self, num_pathways: int, momentum: float, sync: bool = True):
        super().__init__()
        self.momentum = momentum
        self.sync = sync
        self.register_buffer("ema", torch.full((num_pathways,), 1.0 / num_pathways))  # (N,)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))  # ()

    @torch.no_grad()
    def update(self, counts: torch.Tensor) -> torch.Tensor:
        """Fold the (N,) selection counts of this step in; returns the global batch frequencies (N,)."""
        counts = counts.detach().to(torch.float32)  # (N,)
        if self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            counts = counts.clone()
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        total = counts.sum()  # ()
        freq = counts / total.clamp_min(1.0)  # (N,); all zero when the global batch had no token
        # written without host syncs (no .item()): first update sets ema = freq, empty batches change nothing
        blended = torch.where(self.num_updates == 0, freq, self.momentum * self.ema + (1.0 - self.momentum) * freq)
        self.ema.copy_(torch.where(total > 0, blended, self.ema))
        self.num_updates += (total > 0).long()
        return freq


# ----------------------------------------------------------------------------------------------
# router


@dataclass
class RouterDecision:
    """What a PathwayRouter decided for n tokens."""

    logits: torch.Tensor  # (n, N) router logits, input dtype
    probs: torch.Tensor  # (n, N) fp32 softmax of the logits
    indices: torch.Tensor  # (n, k) int64 chosen pathways, most probable first
    weights: torch.Tensor  # (n, k) fp32 gates (k * renormalised top-k probs, or N * probs; times gate_scale)


class PathwayRouter(nn.Module):
    """Linear (no bias) -> fp32 softmax over N pathways -> top-k, with gates scaled so that a uniform
    router gives weight 1 to each chosen pathway (see the module docstring)."""

    def __init__(self, hidden_size: int, cfg: RoutingConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(hidden_size, cfg.num_pathways, bias=False, dtype=dtype, device=device)  # W (N, H)
        self.reset_parameters()

    def reset_parameters(self):
        if self.cfg.router_init == "zeros":
            nn.init.zeros_(self.proj.weight)
        else:
            nn.init.normal_(self.proj.weight, mean=0.0, std=self.cfg.router_init_std)

    def forward(self, x: torch.Tensor) -> RouterDecision:
        """x: (n, H) -> RouterDecision."""
        cfg = self.cfg
        logits = self.proj(x)  # (n, N)
        probs = F.softmax(logits.float(), dim=-1)  # (n, N) fp32
        top, indices = torch.topk(probs, cfg.top_k_pathways, dim=-1)  # (n, k), (n, k)
        if cfg.normalize_topk:
            weights = cfg.top_k_pathways * top / top.sum(dim=-1, keepdim=True)  # (n, k), sums to k
        else:
            weights = cfg.num_pathways * top  # (n, k)
        if cfg.gate_scale != 1.0:
            weights = cfg.gate_scale * weights  # (n, k)
        return RouterDecision(logits, probs, indices, weights)


# ----------------------------------------------------------------------------------------------
# pathway MLP


@dataclass
class LayerRouting:
    """One routed layer's decisions and losses for the last forward pass (tensors detached, except
    the losses)."""

    layer: int  # decoder-layer index
    indices: torch.Tensor  # (B, T, k) int64 chosen pathways
    weights: torch.Tensor  # (B, T, k) fp32 gates
    probs: torch.Tensor  # (B, T, N) fp32 router probabilities
    frequency: torch.Tensor  # (N,) fraction of this batch's selections (this rank; valid tokens only)
    global_frequency: torch.Tensor  # (N,) the EMA used as frequency_i in GLBL
    glbl: torch.Tensor  # () unweighted GLBL (differentiable through the router)
    switch: torch.Tensor  # () unweighted per-batch Switch loss (differentiable)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D: y = x @ weight + bias with weight (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0]


def _in_slices(module: nn.Module, n: int) -> torch.Tensor:
    """Input projection H -> I (Linear weight (I, H) or Conv1D weight (H, I)) as per-pathway
    (N, H, I/N) views, no copy."""
    w = module.weight
    if is_conv1d(module):
        h, i = w.shape
        return w.view(h, n, i // n).permute(1, 0, 2)  # (N, H, I/N)
    i, h = w.shape
    return w.view(n, i // n, h).transpose(1, 2)  # (N, H, I/N)


def _out_slices(module: nn.Module, n: int) -> torch.Tensor:
    """Output projection I -> H (Linear weight (H, I) or Conv1D weight (I, H)) as per-pathway
    (N, I/N, H) views, no copy."""
    w = module.weight
    if is_conv1d(module):
        i, h = w.shape
        return w.view(n, i // n, h)  # (N, I/N, H)
    h, i = w.shape
    return w.view(h, n, i // n).permute(1, 2, 0)  # (N, I/N, H)


# MLP layouts we know how to split: (kind, input projections, output projection, activation names)
_GATED = ("gated", ("gate_proj", "up_proj"), "down_proj")  # Llama, SmolLM2, Mistral, Qwen2/3, Gemma
_PLAIN = [
    ("plain", ("c_fc",), "c_proj"),  # GPT-2, GPT-BigCode/StarCoder
    ("plain", ("dense_h_to_4h",), "dense_4h_to_h"),  # GPT-NeoX / Pythia
    ("plain", ("fc1",), "fc2"),  # Phi-1/2
]
_ACT_NAMES = ("act_fn", "act", "activation_fn", "activation")


def mlp_layout(mlp: nn.Module) -> tuple[str, tuple[str, ...], str, str] | None:
    """(kind, input projection names, output projection name, activation name) of a supported MLP
    module, or None. kind "gated": down(act(gate(x)) * up(x)); "plain": out(act(in(x)))."""
    for kind, ins, out in [_GATED, *_PLAIN]:
        if all(isinstance(getattr(mlp, n, None), nn.Module) for n in (*ins, out)):
            act = next((a for a in _ACT_NAMES if callable(getattr(mlp, a, None))), None)
            if act is not None:
                return kind, ins, out, act
    return None


class PathwayMLP(nn.Module):
    """An existing MLP split into N pathways along its intermediate dimension, plus a router.

    Holds the original module as ``self.mlp`` (weights shared, not copied). forward(x) -> y shaped
    like x; the routing of the call is left in ``self.last`` (a :class:`LayerRouting`).
    ``mode="all"`` runs the original MLP (all pathways, unit weights) while still routing and
    recording, so the untrained router can be studied on the exact base model.

    The frequency EMA is updated on every forward in training mode with gradients enabled (each
    micro-batch of a gradient-accumulation step; twice per step under activation checkpointing,
    which re-runs the forward)."""

    def __init__(self, mlp: nn.Module, cfg: RoutingConfig, layer: int = 0):
        super().__init__()
        layout = mlp_layout(mlp)
        if layout is None:
            names = [n for n, _ in mlp.named_children()]
            raise ConfigError(f"PathwayMLP: cannot split {type(mlp).__name__} (children {names}); supported: "
                              f"gate_proj/up_proj/down_proj + act_fn (Llama family), c_fc/c_proj, "
                              f"dense_h_to_4h/dense_4h_to_h, fc1/fc2 + activation (GPT-2 style)")
        self.kind, self.in_names, self.out_name, self.act_name = layout
        self.mlp = mlp
        self.cfg = cfg
        self.layer = layer
        first = getattr(mlp, self.in_names[0])
        self.intermediate_size = linear_out_features(first)
        self.pathway_size = cfg.check_intermediate_size(self.intermediate_size)  # I / N
        self.hidden_size = first.weight.shape[0] if is_conv1d(first) else first.weight.shape[1]
        self.router = PathwayRouter(self.hidden_size, cfg, dtype=first.weight.dtype, device=first.weight.device)
        self.freq = GlobalFrequency(cfg.num_pathways, cfg.momentum, cfg.sync_across_ranks)
        self.mode: str = "routed"  # "routed" or "all" (see the class docstring)
        self.impl: str | None = None  # overrides cfg.impl when set
        self.token_mask: torch.Tensor | None = None  # (B, T) bool set by RoutedLLM: tokens counted in stats
        self.last: LayerRouting | None = None

    # -- the two computations of sum_{p in topk} w_p * MLP_p(x) + b_out ---------------------------

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        return getattr(self.mlp, self.act_name)(h)

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        drop = getattr(self.mlp, "dropout", None)  # GPT-2 applies resid dropout inside its MLP
        return drop(y) if isinstance(drop, nn.Dropout) else y

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """All I intermediate activations, through the original modules. x: (n, H) -> (n, I)."""
        if self.kind == "gated":
            gate, up = (getattr(self.mlp, n) for n in self.in_names)
            return self._act(gate(x)) * up(x)  # (n, I)
        return self._act(getattr(self.mlp, self.in_names[0])(x))  # (n, I)

    def full(self, x: torch.Tensor) -> torch.Tensor:
        """All pathways with unit weights: the original MLP's computation, op for op. x: (..., H)."""
        return self._finish(getattr(self.mlp, self.out_name)(self._hidden(x)))

    def dense_masked(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Reference: compute every pathway, zero the unchosen, weight the chosen.
        x: (n, H); indices, weights: (n, k) -> (n, H)."""
        n = x.shape[0]
        mask = x.new_zeros(n, self.cfg.num_pathways).scatter(1, indices, weights.to(x.dtype))  # (n, N)
        h = self._hidden(x).view(n, self.cfg.num_pathways, self.pathway_size)  # (n, N, I/N)
        h = (h * mask.unsqueeze(-1)).view(n, self.intermediate_size)  # (n, I)
        return self._finish(getattr(self.mlp, self.out_name)(h))  # (n, H)

    def sparse(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Only the chosen pathways: token-slots sorted by pathway, grouped GEMMs over the weight
        slices (views of the pretrained weights). x: (n, H); indices, weights: (n, k) -> (n, H).

        The gate w is applied to the (S, I/N) intermediate activations, before the linear output
        projection (w * (h W) = (w * h) W, and h is narrower than the output), and the k outputs of
        a token are summed with index_add_ straight into the (n, H) result."""
        n, k = indices.shape
        npw, size = self.cfg.num_pathways, self.pathway_size
        flat = indices.reshape(-1)  # (S,) S = n*k, slot s = token*k + j
        order = torch.argsort(flat, stable=True)  # (S,) slots grouped by pathway, token order within
        offs = torch.cumsum(torch.bincount(flat, minlength=npw), 0).to(torch.int32)  # (N,) group ends
        tok = order // k  # (S,) token of each sorted slot
        xs = x.index_select(0, tok)  # (S, H)
        ins = [getattr(self.mlp, name) for name in self.in_names]
        w_in = torch.cat([_in_slices(m, npw) for m in ins], dim=-1)  # (N, H, P*len(ins)) P = I/N
        h = grouped_matmul(xs, w_in, offs)  # (S, P*len(ins)) gate|up (gated) or fc (plain)
        biases = [m.bias for m in ins]
        if biases[0] is not None:
            b = torch.cat([bias.view(npw, size) for bias in biases], dim=-1)  # (N, P*len(ins))
            h = h + b[flat[order]]  # (S, P*len(ins))
        if self.kind == "gated":
            gate, up = h.split(size, dim=-1)  # (S, P), (S, P)
            h = self._act(gate) * up  # (S, P)
        else:
            h = self._act(h)  # (S, P)
        h = h * weights.reshape(-1)[order].to(h.dtype).unsqueeze(-1)  # (S, P) gated
        out = getattr(self.mlp, self.out_name)
        y = grouped_matmul(h, _out_slices(out, npw), offs)  # (S, H)
        y = x.new_zeros(n, x.shape[-1]).index_add_(0, tok, y.to(x.dtype))  # (n, H) sum over k
        if out.bias is not None:
            y = y + out.bias  # the shared output bias, once
        return self._finish(y)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H) or (n, H) -> same shape. Routes, records ``self.last``, updates the global
        frequency EMA when training with gradients on."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (n, H)
        dec = self.router(xf)
        valid = None
        if self.token_mask is not None:
            tm = self.token_mask[..., -shape[-2]:] if len(shape) == 3 else self.token_mask
            valid = tm.reshape(-1).to(device=xf.device, dtype=torch.bool)  # (n,)
            if valid.numel() != xf.shape[0]:
                raise ConfigError(f"token mask has {valid.numel()} entries for {xf.shape[0]} tokens")
        probs_v = dec.probs if valid is None else dec.probs[valid]  # (n_valid, N)
        idx_v = dec.indices if valid is None else dec.indices[valid]  # (n_valid, k)
        counts = selection_counts(idx_v, self.cfg.num_pathways)  # (N,)
        if self.training and torch.is_grad_enabled():
            self.freq.update(counts)
        batch_freq = counts / counts.sum().clamp_min(1.0)  # (N,)
        self.last = LayerRouting(
            layer=self.layer,
            indices=dec.indices.detach().view(*shape[:-1], -1),
            weights=dec.weights.detach().view(*shape[:-1], -1),
            probs=dec.probs.detach().view(*shape[:-1], -1),
            frequency=batch_freq,
            global_frequency=self.freq.ema.detach().clone(),
            glbl=glbl_loss(probs_v, self.freq.ema),
            switch=switch_loss(probs_v, idx_v),
        )
        impl = self.impl or self.cfg.impl
        if self.mode == "all":
            y = self.full(xf)
        elif impl == "sparse":
            y = self.sparse(xf, dec.indices, dec.weights)
        elif impl == "dense_masked":
            y = self.dense_masked(xf, dec.indices, dec.weights)
        else:
            raise ConfigError(f"impl={impl!r}: choose one of {IMPLS}")
        return y.view(shape)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"layer={self.layer}, kind={self.kind}, pathways={c.num_pathways}x{self.pathway_size}, "
                f"top_k={c.top_k_pathways}, mode={self.mode}, impl={self.impl or c.impl}")


# ----------------------------------------------------------------------------------------------
# the wrapped LM


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (Llama family: model.model.layers; GPT-2:
    model.transformer.h; GPT-NeoX: model.gpt_neox.layers). ConfigError naming the architecture if
    none is found."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ConfigError(f"RoutedLLM: no decoder layers found in {_arch(model)}; supported: Hugging Face causal LMs "
                      f"with model.layers (Llama family), transformer.h (GPT-2) or gpt_neox.layers")


def _arch(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    return f"{type(model).__name__}" + (f" (model_type={mt!r})" if mt else "")


@dataclass
class RoutedLLMOutput:
    """RoutedLLM.forward's result: the wrapped model's output plus routing and losses."""

    logits: torch.Tensor  # (B, T, V)
    aux_loss: torch.Tensor  # () glbl_weight * glbl + switch_weight * switch (what train.lm_loss adds)
    glbl: torch.Tensor  # () unweighted GLBL, mean over routed layers
    switch: torch.Tensor  # () unweighted per-batch Switch loss, mean over routed layers
    routing: list[LayerRouting] = field(default_factory=list)  # one per routed layer, in layer order
    lm_loss: torch.Tensor | None = None  # () the wrapped model's LM loss when labels were given
    loss: torch.Tensor | None = None  # () lm_loss + aux_loss when labels were given (as HF MoE models)
    base: object = None  # the wrapped model's own output (past_key_values, hidden_states, ...)


class RoutedLLM(nn.Module):
    """Wrap a Hugging Face causal LM and route the MLP of every n-th decoder layer through pathways.

    The model is edited in place: ``layers[i].mlp`` becomes a :class:`PathwayMLP` holding the
    original MLP (the pretrained weights are shared, nothing is copied); :meth:`unwrap` undoes it.
    Supported: Llama-family gated MLPs (SmolLM2, Llama, Mistral, Qwen2, Gemma) and GPT-2-style MLPs
    (GPT-2, GPT-NeoX/Pythia, Phi-1/2); anything else raises ConfigError naming the architecture.

    forward(input_ids, attention_mask=None, labels=None, **kw) -> :class:`RoutedLLMOutput`. Routing
    statistics and losses count only tokens with attention_mask == 1."""

    def __init__(self, model: nn.Module, cfg: RoutingConfig | None = None):
        super().__init__()
        cfg = cfg or RoutingConfig()
        self.model = model
        self.routing_config = cfg
        layers = decoder_layers(model)
        idx = cfg.layers_to_route(len(layers))
        for i in idx:  # check every layer before editing any
            mlp = getattr(layers[i], "mlp", None)
            if mlp is None or mlp_layout(mlp) is None:
                kind = "an MoE block (already routed)" if hasattr(mlp, "experts") else type(mlp).__name__
                raise ConfigError(f"RoutedLLM: unsupported architecture {_arch(model)}: layer {i}'s MLP is "
                                  f"{kind}; supported: Llama-family gated MLPs (gate_proj/up_proj/down_proj) "
                                  f"and GPT-2-style MLPs (c_fc/c_proj, dense_h_to_4h/dense_4h_to_h, fc1/fc2)")
            size = linear_out_features(getattr(mlp, mlp_layout(mlp)[1][0]))
            cfg.check_intermediate_size(size)
        self.routed_layers: list[int] = idx
        for i in idx:
            layers[i].mlp = PathwayMLP(layers[i].mlp, cfg, layer=i)
        self.train(model.training)  # a new nn.Module starts in training mode: keep the wrapped model's mode

    @property
    def config(self):
        """The wrapped model's config (checkpoints record it)."""
        return self.model.config

    def pathway_mlps(self) -> dict[int, PathwayMLP]:
        """{decoder-layer index: its PathwayMLP}, in layer order."""
        layers = decoder_layers(self.model)
        return {i: layers[i].mlp for i in self.routed_layers}

    def routers(self) -> dict[int, PathwayRouter]:
        return {i: m.router for i, m in self.pathway_mlps().items()}

    def router_parameters(self):
        """The routers' parameters only (e.g. to train routers with the base frozen)."""
        for router in self.routers().values():
            yield from router.parameters()

    def set_mode(self, mode: str) -> RoutedLLM:
        """"routed" (top-k pathways) or "all" (every pathway, unit weights = the base model)."""
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}: choose one of {MODES}")
        for m in self.pathway_mlps().values():
            m.mode = mode
        return self

    def set_impl(self, impl: str | None) -> RoutedLLM:
        """Override cfg.impl ("sparse" / "dense_masked"; None = back to cfg.impl) in every routed layer."""
        if impl is not None and impl not in IMPLS:
            raise ConfigError(f"impl={impl!r}: choose one of {IMPLS}")
        for m in self.pathway_mlps().values():
            m.impl = impl
        return self

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> RoutedLLMOutput:
        mlps = list(self.pathway_mlps().values())
        for m in mlps:
            m.token_mask = attention_mask.bool() if attention_mask is not None else None
            m.last = None
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            for m in mlps:
                m.token_mask = None
        routing = [m.last for m in mlps if m.last is not None]
        if routing:
            glbl = torch.stack([r.glbl for r in routing]).mean()
            switch = torch.stack([r.switch for r in routing]).mean()
        else:  # e.g. inputs_embeds of zero length
            glbl = switch = out.logits.new_zeros((), dtype=torch.float32)
        cfg = self.routing_config
        aux = cfg.glbl_weight * glbl + cfg.switch_weight * switch
        lm = getattr(out, "loss", None)
        return RoutedLLMOutput(logits=out.logits, aux_loss=aux, glbl=glbl, switch=switch, routing=routing,
                               lm_loss=lm, loss=None if lm is None else lm + aux.to(lm.dtype), base=out)

    @torch.no_grad()
    def collect_routing(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                        ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """One no-grad forward -> (token ids (n,), {layer: chosen pathways (n, k)}) over the tokens
        with attention_mask == 1, flattened in (batch, position) order: the arrays
        :func:`routelib.metrics.pathway_metrics` takes. Does not update the frequency EMA."""
        was = self.training
        self.eval()
        try:
            out = self(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            self.train(was)
        keep = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.bool()).reshape(-1).cpu()
        tokens = input_ids.reshape(-1).cpu()[keep].numpy()
        k = self.routing_config.top_k_pathways
        sel = {r.layer: r.indices.reshape(-1, k).cpu()[keep].numpy() for r in out.routing}
        return tokens, sel

    def unwrap(self) -> nn.Module:
        """Put the original MLPs back and return the (un-routed) model."""
        layers = decoder_layers(self.model)
        for i in self.routed_layers:
            if isinstance(layers[i].mlp, PathwayMLP):
                layers[i].mlp = layers[i].mlp.mlp
        return self.model


def pathway_mlp_flops_per_token(hidden_size: int, intermediate_size: int, cfg: RoutingConfig,
                                gated: bool = True) -> tuple[int, int]:
    """(dense, sparse) forward FLOPs per token of one MLP: 2 FLOPs per multiply-add over the (2 or 3)
    H x I projections; sparse = the k/N share of them + the router's 2*H*N."""
    dense = 2 * (3 if gated else 2) * hidden_size * intermediate_size
    sparse = dense * cfg.top_k_pathways // cfg.num_pathways + 2 * hidden_size * cfg.num_pathways
    return dense, sparse


def bench_pathway_mlp(hidden_size: int = 576, intermediate_size: int = 1536, cfg: RoutingConfig | None = None,
                      n_tokens: int = 4096, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                      backward: bool = False, seed: int = 0, **compare_kwargs):
    """Time one Llama-style pathway MLP (SmolLM2 shapes by default) in one run with
    :func:`routelib.bench.compare`: the original dense MLP, ``dense_masked`` and ``sparse`` on the
    same tokens and the same routing decision (router excluded). backward=True times forward +
    backward. Returns compare's DataFrame (speedup relative to ``dense_masked``)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from routelib.bench import compare

    cfg = cfg or RoutingConfig()
    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, hidden_act="silu",
                               num_attention_heads=1, num_key_value_heads=1))
    mlp = mlp.to(device=device, dtype=dtype)
    pm = PathwayMLP(mlp, cfg)
    x = torch.randn(n_tokens, hidden_size, device=device, dtype=dtype, requires_grad=backward)
    with torch.no_grad():
        dec = pm.router(x)
    arms = {"dense_masked": lambda: pm.dense_masked(x, dec.indices, dec.weights),
            "sparse": lambda: pm.sparse(x, dec.indices, dec.weights),
            "dense_mlp": lambda: mlp(x)}

    def run(fn):
        if backward:
            return lambda: fn().sum().backward()
        def fwd():
            with torch.no_grad():
                return fn()
        return fwd

    dense, sparse = pathway_mlp_flops_per_token(hidden_size, intermediate_size, cfg)
    flops = {"dense_masked": dense * n_tokens, "sparse": (sparse - 2 * hidden_size * cfg.num_pathways) * n_tokens,
             "dense_mlp": dense * n_tokens}
    if backward:
        flops = {k: 3 * v for k, v in flops.items()}
    return compare({name: run(fn) for name, fn in arms.items()}, baseline="dense_masked", items=n_tokens,
                   flops=flops, device=device, **compare_kwargs)


__all__ = [
    "GlobalFrequency",
    "bench_pathway_mlp",
    "LayerRouting",
    "PathwayMLP",
    "PathwayRouter",
    "RoutedLLM",
    "RoutedLLMOutput",
    "RouterDecision",
    "RoutingConfig",
    "decoder_layers",
    "glbl_loss",
    "mlp_layout",
    "pathway_mlp_flops_per_token",
    "selection_counts",
    "switch_loss",
]
