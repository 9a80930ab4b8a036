"""MoEfication: a dense gated MLP split into experts by co-activation, with a learned router.

Zhang et al. 2022 ("MoEfication: Transformer Feed-forward Layers are Mixtures of Experts", Findings of
ACL 2022) turn a pretrained FFN into an MoE layer without changing its weights: the intermediate neurons
are partitioned into groups that fire together (the experts), and a router trained to pick, per token,
the groups whose outputs matter most. LLaMA-MoE (Zhu et al. 2024) does the same to LLaMA-2 and then
trains further. A gated MLP ``down(act(gate x) * up x)`` is a sum over its neurons, so with a partition
into groups G_1..G_E the dense output is exactly the sum of the E expert outputs

    y_e(x) = down[:, G_e] (act(gate[G_e] x) * up[G_e] x)          y(x) = shared(x) + sum_e y_e(x),

and an MoE layer keeps the k experts a router picks. An optional *shared* expert (always on, as in
DeepSeekMoE, Dai et al. 2024, and Qwen-MoE) takes the neurons active on the most tokens.

:class:`MoEfiedMLP` is the routed layer for study and training: its expert weights are the dense
weights in the partition's order; ``mode`` chooses who picks the k experts (the router, k random
experts, or the oracle that keeps the k largest outputs ||y_e||), and ``gating`` how the kept outputs
are weighted ("unit": summed with weight 1, MoEfication's choice that reproduces the dense output when
every expert is kept; "softmax": Mixtral's renormalised top-k softmax times k, so equal gate values
give the unit sum -- the function the exported Mixtral/Qwen2-MoE model computes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from routelib.errors import ConfigError
from routelib.models.grouping import activation_features, balanced_kmeans, group_order

#: Who picks a token's k experts in :class:`MoEfiedMLP`.
MODES = ("router", "random", "oracle", "dense")
#: How the kept experts' outputs are weighted.
GATINGS = ("unit", "softmax")


@dataclass(frozen=True)
class SplitConfig:
    """How one dense MLP becomes an MoE layer."""

    num_experts: int = 8  # E routed experts, each (I - shared_size) / E neurons
    top_k: int = 2  # experts kept per token
    shared_size: int = 0  # neurons of the always-on shared expert (0: none, Mixtral's form)
    top_fraction: float = 0.1  # co-activation: a neuron is active on a token among its top 10 % |activation|
    seed: int = 0  # k-means initialisation

    def check(self, intermediate: int) -> None:
        """ConfigError naming the field unless the split fits an MLP of ``intermediate`` neurons."""
        routed = intermediate - self.shared_size
        if self.num_experts < 1 or self.top_k < 1:
            raise ConfigError(f"num_experts and top_k must be >= 1, got {self.num_experts}, {self.top_k}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} > num_experts={self.num_experts}")
        if not 0 <= self.shared_size < intermediate:
            raise ConfigError(f"shared_size={self.shared_size} must be in [0, {intermediate})")
        if routed % self.num_experts:
            raise ConfigError(f"{routed} routed neurons do not split into {self.num_experts} equal experts; "
                              f"change num_experts or shared_size")

    def expert_size(self, intermediate: int) -> int:
        self.check(intermediate)
        return (intermediate - self.shared_size) // self.num_experts


def split_order(hidden: torch.Tensor, cfg: SplitConfig) -> torch.Tensor:
    """The neuron order (I,) of the split: the shared expert's neurons first (the ``shared_size``
    neurons active on the most tokens of the sample), then expert 0's, expert 1's, ... (balanced
    co-activation k-means of the rest). hidden: (n, I) the MLP's intermediate activations on a text
    sample (:func:`routelib.models.grouping.mlp_hidden`)."""
    size = hidden.shape[1]
    cfg.check(size)
    feats = activation_features(hidden, cfg.top_fraction)  # (I, n) 0/1 activity
    if cfg.shared_size:
        freq = feats.float().mean(1)  # (I,) fraction of tokens on which each neuron is active
        shared = torch.sort(torch.argsort(-freq, stable=True)[: cfg.shared_size]).values  # (S,)
    else:
        shared = torch.zeros(0, dtype=torch.long)
    keep = torch.ones(size, dtype=torch.bool)
    keep[shared] = False
    rest = torch.nonzero(keep).squeeze(1)  # (I - S,) routed neurons, ascending
    labels = balanced_kmeans(feats[rest], cfg.num_experts, seed=cfg.seed)  # (I - S,)
    return torch.cat([shared, rest[group_order(labels)]])


class MoEfiedMLP(nn.Module):
    """A gated MLP split into a shared expert and E routed experts (see module docstring).

    gate, up: (I, H) and down: (H, I) are the dense weights; ``order`` (I,) the neuron order of
    :func:`split_order`. The experts' weights are stored stacked: gate_w, up_w (E, I_e, H), down_w
    (E, H, I_e); the shared expert's shared_gate, shared_up (S, H), shared_down (H, S).
    """

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, order: torch.Tensor,
                 cfg: SplitConfig, act=F.silu):
        super().__init__()
        size, hidden = gate.shape
        ie = cfg.expert_size(size)
        s, e = cfg.shared_size, cfg.num_experts
        gate, up, down = gate[order], up[order], down[:, order]  # (I, H), (I, H), (H, I)
        self.cfg, self.act = cfg, act
        self.register_buffer("order", order.clone(), persistent=False)  # (I,) dense neuron of each position
        self.gate_w = nn.Parameter(gate[s:].reshape(e, ie, hidden).clone())  # (E, I_e, H)
        self.up_w = nn.Parameter(up[s:].reshape(e, ie, hidden).clone())  # (E, I_e, H)
        self.down_w = nn.Parameter(down[:, s:].reshape(hidden, e, ie).permute(1, 0, 2).contiguous())  # (E, H, I_e)
        self.shared_gate = nn.Parameter(gate[:s].clone())  # (S, H)
        self.shared_up = nn.Parameter(up[:s].clone())  # (S, H)
        self.shared_down = nn.Parameter(down[:, :s].clone())  # (H, S)
        self.router = nn.Linear(hidden, e, bias=False)  # (E, H); fitted by routelib.subject.router_fit
        nn.init.zeros_(self.router.weight)
        # the shared expert's gate, Qwen2-MoE's form: output x 2 sigmoid(g x), 1 at g = 0 (the dense sum)
        self.shared_gate_proj = nn.Linear(hidden, 1, bias=False)  # (1, H)
        nn.init.zeros_(self.shared_gate_proj.weight)
        self.lora: nn.ParameterDict | None = None  # low-rank updates of the expert weights (add_lora)
        self.lora_scale = 1.0
        self.mode, self.gating = "router", "unit"
        self.generator: torch.Generator | None = None  # for mode="random"
        self.last_topk: torch.Tensor | None = None  # (N, k) experts picked in the last forward
        self.last_logits: torch.Tensor | None = None  # (N, E) router logits of the last forward

    def set_mode(self, mode: str, gating: str | None = None, seed: int = 0) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}: choose one of {MODES}")
        if gating is not None and gating not in GATINGS:
            raise ConfigError(f"gating={gating!r}: choose one of {GATINGS}")
        self.mode, self.gating = mode, gating or self.gating
        self.generator = torch.Generator().manual_seed(seed) if mode == "random" else None

    # ------------------------------------------------------------------ low-rank updates (LoRA)
    LORA_TARGETS = ("gate_w", "up_w", "down_w", "shared_gate", "shared_up", "shared_down")

    def add_lora(self, rank: int, alpha: float | None = None, seed: int = 0) -> None:
        """Freeze the expert weights and train low-rank updates instead (Hu et al. 2022, LoRA): each
        weight W (..., out, in) becomes W + scale * B @ A with A (..., rank, in) small random, B (..., out,
        rank) zero (so the layer is unchanged at the start), scale = alpha / rank (alpha: rank)."""
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        g = torch.Generator().manual_seed(seed)
        self.lora = nn.ParameterDict()
        for name in self.LORA_TARGETS:
            w = getattr(self, name)
            w.requires_grad_(False)
            if w.numel() == 0:
                continue
            *lead, out, inp = w.shape
            self.lora[f"{name}_A"] = nn.Parameter(torch.randn(*lead, rank, inp, generator=g) / inp ** 0.5)
            self.lora[f"{name}_B"] = nn.Parameter(torch.zeros(*lead, out, rank))
        self.lora_scale = (alpha or rank) / rank

    def weight(self, name: str) -> torch.Tensor:
        """The effective weight ``name`` (one of LORA_TARGETS): the base plus its low-rank update."""
        w = getattr(self, name)
        if self.lora is None or f"{name}_A" not in self.lora:
            return w
        return w + self.lora_scale * (self.lora[f"{name}_B"] @ self.lora[f"{name}_A"])

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, H) -> (N, H) the shared expert's output, times its gate 2 sigmoid(g x) (zeros without one)."""
        if not self.cfg.shared_size:
            return torch.zeros_like(x)
        h = self.act(F.linear(x, self.weight("shared_gate"))) * F.linear(x, self.weight("shared_up"))  # (N, S)
        return 2 * torch.sigmoid(self.shared_gate_proj(x)) * F.linear(h, self.weight("shared_down"))

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, H) -> (N, E, H) every routed expert's output y_e(x) (the dense reference path)."""
        g = torch.einsum("nh,eih->nei", x, self.weight("gate_w"))  # (N, E, I_e)
        u = torch.einsum("nh,eih->nei", x, self.weight("up_w"))  # (N, E, I_e)
        return torch.einsum("nei,ehi->neh", self.act(g) * u, self.weight("down_w"))  # (N, E, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, H)
        outputs = self.expert_outputs(flat)  # (N, E, H)
        shared = self.shared_output(flat)  # (N, H)
        if self.mode == "dense":
            return (shared + outputs.sum(1)).reshape(shape)
        logits = self.router(flat)  # (N, E)
        if self.mode == "router":
            scores = logits
        elif self.mode == "oracle":
            scores = outputs.norm(dim=-1)
        else:
            scores = torch.rand(flat.shape[0], self.cfg.num_experts, generator=self.generator).to(flat)
        k = self.cfg.top_k
        top = torch.topk(scores, k, dim=-1).indices  # (N, k)
        self.last_logits, self.last_topk = logits, top.detach()
        if self.gating == "softmax":
            probs = torch.softmax(logits.float(), -1).gather(1, top)  # (N, k)
            weights = (k * probs / probs.sum(-1, keepdim=True)).to(flat.dtype)
        else:
            weights = torch.ones_like(top, dtype=flat.dtype)
        kept = outputs.gather(1, top[..., None].expand(-1, -1, shape[-1]))  # (N, k, H)
        return (shared + (weights[..., None] * kept).sum(1)).reshape(shape)

    def balance_loss(self) -> torch.Tensor:
        """The load-balancing loss of the last forward (Fedus et al. 2022, Switch Transformer, eq. 4, as
        Mixtral's training uses it over top-k): E * sum_e f_e P_e, f_e the fraction of the token-slots
        sent to expert e, P_e its mean router probability; 1 when perfectly balanced."""
        e = self.cfg.num_experts
        frac = torch.bincount(self.last_topk.flatten(), minlength=e).to(self.last_logits) / self.last_topk.numel()
        prob = torch.softmax(self.last_logits.float(), -1).mean(0)  # (E,)
        return e * (frac * prob).sum()


def moefy_mlp(mlp: nn.Module, hidden: torch.Tensor, cfg: SplitConfig) -> MoEfiedMLP:
    """A Llama-style gated MLP (gate_proj, up_proj, down_proj, no biases) -> :class:`MoEfiedMLP` with
    the co-activation split of ``hidden`` ((n, I) its activations on a text sample)."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, name, None), nn.Linear) or getattr(mlp, name).bias is not None:
            raise ConfigError(f"moefy_mlp needs a gated MLP with bias-free gate_proj/up_proj/down_proj, "
                              f"got {type(mlp).__name__}")
    order = split_order(hidden, cfg)
    act = getattr(mlp, "act_fn", F.silu)
    return MoEfiedMLP(mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data, order, cfg,
                      act=act)


def topk_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of the k experts two pickings share: a, b (N, k) expert ids."""
    a, b = np.sort(np.asarray(a), 1), np.sort(np.asarray(b), 1)
    return float(np.mean([len(set(x) & set(y)) / a.shape[1] for x, y in zip(a, b)]))


__all__ = ["GATINGS", "MODES", "MoEfiedMLP", "SplitConfig", "moefy_mlp", "split_order", "topk_agreement"]
