"""Causal softmax self-attention with RoPE as a standalone token mixer, x (B, T, hidden) -> (B, T, hidden).

The same layer as the Mixtral-architecture LM's (:class:`routelib.models.lm.Attention`: grouped-query
attention, "rotate half" RoPE, ``F.scaled_dot_product_attention``), with its own small config and the
interface of :class:`routelib.models.gdn.GatedDeltaNet`, so hybrid models can stack either.
References: Vaswani et al. 2017 (attention), Su et al. 2021 (RoPE), Ainslie et al. 2023 (GQA).

Positions are 0..T-1, or continue after a cache: ``use_cache=True`` returns (k, v), each
(B, num_kv_heads, T_past + T, D) after RoPE, and passing it back as ``cache`` continues at T_past.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from routelib.errors import ConfigError
from routelib.models.lm import Attention, LMConfig, rope_cos_sin


@dataclass
class AttentionConfig:
    hidden_size: int = 256  # width of the residual stream the layer reads and writes
    num_heads: int = 4  # query heads
    num_kv_heads: int | None = None  # key/value heads (GQA); None = num_heads (multi-head attention)
    head_dim: int | None = None  # D: width of a head; None = hidden_size // num_heads. Must be even (RoPE)
    rope_theta: float = 10000.0  # RoPE base
    init_std: float = 0.02  # std of the normal init of the projections (o_proj: see reset_parameters)

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if value is None and name in ("num_kv_heads", "head_dim"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"AttentionConfig.{name} must be an int >= 1, got {value!r}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"AttentionConfig.hidden_size={self.hidden_size} is not divisible by "
                              f"AttentionConfig.num_heads={self.num_heads}: change one, or set head_dim")
        if self.head_size % 2:
            raise ConfigError(f"AttentionConfig head size {self.head_size} must be even: RoPE rotates pairs")
        if self.num_heads % self.kv_heads:
            raise ConfigError(f"AttentionConfig.num_kv_heads={self.kv_heads} must divide num_heads={self.num_heads}")
        if not self.rope_theta > 0:
            raise ConfigError(f"AttentionConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.init_std >= 0:
            raise ConfigError(f"AttentionConfig.init_std must be >= 0, got {self.init_std!r}")

    @property
    def head_size(self) -> int:
        """D: head_dim, or hidden_size // num_heads."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """num_kv_heads, or num_heads when None."""
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads


class SoftmaxAttention(Attention):
    """Causal SDPA attention with RoPE: ``SoftmaxAttention(AttentionConfig(...))(x) -> y``.

    Parameters (q_proj, k_proj, v_proj, o_proj) are those of :class:`routelib.models.lm.Attention`.
    """

    def __init__(self, cfg: AttentionConfig):
        super().__init__(LMConfig(hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                                  num_kv_heads=cfg.kv_heads, head_dim=cfg.head_size, num_experts=0,
                                  rope_theta=cfg.rope_theta))
        self.config = cfg
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, out_std: float | None = None):
        """q/k/v ~ normal(0, init_std); o_proj ~ normal(0, out_std or init_std)."""
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, 0.0, self.config.init_std)
        nn.init.normal_(self.o_proj.weight, 0.0, self.config.init_std if out_std is None else out_std)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                use_cache: bool = False):
        """x: (B, T, hidden) -> y (B, T, hidden), or (y, (k, v)) with use_cache=True."""
        t_past = 0 if cache is None else cache[0].shape[2]
        positions = torch.arange(t_past, t_past + x.shape[1], device=x.device)  # (T,)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.config.rope_theta, x.dtype)  # (T, D) each
        y, present = super().forward(x, cos, sin, cache)  # (B, T, hidden)
        return (y, present) if use_cache else y
