"""routelib.evaluation: perplexity per domain against a hand computation, throughput from history."""

import math
from types import SimpleNamespace

import pytest
import torch

from routelib.evaluation import domain_eval_data, perplexity_by_domain, train_tokens_per_s
from routelib.train import TrainResult


class Uniform(torch.nn.Module):
    """Logits that make every token of a vocabulary of V equally likely: perplexity exactly V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.w = vocab, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return SimpleNamespace(logits=torch.zeros(*x.shape, self.vocab) + self.w)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    data = {"a": [(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))],
            "b": [(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))]}
    ppl = perplexity_by_domain(Uniform(17), data)
    assert ppl == pytest.approx({"a": 17.0, "b": 17.0, "overall": 17.0})


def test_overall_is_token_weighted():
    class Perfect(Uniform):  # certain of token 1 in domain "a" inputs (x == 0), uniform otherwise
        def forward(self, x):
            logits = torch.zeros(*x.shape, self.vocab)
            logits[..., 1] = torch.where(x == 0, 100.0, 0.0)
            return SimpleNamespace(logits=logits)

    data = {"a": [(torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 9, dtype=torch.long))],
            "b": [(torch.full((1, 3), 2), torch.ones(1, 3, dtype=torch.long))]}
    ppl = perplexity_by_domain(Perfect(8), data)
    assert ppl["a"] == pytest.approx(1.0) and ppl["b"] == pytest.approx(8.0)
    assert ppl["overall"] == pytest.approx(math.exp(3 * math.log(8) / 12))


def test_train_tokens_per_s_skips_the_warm_up_window():
    result = TrainResult(history=[{"tokens_per_s": 1.0}, {"tokens_per_s": 10.0}, {"tokens_per_s": 12.0}],
                         step=3, checkpoint=None, wall_s=1.0)
    assert train_tokens_per_s(result) == 11.0
    assert math.isnan(train_tokens_per_s(TrainResult(history=[], step=0, checkpoint=None, wall_s=0.0)))


def test_domain_eval_data_gives_every_domain_its_windows():
    data = domain_eval_data(SimpleNamespace(tokenizer="bpe8k", seq_len=32, eval_windows=3))
    assert set(data) == {"code", "math", "fiction", "encyclopedic", "news"}
    for batches in data.values():
        (x, y), = batches
        assert x.shape == (3, 32) and torch.equal(x[:, 1:], y[:, :-1])
