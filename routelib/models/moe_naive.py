"""Naive reference for the MoE expert computation: a Python loop over experts.

This is the slow, obviously correct version that the fast paths in :mod:`routelib.models.moe`
(``padded`` and ``grouped``) are tested against, in the flash-linear-attention habit of keeping
``naive.py`` next to the kernel. It does what the Mixtral reference code in Hugging Face
transformers does: for each expert, gather its tokens, run the SwiGLU FFN, scale by the gate and
add the result back into the token's row. It is exact but launches ~4 small matmuls per expert and
synchronises with the host once per expert, so it is only fast enough for tests and tiny models.

Routing (logits -> top-k -> capacity) is not done here: the caller passes the routing decision in,
so every implementation sees the very same assignments and the very same keep-mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN (Shazeer 2020, as in Llama/Mixtral): ``w2(silu(w1 x) * w3 x)``.

    x: (n, H); w1, w3: (I, H); w2: (H, I) -- nn.Linear (out, in) layout. Returns (n, H).
    """
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)  # (n, H)


def naive_moe_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    keep: torch.Tensor,
) -> torch.Tensor:
    """Reference expert mixture ``y_n = sum_j keep_nj * weights_nj * FFN_{indices_nj}(x_n)``.

    Args:
        x: (N, H) token features.
        w13: (E, 2I, H) fused gate/up weights; rows [:I] are w1 (gate_proj), rows [I:] w3 (up_proj).
        w2: (E, H, I) down-projection weights.
        indices: (N, k) chosen expert of each token-slot.
        weights: (N, k) gate of each token-slot (any float dtype; applied in fp32).
        keep: (N, k) bool, False where capacity dropped the assignment.

    Returns:
        (N, H) in x's dtype. A token dropped from all its experts gets a zero row.
    """
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # (N, H) fp32 accumulator
    for e in range(num_experts):
        tok, slot = torch.where((indices == e) & keep)  # (n_e,), (n_e,)
        if tok.numel() == 0:
            continue  # an empty expert contributes nothing (and gets a zero gradient)
        h = x.index_select(0, tok)  # (n_e, H)
        y = swiglu(h, w13[e, :inter], w13[e, inter:], w2[e])  # (n_e, H)
        gate = weights[tok, slot].float().unsqueeze(-1)  # (n_e, 1)
        out.index_add_(0, tok, y.float() * gate)  # (N, H)
    return out.to(x.dtype)
