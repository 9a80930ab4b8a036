"""Models: the layers the notebooks train and compare.

- :mod:`routelib.models.moe`        sparse MoE FFN (top-k router, capacity, aux/z losses) with naive,
                                    padded (GShard) and grouped-GEMM (MegaBlocks) expert paths,
                                    the dense SwiGLU baseline, analytic FLOPs and parameter counts
- :mod:`routelib.models.moe_naive`  the per-expert loop every fast MoE path is tested against

Parameters follow Hugging Face transformers' Mixtral layout, so trained layers export by renaming
(``MoEFFN.hf_state_dict``).
"""

from routelib.models.moe import (
    DenseFFN,
    MoEConfig,
    MoEFFN,
    RouterOutput,
    dense_flops_per_token,
    grouped_matmul,
    load_balancing_loss,
    moe_flops_per_token,
    param_counts,
    router_z_loss,
)
from routelib.models.moe_naive import naive_moe_experts

__all__ = [
    "DenseFFN",
    "MoEConfig",
    "MoEFFN",
    "RouterOutput",
    "dense_flops_per_token",
    "grouped_matmul",
    "load_balancing_loss",
    "moe_flops_per_token",
    "naive_moe_experts",
    "param_counts",
    "router_z_loss",
]
