"""Subject v3's export: the MoEfied Llama model and its transformers-native MoE compute the same function;
the delta round-trips; the deterministic merge is the plain one up to rounding."""

from __future__ import annotations

import pytest
import torch

from routelib.subject.export import (apply_delta, delta_tensors, hf_state_dict, merged, tensor_digests, to_hf)
from routelib.subject.moefy import SplitConfig
from routelib.subject.pilot import mlp_inputs, moefy_model
from routelib.subject.router_fit import RouterFitConfig
from routelib.subject.train import moe_layers


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return LlamaForCausalLM(cfg).eval()


def moefied(shared: int, seed=0):
    model = tiny_llama(seed)
    x = torch.randint(0, 97, (4, 16))
    moefy_model(model, mlp_inputs(model, x, 2), SplitConfig(num_experts=4, top_k=2, shared_size=shared),
                RouterFitConfig(steps=20))
    g = torch.Generator().manual_seed(1)
    for i, moe in enumerate(moe_layers(model)):
        moe.set_mode("router", "softmax")
        moe.add_lora(rank=3, alpha=6.0, seed=i)
        for p in moe.lora.values():  # non-zero updates: the export must carry them
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if shared:
            moe.shared_gate_proj.weight.data.normal_(0, 0.2, generator=g)
    return model


@pytest.mark.parametrize("shared,arch", [(0, "MixtralForCausalLM"), (16, "Qwen2MoeForCausalLM")])
def test_transformers_model_computes_the_same_function(shared, arch):
    model = moefied(shared)
    hf = to_hf(model)
    assert type(hf).__name__ == arch
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_delta_round_trip_is_bit_identical():
    model = moefied(16)
    meta = dict(split=dict(num_experts=4, top_k=2, shared_size=16), lora=dict(rank=3, alpha=6.0), train_norms=True)
    delta = delta_tensors(model, train_norms=True)
    rebuilt = apply_delta(tiny_llama(0), delta, meta)  # the same dense weights, the delta applied
    assert tensor_digests(hf_state_dict(rebuilt)) == tensor_digests(hf_state_dict(model))
    other = apply_delta(tiny_llama(1), delta, meta)  # other dense weights: other tensors, other digests
    assert tensor_digests(hf_state_dict(other)) != tensor_digests(hf_state_dict(model))


def test_merged_is_the_plain_update():
    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(3, 5, 7, generator=g), torch.randn(3, 4, 7, generator=g), torch.randn(3, 5, 4, generator=g)
    torch.testing.assert_close(merged(w, a, b, 0.5), w + 0.5 * b @ a, rtol=1e-6, atol=1e-6)
    assert torch.equal(merged(w, None, None, 1.0), w)


def test_build_from_a_delta_folder(tmp_path):
    """The build applies a delta to a dense folder, checks every tensor's sha256 and writes a folder that
    AutoModelForCausalLM loads with the same function; a changed delta tensor is refused by name."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from routelib.errors import ConfigError
    from routelib.subject.build import build
    from routelib.subject.export import write_delta

    dense = tiny_llama(0)
    dense.save_pretrained(tmp_path / "dense")
    model = moefied(16)
    write_delta(model, tmp_path / "delta", train_norms=False, lora_rank=3, lora_alpha=6.0, aux_loss_coef=0.01,
                base={"name": "tiny"}, provenance={})
    out = build(tmp_path / "delta", tmp_path / "built", base=str(tmp_path / "dense"), tokenizer="bpe8k")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "delta" / "delta.safetensors")
    tensors["layers.0.router"][0, 0] += 1e-3
    save_file(tensors, tmp_path / "delta" / "delta.safetensors")
    with pytest.raises(ConfigError, match="differ from delta.json"):
        build(tmp_path / "delta", tmp_path / "built2", base=str(tmp_path / "dense"), tokenizer="bpe8k")
    assert not (tmp_path / "built2").exists()
