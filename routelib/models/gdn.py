"""Gated DeltaNet: a linear-attention layer whose memory is updated by the gated delta rule.

References:
1) Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule", ICLR 2025
   -- the rule ``S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` and the layer
   (short convolution, L2-normalised q/k, decay gate alpha, write strength beta, output gate + norm).
2) Yang, Wang, Zhang, Shen & Kim, "Parallelizing Linear Transformers with the Delta Rule over
   Sequence Length", NeurIPS 2024 -- the chunked WY / UT-transform form implemented here.
3) Dao & Gu, "Transformers are SSMs" (Mamba2), ICML 2024 -- the decay parametrisation
   ``alpha = exp(-exp(A_log) * softplus(a + dt_bias))`` and its initialisation.

The rule itself (conventions, the token-by-token reference) is documented in
:mod:`routelib.models.gdn_naive`. In short: sequence-first layout, q/k (B, T, H, Dk), v (B, T, H, Dv),
log-space gate g = log alpha <= 0 and beta in [0, 1] as (B, T, H), fp32 state (B, H, Dk, Dv) with the
key dimension first, readout ``o_t = scale * S_t^T q_t`` with ``scale = Dk ** -0.5`` by default --
the layout and conventions of flash-linear-attention's ``chunk_gated_delta_rule``, so the three
implementations are interchangeable:

- :func:`gated_delta_rule_recurrent` (naive, one step per token) -- the reference;
- :func:`gated_delta_rule_chunked` -- pure PyTorch, chunks of C tokens; equal to the reference;
- fla's Triton kernel (``fla.ops.gated_delta_rule.chunk_gated_delta_rule``) on CUDA when installed;

and :func:`gated_delta_rule` dispatches between them (``backend="auto" | "torch" | "fla" | "naive"``).

How the chunked form works. Write one step as ``S_t = alpha_t S_{t-1} + k_t u_t^T`` with the
"pseudo-value" ``u_t = beta_t (v_t - alpha_t S_{t-1}^T k_t)``. Inside a chunk that starts from state
S_0, with cumulative decays ``G_i = alpha_1 ... alpha_i``, the u's solve a unit lower-triangular
system ``(I + A) U = diag(beta) V - diag(beta G) K S_0`` where ``A_ij = beta_i (G_i / G_j) k_i^T k_j``
(j < i). So ``U = U0 - W S_0`` with ``U0 = (I + A)^-1 diag(beta) V`` and ``W = (I + A)^-1 diag(beta G) K``
(the UT transform: one triangular solve per chunk, all chunks at once). Then, chunk after chunk,

    U   = U0 - W S                                           # (C, Dv)
    O   = scale * (diag(G) Q S + (Q K^T * D) U)              # D_ij = G_i / G_j for j <= i, else 0
    S  <- G_C S + (K * (G_C / G))^T U                        # the state at the end of the chunk

so only the (T / C)-step loop over chunks is sequential; everything else is a batched matmul.

The layer, x (B, T, hidden) -> (B, T, hidden), as in fla's ``GatedDeltaNet``:

    q, k, v = SiLU(causal depthwise conv_4([W_q x, W_k x, W_v x]))      # (B, T, H*Dk / H*Dv)
    q, k    = L2-normalise(q), L2-normalise(k)                          # per head
    g       = -exp(A_log) * softplus(W_a x + dt_bias)                   # (B, T, H) log alpha
    beta    = sigmoid(W_b x)                                            # (B, T, H)
    o       = gated_delta_rule(q, k, v, g, beta)                        # (B, T, H, Dv)
    y       = W_o (RMSNorm_head(o) * SiLU(W_g x))                       # (B, T, hidden)

``write_mask`` (B, T) bool lets only some tokens write to the memory (the routed model: only
GDN-routed tokens). ``GDNConfig.mask_mode`` says what the others do:

- ``"skip"`` (default): masked tokens are *absent*. The written tokens of each row are gathered to the
  front (order kept), the layer runs on that compacted sequence (length = the most written tokens in
  any row), and the outputs are scattered back. A masked token enters neither the short convolution
  nor the state, costs no compute beyond the gather, and gets an output of exactly 0. For a written
  token the output equals that of the layer run on the row's written tokens alone.
- ``"passthrough"``: every token is projected and convolved as usual (so a masked token's input does
  reach its neighbours' k/v through the convolution), but masked tokens get beta = 0 and alpha = 1,
  so the recurrent state passes through them unchanged; their outputs are computed (a read of the
  current state through their own q and output gate).

Decoding: ``use_cache=True`` returns a :class:`GDNCache` (the last conv_size - 1 convolution inputs
and the recurrent state); feeding it back continues the sequence, so T = 1 steps cost O(1) each.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from routelib.errors import ConfigError
from routelib.models.gdn_naive import check_rule_inputs, gated_delta_rule_recurrent
from routelib.models.lm import RMSNorm

Backend = Literal["auto", "torch", "fla", "naive"]
BACKENDS = ("auto", "torch", "fla", "naive")
MASK_MODES = ("skip", "passthrough")


# ----------------------------------------------------------------------------------------------
# the rule


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule in chunks of ``chunk_size`` tokens (WY / UT-transform form), fp32 math.

    Same arguments, conventions and results as
    :func:`~routelib.models.gdn_naive.gated_delta_rule_recurrent`; any chunk size gives the same
    output up to rounding (it trades the length of the sequential loop, T / C, against C x C
    intra-chunk matrices). T need not be a multiple of the chunk: the tail is padded with
    identity steps (beta = 0, g = 0). Sequences shorter than a chunk use one chunk of length T.

    Returns o (B, T, H, Dv) in v's dtype and the final state (B, H, Dk, Dv) fp32, or None.
    """
    b, t, h, dk, dv = check_rule_inputs(q, k, v, g, beta, initial_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    scale = dk ** -0.5 if scale is None else scale
    dev = q.device
    state = (torch.zeros(b, h, dk, dv, dtype=torch.float32, device=dev) if initial_state is None
             else initial_state.float())  # (B, H, Dk, Dv)
    if t == 0:
        return v.new_zeros(b, 0, h, dv), (state if output_final_state else None)
    c = min(chunk_size, t)
    pad = (-t) % c
    n = (t + pad) // c

    def heads_first(x):  # (B, T, H, ...) -> (B, H, N, C, ...) fp32, zero-padded along T
        x = x.float().transpose(1, 2)  # (B, H, T, ...)
        if pad:
            x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
        return x.reshape(b, h, n, c, *x.shape[3:])

    qc, kc, vc = heads_first(q) * scale, heads_first(k), heads_first(v)  # (B, H, N, C, Dk/Dk/Dv)
    gc, bc = heads_first(g), heads_first(beta)  # (B, H, N, C); padding: g = 0, beta = 0 (identity steps)

    gam = gc.cumsum(-1)  # (B, H, N, C) log G_i: decay from the chunk start to token i (inclusive)
    causal = torch.ones(c, c, dtype=torch.bool, device=dev).tril()  # (C, C) j <= i
    # D_ij = G_i / G_j for j <= i; masked before exp, so no overflow from j > i
    decay = torch.exp((gam[..., :, None] - gam[..., None, :]).masked_fill(~causal, float("-inf")))  # (B,H,N,C,C)

    # UT transform: (I + A) [U0, W] = [diag(beta) V, diag(beta G) K], A strictly lower triangular
    a = (bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * decay).tril(-1)  # (B, H, N, C, C)
    eye = torch.eye(c, dtype=torch.float32, device=dev)
    rhs = torch.cat((bc[..., None] * vc, (bc * gam.exp())[..., None] * kc), dim=-1)  # (B, H, N, C, Dv+Dk)
    u0, w = torch.linalg.solve_triangular(a + eye, rhs, upper=False, unitriangular=True).split((dv, dk), -1)

    scores = (qc @ kc.transpose(-1, -2)) * decay  # (B, H, N, C, C) intra-chunk, causal, decayed
    q_in = qc * gam.exp()[..., None]  # (B, H, N, C, Dk) queries reading the chunk's start state
    k_out = kc * (gam[..., -1:] - gam).exp()[..., None]  # (B, H, N, C, Dk) keys decayed to the chunk end
    g_chunk = gam[..., -1].exp()[..., None, None]  # (B, H, N, 1, 1) total decay over each chunk

    outs = []
    for i in range(n):  # sequential over chunks only
        u = u0[:, :, i] - w[:, :, i] @ state  # (B, H, C, Dv) pseudo-values given the start state
        outs.append(q_in[:, :, i] @ state + scores[:, :, i] @ u)  # (B, H, C, Dv)
        state = g_chunk[:, :, i] * state + k_out[:, :, i].transpose(-1, -2) @ u  # (B, H, Dk, Dv)
    o = torch.stack(outs, dim=2).reshape(b, h, n * c, dv)[:, :, :t]  # (B, H, T, Dv)
    return o.transpose(1, 2).to(v.dtype), (state if output_final_state else None)  # (B, T, H, Dv)


@functools.lru_cache(maxsize=None)
def fla_available() -> bool:
    """True when flash-linear-attention's gated-delta-rule kernel imports (needs triton)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
    except Exception:  # ImportError, or triton failing to initialise
        return False
    return True


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The implementation ``backend`` means on ``device``: "fla", "torch" or "naive".

    "auto" is fla's Triton kernel on CUDA when it is installed, else the chunked PyTorch rule.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r}: choose one of {BACKENDS}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "fla" if on_cuda and fla_available() else "torch"
    if backend == "fla":
        if not fla_available():
            raise ConfigError("backend='fla' needs flash-linear-attention and triton: "
                              "pip install flash-linear-attention (a CUDA GPU too); "
                              "or use backend='auto' / 'torch' for the pure-PyTorch chunked rule")
        if not on_cuda:
            raise ConfigError(f"backend='fla' runs on CUDA tensors only, got device {device}; use 'torch' on CPU")
    return backend


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule by the chosen implementation (see :func:`resolve_backend`).

    Arguments and results as :func:`gated_delta_rule_chunked` (q, k (B, T, H, Dk); v (B, T, H, Dv);
    g, beta (B, T, H); state (B, H, Dk, Dv) fp32). q and k are used as given: normalise them first.
    ``chunk_size`` only affects the "torch" backend (fla picks its own).
    """
    impl = resolve_backend(backend, q.device)
    if impl == "naive":
        return gated_delta_rule_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state)
    if impl == "torch":
        return gated_delta_rule_chunked(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
    _, _, _, dk, _ = check_rule_inputs(q, k, v, g, beta, initial_state)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    o, state = chunk_gated_delta_rule(
        q, k, v.to(q.dtype), g.float(), beta.to(q.dtype),
        scale=dk ** -0.5 if scale is None else scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
    )
    return o.to(v.dtype), state


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, in fp32, cast back to x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# the layer


@dataclass
class GDNConfig:
    hidden_size: int = 256  # width of the residual stream the layer reads and writes
    num_heads: int = 4  # heads, each with its own (Dk, Dv) memory
    head_dim: int | None = None  # Dk: query/key width per head; None = hidden_size // num_heads
    head_dim_v: int | None = None  # Dv: value width per head; None = head_dim (fla's layer defaults to 2 * Dk)
    conv_size: int = 4  # kernel of the causal depthwise convolution on q, k, v; 1 = no token mixing
    norm_eps: float = 1e-5  # epsilon of the per-head output RMSNorm
    chunk_size: int = 64  # tokens per chunk of the pure-PyTorch rule (speed only; results are equal)
    backend: Backend = "auto"  # "auto": fla on CUDA if installed, else "torch" (chunked); "naive": token loop
    mask_mode: Literal["skip", "passthrough"] = "skip"  # write_mask=False tokens: "skip" = absent from
    # the layer (no conv, no state, output 0); "passthrough" = beta=0, alpha=1, output still computed
    A_init_range: tuple[float, float] = (1.0, 16.0)  # Mamba2 init: A ~ U(range), A_log = log A, per head
    dt_min: float = 1e-3  # Mamba2 init: dt ~ exp(U(log dt_min, log dt_max)), dt_bias = softplus^-1(dt),
    dt_max: float = 0.1  # so at init alpha = exp(-A dt) lies in about [exp(-1.6), 0.999]
    init_std: float = 0.02  # std of the normal init of every projection (o_proj: see reset_parameters)

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "conv_size", "chunk_size"):
            _check_int(name, getattr(self, name))
        for name in ("head_dim", "head_dim_v"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"GDNConfig.hidden_size={self.hidden_size} is not divisible by GDNConfig."
                              f"num_heads={self.num_heads}: pick a head count that divides it, or set head_dim")
        if self.backend not in BACKENDS:
            raise ConfigError(f"GDNConfig.backend={self.backend!r}: choose one of {BACKENDS}")
        if self.mask_mode not in MASK_MODES:
            raise ConfigError(f"GDNConfig.mask_mode={self.mask_mode!r}: choose one of {MASK_MODES}")
        lo, hi = self.A_init_range
        if not 0 < lo <= hi:
            raise ConfigError(f"GDNConfig.A_init_range={self.A_init_range!r} must satisfy 0 < low <= high")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"GDNConfig: need 0 < dt_min <= dt_max, got {self.dt_min!r}, {self.dt_max!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"GDNConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.init_std >= 0:
            raise ConfigError(f"GDNConfig.init_std must be >= 0, got {self.init_std!r}")

    @property
    def key_dim(self) -> int:
        """Dk: head_dim, or hidden_size // num_heads when head_dim is None."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def value_dim(self) -> int:
        """Dv: head_dim_v, or Dk when head_dim_v is None."""
        return self.head_dim_v if self.head_dim_v is not None else self.key_dim


def _check_int(name: str, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"GDNConfig.{name} must be an int >= 1, got {value!r}")


@dataclass
class GDNCache:
    conv: torch.Tensor  # (B, conv_size - 1, C) the last convolution inputs (q|k|v projections) written
    state: torch.Tensor  # (B, H, Dk, Dv) fp32 recurrent state after the last written token


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer: ``GatedDeltaNet(GDNConfig(...))(x) -> y``, x and y (B, T, hidden)."""

    def __init__(self, cfg: GDNConfig):
        super().__init__()
        self.config = cfg
        hid, nh, dk, dv = cfg.hidden_size, cfg.num_heads, cfg.key_dim, cfg.value_dim
        self.conv_dim = nh * (2 * dk + dv)  # C: channels of the short convolution (q | k | v)
        self.q_proj = nn.Linear(hid, nh * dk, bias=False)  # weight (H*Dk, hidden)
        self.k_proj = nn.Linear(hid, nh * dk, bias=False)  # weight (H*Dk, hidden)
        self.v_proj = nn.Linear(hid, nh * dv, bias=False)  # weight (H*Dv, hidden)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_size, groups=self.conv_dim,
                                bias=False)  # depthwise, weight (C, 1, conv_size); causal by left padding
        self.a_proj = nn.Linear(hid, nh, bias=False)  # decay input, weight (H, hidden)
        self.A_log = nn.Parameter(torch.empty(nh))  # (H,) log decay rate
        self.dt_bias = nn.Parameter(torch.empty(nh))  # (H,)
        self.b_proj = nn.Linear(hid, nh, bias=False)  # write strength, weight (H, hidden)
        self.g_proj = nn.Linear(hid, nh * dv, bias=False)  # output gate, weight (H*Dv, hidden)
        self.o_norm = RMSNorm(dv, cfg.norm_eps)  # per head, weight (Dv,) shared by the heads
        self.o_proj = nn.Linear(nh * dv, hid, bias=False)  # weight (hidden, H*Dv), residual projection
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, out_std: float | None = None):
        """Projections ~ normal(0, init_std), o_proj ~ normal(0, out_std or init_std) (a model passes
        init_std / sqrt(2 L) for residual projections); the convolution keeps PyTorch's default init;
        A_log, dt_bias as Mamba2 (see GDNConfig); the norm weight is 1."""
        cfg = self.config
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj, self.g_proj):
            nn.init.normal_(lin.weight, 0.0, cfg.init_std)
        nn.init.normal_(self.o_proj.weight, 0.0, cfg.init_std if out_std is None else out_std)
        self.conv1d.reset_parameters()
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*cfg.A_init_range).log())
        dt = torch.empty_like(self.dt_bias).uniform_(math.log(cfg.dt_min), math.log(cfg.dt_max)).exp()
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.o_norm.weight.fill_(1.0)

    def _conv(self, x: torch.Tensor, past: torch.Tensor | None, lengths: torch.Tensor | None):
        """Causal depthwise convolution. x (B, T, C); past (B, K-1, C) or None (zeros); lengths (B,)
        valid tokens per row (None: all T). Returns y (B, T, C) and the new past (B, K-1, C): the
        last K-1 inputs up to each row's length."""
        b, t, c = x.shape
        km1 = self.config.conv_size - 1
        past = x.new_zeros(b, km1, c) if past is None else past.to(x.dtype)
        xp = torch.cat((past, x), dim=1)  # (B, K-1+T, C)
        y = F.conv1d(xp.transpose(1, 2), self.conv1d.weight, groups=c).transpose(1, 2)  # (B, T, C)
        if lengths is None:
            new_past = xp[:, t:]  # (B, K-1, C)
        else:
            idx = lengths[:, None] + torch.arange(km1, device=x.device)  # (B, K-1) in xp coordinates
            new_past = xp.gather(1, idx[..., None].expand(-1, -1, c))  # (B, K-1, C)
        return y, new_past

    def features(self, x: torch.Tensor, conv_past: torch.Tensor | None = None,
                 lengths: torch.Tensor | None = None):
        """The rule's inputs for x (B, T, hidden): q, k (B, T, H, Dk) L2-normalised; v (B, T, H, Dv);
        g (B, T, H) fp32 log decay; beta (B, T, H) fp32; and the new convolution past (B, K-1, C)."""
        cfg = self.config
        b, t, _ = x.shape
        nh, dk, dv = cfg.num_heads, cfg.key_dim, cfg.value_dim
        qkv = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)  # (B, T, C)
        qkv, conv_past = self._conv(qkv, conv_past, lengths)
        q, k, v = F.silu(qkv).split((nh * dk, nh * dk, nh * dv), dim=-1)
        q = l2norm(q.reshape(b, t, nh, dk))  # (B, T, H, Dk)
        k = l2norm(k.reshape(b, t, nh, dk))  # (B, T, H, Dk)
        v = v.reshape(b, t, nh, dv)  # (B, T, H, Dv)
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())  # (B, T, H)
        beta = torch.sigmoid(self.b_proj(x).float())  # (B, T, H)
        return q, k, v, g, beta, conv_past

    def _core(self, x, write, cache, use_cache, lengths=None):
        """The layer on x (B, T, hidden) with masked tokens passed through (beta = 0, alpha = 1)."""
        cfg = self.config
        b, t, _ = x.shape
        q, k, v, g, beta, conv_past = self.features(x, None if cache is None else cache.conv, lengths)
        if write is not None:
            g = g.masked_fill(~write[..., None], 0.0)  # alpha = 1
            beta = beta.masked_fill(~write[..., None], 0.0)  # no write
        o, state = gated_delta_rule(q, k, v, g, beta, initial_state=None if cache is None else cache.state,
                                    output_final_state=use_cache, chunk_size=cfg.chunk_size,
                                    backend=cfg.backend)  # (B, T, H, Dv)
        gate = F.silu(self.g_proj(x)).reshape(b, t, cfg.num_heads, cfg.value_dim)  # (B, T, H, Dv)
        y = self.o_proj((self.o_norm(o) * gate).reshape(b, t, -1))  # (B, T, hidden)
        return y, (GDNCache(conv_past, state) if use_cache else None)

    def forward(self, x: torch.Tensor, write_mask: torch.Tensor | None = None,
                cache: GDNCache | None = None, use_cache: bool = False):
        """x: (B, T, hidden). write_mask: (B, T) bool, False = the token does not write (see the module
        docstring and GDNConfig.mask_mode); None = every token writes. cache: from an earlier call
        with use_cache=True; the sequence continues after it (it is not modified).

        Returns y (B, T, hidden), or (y, GDNCache) with use_cache=True.
        """
        b, t, hid = x.shape
        if cache is not None and cache.state.shape[0] != b:
            raise ConfigError(f"cache is for batch {cache.state.shape[0]}, x has batch {b}")
        if write_mask is None or self.config.mask_mode == "passthrough":
            if write_mask is not None:
                _check_mask(write_mask, b, t)
            y, new = self._core(x, write_mask, cache, use_cache)
            return (y, new) if use_cache else y
        _check_mask(write_mask, b, t)
        counts = write_mask.sum(1)  # (B,) written tokens per row
        order = torch.argsort((~write_mask).to(torch.int8), dim=1, stable=True)  # (B, T) written first
        tc = max(int(counts.max()), 1) if t else 0  # compacted length (one host sync)
        idx = order[:, :tc, None].expand(-1, -1, hid)  # (B, T', hidden)
        valid = torch.arange(tc, device=x.device) < counts[:, None]  # (B, T') a real written token
        yc, new = self._core(x.gather(1, idx), valid, cache, use_cache, lengths=counts)  # (B, T', hidden)
        y = yc.new_zeros(b, t, hid).scatter(1, idx, yc.masked_fill(~valid[..., None], 0.0))  # (B, T, hidden), yc's dtype (autocast)
        return (y, new) if use_cache else y


def _check_mask(mask: torch.Tensor, b: int, t: int):
    if mask.dtype != torch.bool or mask.shape != (b, t):
        raise ConfigError(f"write_mask must be a bool tensor (B, T) = ({b}, {t}); "
                          f"got {mask.dtype} {tuple(mask.shape)}")
