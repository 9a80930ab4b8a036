"""Sparse Mixture-of-Experts FFN layer (top-k routing, SwiGLU experts), in three implementations.

References:
1) Shazeer et al. 2017, "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
   Layer" -- top-k gating over many FFN experts.
2) Lepikhin et al. 2020, "GShard" -- top-2 routing, expert capacity, dispatch into (E, C, H)
   buffers and batched matmuls; first choices take priority over second choices.
3) Fedus et al. 2021, "Switch Transformer" -- the load-balancing loss alpha * N * sum_i f_i * P_i
   (N = number of experts, written E here), the capacity factor, multiplicative router jitter,
   router softmax in fp32.
4) Zoph et al. 2022, "ST-MoE" -- the router z-loss mean(logsumexp(logits)^2).
5) Jiang et al. 2024, "Mixtral of Experts" -- 8 SwiGLU experts, top-2, gates renormalised over the
   chosen k; the parameter layout this layer exports to (see below).
6) Gale et al. 2022, "MegaBlocks" -- dropless MoE as grouped (block-sparse) matmuls over
   token-slots sorted by expert.

One forward pass is: route once (``MoEFFN.route``: logits -> fp32 softmax -> top-k -> capacity
keep-mask), then compute the experts with one of

- ``naive``   loop over experts, gather their tokens, SwiGLU, index_add back (``moe_naive.py``);
- ``padded``  scatter token-slots into an (E, C, H) buffer, two batched matmuls, gather back
              (GShard/Tutel). Dropless (capacity_factor=None) pads every expert to the busiest one;
- ``grouped`` sort token-slots by expert and run ``torch.nn.functional.grouped_mm`` with int32
              cumulative end offsets (MegaBlocks-style, no padding, no dropping needed). Where
              grouped_mm is missing or cannot take the operands (dtype, alignment, device) a
              per-expert matmul loop over the same sorted layout computes the same thing.

All three consume the same routing decision, so capacity drops are identical across them. On
CPU (torch 2.13) grouped_mm runs forward *and* backward in fp32 and bf16, so ``grouped`` is also the
training path on CPU; it needs 16-byte aligned strides (H and I multiples of 4 in fp32, of 8 in
bf16), otherwise the loop is used.

Parameter layout (exported to Hugging Face transformers' Mixtral, v5, without any copy):

    gate.weight  (E, H)      nn.Linear(H, E, bias=False)     == mlp.gate.weight
    w13          (E, 2I, H)  rows [:I] = w1 (gate_proj),     == mlp.experts.gate_up_proj
                             rows [I:] = w3 (up_proj)
    w2           (E, H, I)   down_proj                       == mlp.experts.down_proj

transformers 5.x ``MixtralExperts`` computes ``gate, up = linear(x, gate_up_proj[e]).chunk(2, -1)``
and ``linear(silu(gate) * up, down_proj[e])``: the same tensors, so ``hf_state_dict`` is a renaming.
(Mixtral checkpoints of transformers 4.x stored ``block_sparse_moe.experts.{e}.w1/w3/w2``:
w1[e] = w13[e, :I], w3[e] = w13[e, I:], w2[e] = w2[e].)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from routelib.errors import ConfigError
from routelib.models.moe_naive import naive_moe_experts

IMPLS = ("naive", "padded", "grouped")
DROP_POLICIES = ("position", "weight")


@dataclass
class MoEConfig:
    hidden_size: int = 256  # H: model width (Mixtral-8x7B: 4096)
    intermediate_size: int = 1024  # I: inner width of each SwiGLU expert (Mixtral-8x7B: 14336)
    num_experts: int = 8  # E: experts in the layer
    top_k: int = 2  # k: experts per token (Mixtral: 2, Switch: 1)
    capacity_factor: float | None = None  # None: dropless; else C = ceil(factor * N * k / E) per expert
    drop_policy: Literal["position", "weight"] = "position"  # who keeps a full expert's seats: "position"
    # = all first choices before any second choice, then token order (GShard/Switch); "weight" = the
    # highest gate first (Batch Prioritized Routing, Riquelme 2021). Ties break by "position".
    normalize_topk: bool = True  # renormalise the k chosen probabilities to sum to 1 (Mixtral);
    # False: gates are the raw softmax probabilities (Switch; with k=1 only this trains the router
    # through the task loss, since a renormalised single gate is always 1)
    router_jitter: float = 0.0  # training only: router input *= U(1-eps, 1+eps) (Switch); 0 = off
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss (Switch alpha); 0 = off
    z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE uses 1e-3); 0 = off
    impl: Literal["naive", "padded", "grouped"] = "grouped"  # expert computation, same results
    init_std: float = 0.02  # std of the normal init of all weights (HF initializer_range)

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"MoEConfig.top_k={self.top_k} > num_experts={self.num_experts}: "
                f"a token cannot choose more experts than exist"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(
                f"MoEConfig.capacity_factor must be > 0 or None (dropless), got {self.capacity_factor!r}"
            )
        if not 0.0 <= self.router_jitter < 1.0:
            raise ConfigError(f"MoEConfig.router_jitter must be in [0, 1), got {self.router_jitter!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "init_std"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.impl not in IMPLS:
            raise ConfigError(f"MoEConfig.impl={self.impl!r}: choose one of {IMPLS}")
        if self.drop_policy not in DROP_POLICIES:
            raise ConfigError(f"MoEConfig.drop_policy={self.drop_policy!r}: choose one of {DROP_POLICIES}")


@dataclass
class RouterOutput:
    """What the router decided for N tokens, plus its losses and load statistics."""

    logits: torch.Tensor  # (N, E) router logits in the input dtype (HF's router_logits)
    probs: torch.Tensor  # (N, E) fp32 softmax of the logits
    indices: torch.Tensor  # (N, k) int64 chosen experts, most probable first
    weights: torch.Tensor  # (N, k) fp32 gates (renormalised over k if normalize_topk)
    keep: torch.Tensor  # (N, k) bool: False where capacity dropped the assignment
    positions: torch.Tensor  # (N, k) int64 seat of the assignment in its expert's queue (0 = first)
    capacity: int | None  # seats per expert C; None = dropless
    tokens_per_expert: torch.Tensor  # (E,) int64 assignments routed to each expert, before dropping
    aux_loss: torch.Tensor  # () aux_loss_coef * load_balancing_loss (1.0 unweighted when balanced)
    z_loss: torch.Tensor  # () z_loss_coef * router_z_loss
    drop_rate: torch.Tensor  # () fraction of the N*k assignments dropped by capacity

    @property
    def loss(self) -> torch.Tensor:
        """The router's total auxiliary loss, to add to the task loss."""
        return self.aux_loss + self.z_loss


# ----------------------------------------------------------------------------------------------
# routing


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss ``E * sum_i f_i * P_i``, generalised to top-k.

    f_i = (assignments to expert i) / (N * k): the fraction of the N*k token-slots routed to i,
    counted before capacity dropping, so sum_i f_i = 1 for any k. P_i = mean_n probs[n, i]. A
    perfectly balanced router (f_i = P_i = 1/E) gives exactly 1.0; total collapse onto one expert
    gives E. Only P carries gradient (f is a count). Hugging Face's ``load_balancing_loss_func``
    counts f without the 1/k, so its value is k times this one.

    probs: (N, E) fp32; indices: (N, k). Returns a scalar fp32 tensor.
    """
    n, k = indices.shape
    if n == 0:
        return probs.sum() * 0.0  # no tokens, no imbalance (and no NaN)
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts)  # (E,)
    f = counts.to(torch.float32) / (n * k)  # (E,)
    p = probs.float().mean(dim=0)  # (E,)
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (>= 0), in fp32.

    Keeps router logits small so the fp32 softmax stays well-conditioned. logits: (N, E)."""
    lse = torch.logsumexp(logits.float(), dim=-1)  # (N,)
    return lse.square().sum() / max(lse.numel(), 1)


def expert_capacity(num_tokens: int, cfg: MoEConfig) -> int | None:
    """Seats per expert: ceil(capacity_factor * N * k / E), or None when dropless."""
    if cfg.capacity_factor is None:
        return None
    return math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts)


def _priority(weights: torch.Tensor, policy: str) -> torch.Tensor:
    """Rank of every token-slot in the queue for seats (0 = served first). weights: (N, k) -> (N, k).

    "position": slot j of token n ranks j*N + n (all first choices, then all second choices, each
    in token order). "weight": by descending gate, ties by "position"."""
    n, k = weights.shape
    slot_major = torch.arange(n * k, device=weights.device).view(k, n).t()  # (N, k) rank j*N + n
    if policy == "position":
        return slot_major
    w = weights.detach().t().reshape(-1)  # (k*N,) in slot-major order
    order = torch.sort(-w, stable=True).indices  # (k*N,) slot-major positions, best gate first
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n * k, device=weights.device)  # (k*N,)
    return rank.view(k, n).t()  # (N, k)


def assign_seats(
    indices: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int | None, policy: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queue every token-slot at its expert and keep the first ``capacity`` of each queue.

    Returns positions (N, k) (seat in the queue), keep (N, k) bool, and ``order`` (N*k,): flat
    slot ids n*k + j sorted by (expert, priority) -- the layout the grouped path computes in.
    """
    n, k = indices.shape
    flat_e = indices.reshape(-1)  # (S,) S = N*k, slot s = n*k + j
    prio = _priority(weights, policy).reshape(-1)  # (S,)
    order = torch.argsort(flat_e * (n * k) + prio)  # (S,) grouped by expert, priority within
    counts = torch.bincount(flat_e, minlength=num_experts)  # (E,)
    starts = torch.cumsum(counts, 0) - counts  # (E,) first sorted slot of each expert
    seat = torch.arange(n * k, device=indices.device) - starts[flat_e[order]]  # (S,) sorted
    positions = torch.empty_like(seat)
    positions[order] = seat  # (S,)
    positions = positions.view(n, k)  # (N, k)
    keep = torch.ones_like(indices, dtype=torch.bool) if capacity is None else positions < capacity
    return positions, keep, order


# ----------------------------------------------------------------------------------------------
# expert computation: padded (GShard) and grouped (MegaBlocks); naive lives in moe_naive.py


def swiglu_act(h: torch.Tensor) -> torch.Tensor:
    """(..., 2I) fused gate|up projections -> (..., I) silu(gate) * up."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _combine(y: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sum the gated outputs of kept token-slots per token, deterministically, in fp32.

    y: (M, H) outputs of kept slots; slots: (M,) their flat ids n*k + j; weights: (N, k).
    Each slot owns one row of an (N*k, H) buffer (dropped slots stay zero), then the k rows of a
    token are summed -- no atomics, unlike index_add_ on CUDA. Returns (N, H) fp32."""
    k = weights.shape[1]
    gated = y.float() * weights.reshape(-1)[slots].float().unsqueeze(-1)  # (M, H)
    buf = torch.zeros(num_tokens * k, y.shape[-1], dtype=torch.float32, device=y.device)  # (N*k, H)
    buf = buf.index_copy(0, slots, gated)  # (N*k, H)
    return buf.view(num_tokens, k, y.shape[-1]).sum(dim=1)  # (N, H)


def padded_moe_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, router: RouterOutput
) -> torch.Tensor:
    """GShard/Tutel-style: (E, C, H) dispatch buffer, two batched matmuls, combine.

    Seat ``positions[n, j]`` of a kept slot is its row in expert ``indices[n, j]``'s block. Dropless
    uses C = the busiest expert's load (one host sync); empty seats compute on zeros. x: (N, H)."""
    n, k = router.indices.shape
    num_experts = w13.shape[0]
    cap = router.capacity
    if cap is None:
        cap = int(router.tokens_per_expert.max().item()) if n > 0 else 0
    keep = router.keep.reshape(-1)  # (S,)
    slots = torch.nonzero(keep).squeeze(-1)  # (M,) kept flat slot ids
    dest = router.indices.reshape(-1)[slots] * cap + router.positions.reshape(-1)[slots]  # (M,) rows
    src = x.index_select(0, slots // k)  # (M, H)
    buf = x.new_zeros(num_experts * cap, x.shape[-1]).index_copy(0, dest, src)  # (E*C, H)
    buf = buf.view(num_experts, cap, x.shape[-1])  # (E, C, H)
    h = torch.bmm(buf, w13.transpose(1, 2))  # (E, C, 2I)
    y = torch.bmm(swiglu_act(h), w2.transpose(1, 2))  # (E, C, H)
    y = y.reshape(num_experts * cap, x.shape[-1]).index_select(0, dest)  # (M, H)
    return _combine(y, slots, router.weights, n).to(x.dtype)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward
    rejects stride-0 (expanded) gradients such as the one ``.sum().backward()`` sends."""

    @staticmethod
    def forward(ctx, t):
        return t

    @staticmethod
    def backward(ctx, grad):
        if grad.numel() == 0:  # an empty tensor counts as contiguous whatever its strides
            return torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
        return grad.contiguous()


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Can ``grouped_mm(a, b, offs=...)`` run here? a: (M, K) rows sorted by group; b: (G, K, N).

    Needs torch >= 2.8, same dtype, fp32/bf16 on CPU or bf16 on CUDA (SM >= 80), and 16-byte
    aligned data pointers and strides. Anything else goes to the loop in ``grouped_matmul``."""
    if _GROUPED_MM is None or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.device.type == "cpu":
        dtype_ok = a.dtype in (torch.float32, torch.bfloat16)
    elif a.device.type == "cuda":
        dtype_ok = a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (8, 0)
    else:
        dtype_ok = False
    if not dtype_ok:
        return False
    for t in (a, b):
        if t.data_ptr() % 16 or any(s != 1 and (s * t.element_size()) % 16 for s in t.stride()):
            return False
    return True


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-group ``a[start_g:end_g] @ b[g]``: a: (M, K), b: (G, K, N), offs: (G,) int32 cumulative
    end offsets with offs[-1] == M (empty groups repeat an offset). Returns (M, N).

    Uses torch's grouped_mm where supported (differentiable, CPU and CUDA), else a matmul loop
    over the groups (one host sync for the offsets) -- same result, same gradients."""
    if torch.is_autocast_enabled(a.device.type):  # grouped_mm is not autocast-aware
        dtype = torch.get_autocast_dtype(a.device.type)
        a, b = a.to(dtype), b.to(dtype)
    if grouped_mm_supported(a, b):
        return _ContiguousGrad.apply(_GROUPED_MM(a, b, offs=offs))  # (M, N)
    outs, start = [], 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            outs.append(a[start:end] @ b[g])  # (n_g, N)
        start = end
    return torch.cat(outs) if outs else a @ b[0]  # (M, N); M = 0 keeps the graph (zero grads)


def grouped_moe_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, router: RouterOutput, order: torch.Tensor
) -> torch.Tensor:
    """MegaBlocks-style: kept token-slots sorted by expert, two grouped matmuls, combine.

    order: (N*k,) flat slot ids sorted by (expert, priority), from ``assign_seats``. x: (N, H)."""
    n, k = router.indices.shape
    num_experts = w13.shape[0]
    slots = order[router.keep.reshape(-1)[order]]  # (M,) kept slots, still grouped by expert
    counts = torch.bincount(router.indices.reshape(-1)[slots], minlength=num_experts)  # (E,)
    offs = torch.cumsum(counts, 0).to(torch.int32)  # (E,) cumulative end offsets
    xs = x.index_select(0, slots // k)  # (M, H)
    h = grouped_matmul(xs, w13.transpose(1, 2), offs)  # (M, 2I)
    y = grouped_matmul(swiglu_act(h), w2.transpose(1, 2), offs)  # (M, H)
    return _combine(y, slots, router.weights, n).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# layers


class MoEFFN(nn.Module):
    """Top-k routed SwiGLU experts. forward(x) -> (y, RouterOutput), y shaped like x.

    A token whose every assignment was dropped gets y = 0 (the residual outside carries it)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate = nn.Linear(h, e, bias=False)  # router, weight (E, H)
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h))  # (E, 2I, H) [w1 gate_proj; w3 up_proj]
        self.w2 = nn.Parameter(torch.empty(e, h, i))  # (E, H, I) down_proj
        self.reset_parameters()

    def reset_parameters(self):
        for p in (self.gate.weight, self.w13, self.w2):
            nn.init.normal_(p, mean=0.0, std=self.cfg.init_std)

    @property
    def w1(self) -> torch.Tensor:
        """(E, I, H) view: the gate projection of every expert."""
        return self.w13[:, : self.cfg.intermediate_size]

    @property
    def w3(self) -> torch.Tensor:
        """(E, I, H) view: the up projection of every expert."""
        return self.w13[:, self.cfg.intermediate_size :]

    def route(self, x: torch.Tensor) -> tuple[RouterOutput, torch.Tensor]:
        """Router step for x: (N, H). Returns the RouterOutput and the expert-sorted slot order."""
        cfg = self.cfg
        xr = x
        if self.training and cfg.router_jitter > 0:  # jitter the router's input only (Switch)
            xr = x * torch.empty_like(x).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
        logits = self.gate(xr)  # (N, E)
        probs = F.softmax(logits.float(), dim=-1)  # (N, E) fp32
        weights, indices = torch.topk(probs, cfg.top_k, dim=-1)  # (N, k), (N, k)
        if cfg.normalize_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)  # (N, k)
        capacity = expert_capacity(x.shape[0], cfg)
        positions, keep, order = assign_seats(indices, weights, cfg.num_experts, capacity, cfg.drop_policy)
        router = RouterOutput(
            logits=logits,
            probs=probs,
            indices=indices,
            weights=weights,
            keep=keep,
            positions=positions,
            capacity=capacity,
            tokens_per_expert=torch.bincount(indices.reshape(-1), minlength=cfg.num_experts),
            aux_loss=cfg.aux_loss_coef * load_balancing_loss(probs, indices, cfg.num_experts),
            z_loss=cfg.z_loss_coef * router_z_loss(logits),
            drop_rate=(~keep).sum() / max(keep.numel(), 1),
        )
        return router, order

    def forward(self, x: torch.Tensor, impl: str | None = None) -> tuple[torch.Tensor, RouterOutput]:
        """x: (B, T, H) or (N, H). ``impl`` overrides cfg.impl (same weights, same routing)."""
        impl = impl or self.cfg.impl
        if impl not in IMPLS:
            raise ConfigError(f"impl={impl!r}: choose one of {IMPLS}")
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        router, order = self.route(x)
        if impl == "naive":
            y = naive_moe_experts(x, self.w13, self.w2, router.indices, router.weights, router.keep)
        elif impl == "padded":
            y = padded_moe_experts(x, self.w13, self.w2, router)
        else:
            y = grouped_moe_experts(x, self.w13, self.w2, router, order)
        return y.view(shape), router  # (..., H)

    def hf_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """This layer's weights under transformers 5.x Mixtral names (``MixtralSparseMoeBlock``);
        pass e.g. ``prefix="model.layers.0.mlp."``. The tensors are shared, not copied."""
        return {
            prefix + "gate.weight": self.gate.weight,
            prefix + "experts.gate_up_proj": self.w13,
            prefix + "experts.down_proj": self.w2,
        }

    @torch.no_grad()
    def load_hf_state_dict(self, state: dict[str, torch.Tensor], prefix: str = ""):
        """Inverse of ``hf_state_dict``: copy Mixtral-named tensors into this layer."""
        for name, param in self.hf_state_dict(prefix).items():
            param.copy_(state[name])


class DenseFFN(nn.Module):
    """Dense SwiGLU FFN ``w2(silu(w1 x) * w3 x)`` (Llama/Mixtral expert), the dense baseline.

    An equal-total-parameter baseline for an MoEConfig uses intermediate_size = E * I; an
    equal-active one k * I (``DenseFFN.matching``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, init_std: float = 0.02):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)  # gate_proj, weight (I, H)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)  # up_proj, weight (I, H)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)  # down_proj, weight (H, I)
        for lin in (self.w1, self.w3, self.w2):
            nn.init.normal_(lin.weight, mean=0.0, std=init_std)

    @classmethod
    def matching(cls, cfg: MoEConfig, match: Literal["total", "active"] = "total") -> DenseFFN:
        """The dense FFN with the MoE layer's total (E*I) or active (k*I) expert parameters."""
        if match not in ("total", "active"):
            raise ConfigError(f"match={match!r}: choose 'total' or 'active'")
        width = cfg.num_experts if match == "total" else cfg.top_k
        return cls(cfg.hidden_size, width * cfg.intermediate_size, cfg.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (..., H)


# ----------------------------------------------------------------------------------------------
# analytic costs


def dense_flops_per_token(hidden_size: int, intermediate_size: int) -> int:
    """Forward FLOPs of one SwiGLU FFN per token: three (H x I) matmuls, 2 FLOPs per
    multiply-add: 2 * 3 * H * I (elementwise silu/product ignored)."""
    return 2 * 3 * hidden_size * intermediate_size


def moe_flops_per_token(cfg: MoEConfig) -> int:
    """Forward FLOPs of the MoE layer per token: k * 2*3*H*I (the k experts it visits) + 2*H*E (the
    router). Useful work only: the padded path also multiplies its padding; dropped slots save some."""
    return cfg.top_k * dense_flops_per_token(cfg.hidden_size, cfg.intermediate_size) + (
        2 * cfg.hidden_size * cfg.num_experts
    )


def param_counts(cfg: MoEConfig) -> tuple[int, int]:
    """(total, active-per-token) parameters of the layer: E (or k) experts of 3*H*I, + router H*E."""
    expert = 3 * cfg.hidden_size * cfg.intermediate_size
    router = cfg.hidden_size * cfg.num_experts
    return cfg.num_experts * expert + router, cfg.top_k * expert + router
