"""routelib.data.pretrained: SmolLM2 from its GGUF, local directories, Hub names offline."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from routelib.data.pretrained import load_pretrained
from routelib.data.tokenizer import load_tokenizer
from routelib.errors import ConfigError, ModelNotFoundError, OfflineError


@pytest.fixture
def tiny_llama(tmp_path):
    """A tiny random Llama saved like an exported model (weights + the bpe8k tokenizer)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "with_tok")
    load_tokenizer("bpe8k").save_pretrained(tmp_path / "with_tok")
    model.save_pretrained(tmp_path / "no_tok")
    return model, tmp_path


def test_local_directory(tiny_llama):
    model, root = tiny_llama
    loaded, tok = load_pretrained(str(root / "with_tok"))
    assert isinstance(loaded, LlamaForCausalLM) and not loaded.training
    assert len(tok) == 8192
    ids = torch.tensor([tok("def f(x):")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
    half, _ = load_pretrained(root / "with_tok", dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_local_directory_without_tokenizer(tiny_llama):
    _, root = tiny_llama
    with pytest.raises(ConfigError, match="holds no tokenizer; pass tokenizer="):
        load_pretrained(str(root / "no_tok"))
    _, tok = load_pretrained(str(root / "no_tok"), tokenizer="bpe8k")
    assert tok.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "no/such/model", "~/no-such-model"])
def test_missing_local_directory(name):
    with pytest.raises(ModelNotFoundError, match=f"model folder '{name}' does not exist"):
        load_pretrained(name)


def test_a_bare_name_is_a_hub_id(monkeypatch, tmp_path):  # like 'gpt2': not refused as a missing folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(OfflineError, match="not in the local Hugging Face cache"):
        load_pretrained("no-such-model")


def test_hub_name_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty local Hugging Face cache
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE=1.*not in the local Hugging Face cache"):
        load_pretrained("mistralai/Mixtral-8x7B-v0.1")


def test_bad_dtype():
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        load_pretrained("smollm2-135m", dtype="float8")


def test_smollm2_from_gguf():
    model, tok = load_pretrained("smollm2-135m")
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size)
    assert shape == (30, 576, 1536, 49152)
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert tok.decode(model(ids).logits[0, -1].argmax()) == " Paris"
        text = tok("The cat sat on the mat. It was a sunny day, and the children were playing in the park.",
                   return_tensors="pt").input_ids
        assert model(text, labels=text).loss.exp() < 30  # a real language model, not random weights
