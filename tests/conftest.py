"""Shared fixtures for the unit tests."""

import os

import pytest
import torch

# Notebook fixtures are driven by their own tests (test_nbval_can_fail.py), never collected by nbval.
collect_ignore_glob = ["fixtures/*"]

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is faster than two, and immune to a busy machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny randomly initialised Llama (4 layers, hidden 32, MLP 64 wide, vocabulary 8192) + the shipped
    bpe8k tokenizer, saved as ``routelib.data.load_pretrained`` reads a model folder: the real corpus
    streams feed it (the pathway study's tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from routelib.data import load_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    load_tokenizer("bpe8k").save_pretrained(path)
    return path
