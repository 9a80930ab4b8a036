"""The pre-attention predictor: a layer's experts from the residual stream before a layer's attention (notebook 05).

*What it reads.* For source layer l, the residual stream entering the decoder block of MoE layer l,
before that block's attention (:attr:`routelib.routing.predict.dataset.HiddenStates.pre_attention`;
for layer 0 the token embeddings, for l > 0 the output of block l - 1), normalised to unit RMS per
token (parameter-free; the residual's scale grows with depth).

*What it predicts, and why.* The experts of layer l + h, h >= 1: the same (source layer, hop) pairs
as every other predictor, so it sits in the same tables. Every other predictor of a pair (l, h) uses
what is known once layer l's router has run; the state before layer l's attention is known one
attention *earlier* (when block l - 1 finishes). So it uses no more than its table-mates -- it is
leak-free by the same argument -- and its prediction can be issued earlier: in the offloading model
(:mod:`.offload`), whose layer visit is attention plus experts, it is issued exactly at the start of
layer l's visit, where a router-input predictor would in truth have to wait for layer l's attention.
Beside ``hidden_probe`` it measures what layer l's attention adds to the prediction. Predicting layer
l's *own* experts from its block input (a "hop 0") is left out on purpose: it would hide a copy
behind one attention only, and in every machine profile of :mod:`.offload` one expert copy takes
several times a whole layer's compute.

*Leak-free.* The block input of layer l at token t depends on tokens 0..t and layers < l only
(causal attention; :func:`~routelib.routing.predict.dataset.attach_hidden_states` recomputes it from
the token ids), never on layer l + h's routing; the probe reads source layer l's state only.

*The model.* A linear probe per (l, h), as ``hidden_probe`` (Pre-gated MoE's "pre-gate", Hwang et
al., ISCA 2024, trained after the fact on a frozen model), initialised from layer l + h's router and
trained with soft cross-entropy against layer l + h's gate vector
(:class:`~routelib.routing.predict.predictors.HiddenProbePredictor`, whose training it shares). The
observation that the residual stream changes little from layer to layer, so that a later gate can
score an earlier state, is Eliseev & Mazur 2023 ("Fast Inference of Mixture-of-Experts Language Models
with Offloading", speculative expert loading).
"""

from __future__ import annotations

import numpy as np
import torch

from routelib.routing.predict.dataset import RoutingData, need_pre_attention
from routelib.routing.predict.predictors import HiddenProbePredictor

RMS_EPS = 1e-6  # added to the mean square before the square root (an all-zero state stays zero)


def rms_normalise(x: torch.Tensor) -> torch.Tensor:
    """(..., H) states -> float32, scaled to unit root-mean-square over H (no learned weight)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)  # (..., H)


class PreAttentionProbePredictor(HiddenProbePredictor):
    """A linear probe per (l, h) on the RMS-normalised input of layer l's decoder block (before its
    attention), predicting layer l + h's gate vector; see the module docstring for the design."""

    name = "pre_attn_probe"

    def states(self, data: RoutingData) -> np.ndarray:
        """(N, L, H) float16: each MoE layer's decoder-block input, before its attention."""
        return need_pre_attention(data, self.name)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalise(x)
