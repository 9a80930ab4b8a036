"""Naive reference for the gated delta rule: one Python step per token, fp32 math.

This is the slow, obviously correct version that the chunked path in :mod:`routelib.models.gdn` (and
flash-linear-attention's Triton kernel, on a GPU) are tested against, in the flash-linear-attention
habit of keeping ``naive.py`` next to the kernel.

The rule (Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule",
ICLR 2025), per batch row and head, for t = 1..T:

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        # state (Dk, Dv)
    o_t = scale * S_t^T q_t                                                 # (Dv,)

with ``alpha_t = exp(g_t)`` in (0, 1] (the gate is passed in log space, g <= 0) and ``beta_t`` in
[0, 1]. Written as one step: decay ``S <- alpha S``, read what the memory holds for key k,
``S^T k``, and move it towards v by beta: ``S <- S + beta k (v - S^T k)^T``. With ``||k|| = 1`` and
``beta <= 1`` the transition ``I - beta k k^T`` has eigenvalues in [0, 1], so the state cannot blow
up; that is why the layer L2-normalises keys (queries too, so the readout is bounded).

Conventions (shared by every implementation in :mod:`routelib.models.gdn` and by fla's
``chunk_gated_delta_rule``):

- layout is sequence-first: q, k (B, T, H, Dk); v (B, T, H, Dv); g, beta (B, T, H);
- ``scale`` defaults to ``Dk ** -0.5`` (fla's default, also used by Qwen3-Next) -- applied to the
  readout even though q is L2-normalised, as fla's GatedDeltaNet layer does;
- the state is (B, H, Dk, Dv), key dimension first, and always fp32;
- inputs of any float dtype are computed in fp32; the output has v's dtype.
"""

from __future__ import annotations

import torch

from routelib.errors import ConfigError


def check_rule_inputs(q, k, v, g, beta, initial_state=None) -> tuple[int, int, int, int, int]:
    """Validate shapes of the gated-delta-rule inputs; return (B, T, H, Dk, Dv)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ConfigError(f"q and k must both be (B, T, H, Dk); got {tuple(q.shape)} and {tuple(k.shape)}")
    b, t, h, dk = q.shape
    if v.dim() != 4 or v.shape[:3] != (b, t, h):
        raise ConfigError(f"v must be (B, T, H, Dv) = ({b}, {t}, {h}, Dv); got {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (b, t, h):
            raise ConfigError(f"{name} must be (B, T, H) = ({b}, {t}, {h}); got {tuple(x.shape)}")
    dv = v.shape[-1]
    if initial_state is not None and initial_state.shape != (b, h, dk, dv):
        raise ConfigError(f"initial_state must be (B, H, Dk, Dv) = ({b}, {h}, {dk}, {dv}); "
                          f"got {tuple(initial_state.shape)}")
    return b, t, h, dk, dv


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, token by token.

    Args:
        q, k: (B, T, H, Dk) queries and keys (the layer L2-normalises them; this function does not).
        v: (B, T, H, Dv) values.
        g: (B, T, H) log decay, ``alpha = exp(g)``; must be <= 0 for a decaying state.
        beta: (B, T, H) write strength in [0, 1]; beta = 0 and g = 0 leave the state unchanged.
        scale: readout scale; None = Dk ** -0.5.
        initial_state: (B, H, Dk, Dv) state before the first token; None = zeros.
        output_final_state: also return the state after the last token.

    Returns:
        o (B, T, H, Dv) in v's dtype, and the final state (B, H, Dk, Dv) fp32 or None.
    """
    b, t, h, dk, dv = check_rule_inputs(q, k, v, g, beta, initial_state)
    scale = dk ** -0.5 if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    alpha, betaf = g.float().exp(), beta.float()  # (B, T, H) each
    if initial_state is None:
        s = torch.zeros(b, h, dk, dv, dtype=torch.float32, device=q.device)  # (B, H, Dk, Dv)
    else:
        s = initial_state.float()
    outs = []
    for i in range(t):
        k_i, v_i = kf[:, i], vf[:, i]  # (B, H, Dk), (B, H, Dv)
        s = s * alpha[:, i, :, None, None]  # decay: (B, H, Dk, Dv)
        read = torch.einsum("bhk,bhkv->bhv", k_i, s)  # what the memory returns for k_i: (B, H, Dv)
        delta = betaf[:, i, :, None] * (v_i - read)  # (B, H, Dv)
        s = s + k_i[..., :, None] * delta[..., None, :]  # rank-1 write: (B, H, Dk, Dv)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", qf[:, i], s))  # (B, H, Dv)
    o = torch.stack(outs, dim=1) if outs else vf.new_zeros(b, 0, h, dv)  # (B, T, H, Dv)
    return o.to(v.dtype), (s if output_final_state else None)
