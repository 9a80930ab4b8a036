"""Models: the layers the notebooks train and compare.

- :mod:`routelib.models.moe`        sparse MoE FFN (top-k router, capacity, aux/z losses) with naive,
                                    padded (GShard) and grouped-GEMM (MegaBlocks) expert paths,
                                    the dense SwiGLU baseline, analytic FLOPs and parameter counts
- :mod:`routelib.models.moe_naive`  the per-expert loop every fast MoE path is tested against
- :mod:`routelib.models.lm`         Mixtral-architecture decoder LM (GQA, RoPE, RMSNorm) with MoE or
                                    dense FFNs, KV-cache decoding, parameter counts and FLOPs
- :mod:`routelib.models.export`     Hugging Face Mixtral checkpoints to and from routelib LMs
- :mod:`routelib.models.gdn`        Gated DeltaNet layer; the gated delta rule chunked in PyTorch, or
                                    flash-linear-attention's kernel on CUDA
- :mod:`routelib.models.gdn_naive`  the token-by-token gated delta rule the fast paths are tested against
- :mod:`routelib.models.pathways`   a pretrained LM's MLPs split into N neuron-group pathways, routed top-k
                                    (sparse grouped-GEMM and dense-masked paths), GLBL and Switch losses
- :mod:`routelib.models.grouping`   which neurons form a pathway: balanced k-means of an MLP's neurons by
                                    co-activation or input weights (MoEfication), permuted into contiguous blocks
- :mod:`routelib.models.attention`  causal softmax attention (SDPA, RoPE) with the GDN layer's interface
- :mod:`routelib.models.hybrid`     4-layer GDN/softmax hybrids: static [GDN, GDN, GDN, softmax] and per-token
                                    routed (parallel router, Gumbel straight-through, balance loss)

Parameters follow Hugging Face transformers' Mixtral layout, so trained layers export by renaming
(``MoEFFN.hf_state_dict``).
"""

from routelib.models.attention import AttentionConfig, SoftmaxAttention
from routelib.models.export import export_hf, load_hf
from routelib.models.gdn import (
    GatedDeltaNet,
    GDNCache,
    GDNConfig,
    gated_delta_rule,
    gated_delta_rule_chunked,
)
from routelib.models.gdn_naive import gated_delta_rule_recurrent
from routelib.models.hybrid import HybridConfig, HybridLM, RoutedMixer
from routelib.models.lm import LM, LMConfig, LMOutput
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
from routelib.models.pathways import (
    PathwayMLP,
    PathwayRouter,
    RoutedLLM,
    RoutedLLMOutput,
    RoutingConfig,
    glbl_loss,
    switch_loss,
)

__all__ = [
    "AttentionConfig",
    "DenseFFN",
    "GDNCache",
    "GDNConfig",
    "GatedDeltaNet",
    "HybridConfig",
    "HybridLM",
    "LM",
    "LMConfig",
    "LMOutput",
    "MoEConfig",
    "MoEFFN",
    "PathwayMLP",
    "PathwayRouter",
    "RoutedLLM",
    "RoutedLLMOutput",
    "RoutedMixer",
    "RouterOutput",
    "RoutingConfig",
    "SoftmaxAttention",
    "dense_flops_per_token",
    "export_hf",
    "gated_delta_rule",
    "gated_delta_rule_chunked",
    "gated_delta_rule_recurrent",
    "glbl_loss",
    "grouped_matmul",
    "load_balancing_loss",
    "load_hf",
    "moe_flops_per_token",
    "naive_moe_experts",
    "param_counts",
    "router_z_loss",
    "switch_loss",
]
