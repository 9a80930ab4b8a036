"""Subject v3 as a transformers-native MoE: the delta that ships, and the build that rebuilds the model.

The trained subject (a Llama-family dense model whose MLPs are :class:`~routelib.subject.moefy.MoEfiedMLP`)
is stored as a **delta** of the dense model -- everything training made or changed, nothing the dense
weights already hold: each layer's neuron order, router, shared-expert gate, low-rank factors of the
expert weights and (if trained) norm weights, in ``delta.safetensors``, plus ``delta.json`` with the
configuration and the sha256 of every tensor of the built model. :func:`build` applies the delta to the
dense weights and writes a folder that ``AutoModelForCausalLM.from_pretrained`` loads with no custom
code: ``MixtralForCausalLM`` without a shared expert, ``Qwen2MoeForCausalLM`` with one (its sigmoid-gated
shared expert is the form :class:`MoEfiedMLP` trains). The build is bit-identical on every machine: the
low-rank products are summed rank by rank in float64 with elementwise operations only (no matrix
multiply, whose summation order depends on the BLAS library), then rounded once to float32; the scale
factors applied (k, 2) are powers of two, exact in floating point.

Mapping (per layer, E experts of I_e neurons, top-k, shared expert of S neurons):
  router (E, H)                          -> mlp.gate.weight
  [gate_e; up_e] (E, 2 I_e, H)           -> mlp.experts.gate_up_proj
  k * down_e (E, H, I_e)                 -> mlp.experts.down_proj   (Mixtral's gates sum to 1; k makes
                                                                     equal gates the dense sum)
  shared gate/up (S, H), 2 * down (H, S) -> mlp.shared_expert.{gate,up,down}_proj.weight (Qwen2-MoE)
  shared gate (1, H)                     -> mlp.shared_expert_gate.weight
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from routelib.errors import ConfigError
from routelib.subject.moefy import MoEfiedMLP

FORMAT = "routelib-subject-delta"
FORMAT_VERSION = 1


def merged(w: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``w + scale * b @ a`` (w (..., out, in), a (..., r, in), b (..., out, r)) computed deterministically:
    the r rank-one terms are added one by one in float64 with elementwise products, then rounded once."""
    if a is None:
        return w.clone()
    acc = torch.zeros(w.shape, dtype=torch.float64)
    a64, b64 = a.double(), b.double()
    for j in range(a.shape[-2]):
        acc += b64[..., :, j:j + 1] * a64[..., j:j + 1, :]  # (..., out, 1) * (..., 1, in): exact products
    return (w.double() + scale * acc).to(w.dtype)


def effective_weights(moe: MoEfiedMLP) -> dict[str, torch.Tensor]:
    """Every weight of ``moe`` with its low-rank update merged (:func:`merged`)."""
    lora = moe.lora or {}
    return {name: merged(getattr(moe, name).detach(), lora.get(f"{name}_A"), lora.get(f"{name}_B"), moe.lora_scale)
            for name in MoEfiedMLP.LORA_TARGETS}


def hf_config(dense_config, moe: MoEfiedMLP, aux_loss_coef: float = 0.01):
    """The transformers config of the MoE: Mixtral (no shared expert) or Qwen2-MoE, with the dense
    Llama config's attention, vocabulary, norms and positions."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    d = dense_config
    if getattr(d, "attention_bias", False) or getattr(d, "mlp_bias", False):
        raise ConfigError("hf_config: the dense model has attention or MLP biases; only bias-free Llama models map")
    cfg = moe.cfg
    size = moe.gate_w.shape[1]
    common = dict(vocab_size=d.vocab_size, hidden_size=d.hidden_size, num_hidden_layers=d.num_hidden_layers,
                  num_attention_heads=d.num_attention_heads, num_key_value_heads=d.num_key_value_heads,
                  max_position_embeddings=d.max_position_embeddings, rms_norm_eps=d.rms_norm_eps,
                  tie_word_embeddings=d.tie_word_embeddings, bos_token_id=d.bos_token_id, eos_token_id=d.eos_token_id,
                  pad_token_id=getattr(d, "pad_token_id", None), hidden_act=d.hidden_act,
                  rope_parameters=dict(d.rope_parameters), num_experts_per_tok=cfg.top_k,
                  router_aux_loss_coef=aux_loss_coef, attention_dropout=0.0)
    if cfg.shared_size == 0:
        return MixtralConfig(**common, intermediate_size=size, num_local_experts=cfg.num_experts,
                             head_dim=d.head_dim, sliding_window=None, router_jitter_noise=0.0,
                             architectures=["MixtralForCausalLM"])
    return Qwen2MoeConfig(**common, num_experts=cfg.num_experts, moe_intermediate_size=size,
                          shared_expert_intermediate_size=cfg.shared_size, intermediate_size=d.intermediate_size,
                          norm_topk_prob=True, qkv_bias=False, decoder_sparse_step=1, mlp_only_layers=[],
                          use_sliding_window=False, architectures=["Qwen2MoeForCausalLM"])


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of the transformers MoE equivalent to ``model`` (a Llama model with MoEfied MLPs)."""
    from routelib.models.pathways import decoder_layers

    out = {name: t.detach().clone() for name, t in model.state_dict().items() if ".mlp." not in name}
    for i, blk in enumerate(decoder_layers(model)):
        moe = blk.mlp
        if not isinstance(moe, MoEfiedMLP):
            raise ConfigError(f"hf_state_dict: layer {i}'s MLP is {type(moe).__name__}, not a MoEfiedMLP")
        w = effective_weights(moe)
        p = f"model.layers.{i}.mlp."
        out[p + "gate.weight"] = moe.router.weight.detach().clone()
        out[p + "experts.gate_up_proj"] = torch.cat([w["gate_w"], w["up_w"]], dim=1).contiguous()  # (E, 2 I_e, H)
        out[p + "experts.down_proj"] = (moe.cfg.top_k * w["down_w"]).contiguous()  # (E, H, I_e)
        if moe.cfg.shared_size:
            out[p + "shared_expert.gate_proj.weight"] = w["shared_gate"]
            out[p + "shared_expert.up_proj.weight"] = w["shared_up"]
            out[p + "shared_expert.down_proj.weight"] = 2 * w["shared_down"]
            out[p + "shared_expert_gate.weight"] = moe.shared_gate_proj.weight.detach().clone()
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


def tensor_digests(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of every tensor's dtype, shape and bytes, by name."""
    out = {}
    for name in sorted(state):
        t = state[name].contiguous()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[name] = h.hexdigest()
    return out


def to_hf(model, aux_loss_coef: float = 0.01):
    """A transformers MoE model (eval mode) with ``model``'s function."""
    from transformers import AutoModelForCausalLM

    from routelib.subject.train import moe_layers

    config = hf_config(model.config, moe_layers(model)[0], aux_loss_coef)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ConfigError(f"to_hf: state dict mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


# ------------------------------------------------------------------------------------ the delta
def delta_tensors(model, train_norms: bool) -> dict[str, torch.Tensor]:
    """What the delta stores (module docstring): per layer order (int16), router, shared gate, LoRA
    factors; the norm weights if they were trained."""
    from routelib.models.pathways import decoder_layers

    out = {}
    for i, blk in enumerate(decoder_layers(model)):
        moe = blk.mlp
        out[f"layers.{i}.order"] = moe.order.to(torch.int16)
        out[f"layers.{i}.router"] = moe.router.weight.detach().clone()
        if moe.cfg.shared_size:
            out[f"layers.{i}.shared_gate"] = moe.shared_gate_proj.weight.detach().clone()
        for name, t in (moe.lora or {}).items():
            out[f"layers.{i}.lora.{name}"] = t.detach().clone()
    if train_norms:
        out.update({f"norm.{n}": p.detach().clone() for n, p in model.named_parameters() if n.endswith("norm.weight")})
    return out


def write_delta(model, folder: str | Path, *, train_norms: bool, lora_rank: int, lora_alpha: float,
                aux_loss_coef: float, base: dict, provenance: dict) -> dict:
    """Write ``delta.safetensors`` and ``delta.json`` (with the built model's tensor digests) to ``folder``."""
    from safetensors.torch import save_file

    from routelib.io import atomic_write, atomic_write_bytes
    from routelib.subject.train import moe_layers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    moe = moe_layers(model)[0]
    with atomic_write(folder / "delta.safetensors") as tmp:
        save_file(delta_tensors(model, train_norms), str(tmp))
    hf = hf_state_dict(model)
    meta = dict(format=FORMAT, format_version=FORMAT_VERSION, base=base,
                split=dict(num_experts=moe.cfg.num_experts, top_k=moe.cfg.top_k, shared_size=moe.cfg.shared_size),
                lora=dict(rank=lora_rank, alpha=lora_alpha), train_norms=train_norms, aux_loss_coef=aux_loss_coef,
                architecture=hf_config(model.config, moe, aux_loss_coef).architectures[0],
                tensors=tensor_digests(hf), **provenance)
    atomic_write_bytes(folder / "delta.json", (json.dumps(meta, indent=1) + "\n").encode())
    return meta


def apply_delta(dense, delta: dict[str, torch.Tensor], meta: dict):
    """The dense Llama model ``dense`` (in place) with its MLPs MoEfied as the delta says -> the model."""
    from routelib.models.pathways import decoder_layers
    from routelib.subject.moefy import SplitConfig

    split = SplitConfig(**meta["split"])
    rank, alpha = meta["lora"]["rank"], meta["lora"]["alpha"]
    for i, blk in enumerate(decoder_layers(dense)):
        mlp = blk.mlp
        order = delta[f"layers.{i}.order"].long()
        moe = MoEfiedMLP(mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data, order, split,
                         act=mlp.act_fn)
        moe.router.weight.data.copy_(delta[f"layers.{i}.router"])
        if split.shared_size:
            moe.shared_gate_proj.weight.data.copy_(delta[f"layers.{i}.shared_gate"])
        moe.add_lora(rank, alpha)
        for name in list(moe.lora):
            moe.lora[name].data.copy_(delta[f"layers.{i}.lora.{name}"])
        moe.set_mode("router", "softmax")
        blk.mlp = moe
    if meta["train_norms"]:
        params = dict(dense.named_parameters())
        for key, t in delta.items():
            if key.startswith("norm."):
                params[key[len("norm."):]].data.copy_(t)
    return dense


__all__ = ["FORMAT", "apply_delta", "delta_tensors", "effective_weights", "hf_config", "hf_state_dict", "merged",
           "tensor_digests", "to_hf", "write_delta"]
