"""Bits per byte across tokenizers, and the routing-matters comparison."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from routelib.data.tokenizer import load_tokenizer
from routelib.errors import ConfigError
from routelib.subject.quality import TextSample, bits_per_byte, routing_matters, text_chunks


class Uniform(torch.nn.Module):
    """Every next token equally likely: the NLL of n tokens is n ln V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        return SimpleNamespace(logits=torch.zeros(*x.shape, self.vocab))


def test_bits_per_byte_of_a_uniform_model():
    tok = load_tokenizer("bpe8k")
    chunks = {"a": ["hello world, twice", "ünïcode text"], "b": ["x = 1\n"]}
    table = bits_per_byte(Uniform(len(tok)), tok, chunks)
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for ts in chunks.values() for t in ts)
    nbytes = sum(len(t.encode()) for ts in chunks.values() for t in ts)
    assert table.loc["overall", "bits_per_byte"] == pytest.approx(tokens * math.log2(len(tok)) / nbytes)
    assert table.loc["a", "bytes"] > table.loc["a", "chars"]  # two 2-byte characters
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        bits_per_byte(Uniform(len(tok)), tok, chunks, max_len=3)


def test_text_chunks_are_deterministic_and_bounded():
    sample = TextSample(chunks=2, chunk_chars=300)
    a, b = text_chunks(sample), text_chunks(sample)
    assert a == b and len(a) == 5 and all(1 <= len(v) <= 2 and all(len(t) <= 300 for t in v) for v in a.values())


def test_routing_matters_modes():
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_subject_export import moefied

    model = moefied(0)
    x = torch.randint(0, 97, (2, 8))
    table = routing_matters(model, [(x[:, :-1], x[:, 1:])], seeds=(0, 1))
    assert set(table["mode"]) == {"router", "oracle", "random"} and len(table) == 4
    from routelib.subject.train import moe_layers

    assert all(m.mode == "router" and m.gating == "softmax" for m in moe_layers(model))


def test_paired_gaps_by_hand():
    import pandas as pd

    from routelib.subject.report import paired_gaps

    rows = [dict(mode="router", seed=0, batch=b, loss=2.0 + b) for b in range(3)]
    rows += [dict(mode="random", seed=s, batch=b, loss=2.5 + b + 0.1 * s) for s in (0, 1) for b in range(3)]
    rows += [dict(mode="oracle", seed=0, batch=b, loss=1.8 + b) for b in range(3)]
    gaps = paired_gaps(pd.DataFrame(rows)).set_index("comparison")
    assert gaps.loc["random - router", "mean"] == pytest.approx(0.55)
    assert gaps.loc["router - oracle", "mean"] == pytest.approx(0.2) and gaps.loc["router - oracle", "n"] == 3


def test_generations_record_repetition():
    from transformers import LlamaConfig, LlamaForCausalLM

    from routelib.subject.report import ReportConfig, generations

    tok = load_tokenizer("bpe8k")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)).eval()
    gens = generations({"tiny": model}, tok, [("p0", "def f(x):"), ("p1", "Question: 1+1?\nAnswer:")],
                       ReportConfig(new_tokens=12))
    assert len(gens) == 4 and set(gens["mode"]) == {"greedy", "sampled"} and (gens["tokens"] == 12).all()
    assert gens["repeated_4gram_share"].between(0, 1).all()
