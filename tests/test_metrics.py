"""Monosemanticity metrics: purity bounds, H_max choices, utilisation counting every pathway, the
random and permuted controls, per-domain purity, and the metrics on a real routed model's output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from routelib.errors import ConfigError
from routelib.metrics import (
    compare_routers,
    domain_specialisation,
    entropy,
    pathway_examples,
    pathway_metrics,
    pathway_token_counts,
    permuted_routing,
    purity,
    purity_by_domain,
    random_topk,
)


def test_purity_one_for_a_single_token_zero_for_uniform_vocabulary():
    vocab = 50
    # pathway 0 sees only token 7; pathway 1 sees every id of the vocabulary equally often
    tokens = np.concatenate([np.full(30, 7), np.tile(np.arange(vocab), 4)])
    indices = np.concatenate([np.zeros(30, dtype=int), np.ones(4 * vocab, dtype=int)])[:, None]
    m = pathway_metrics(tokens, indices, num_pathways=3, vocab_size=vocab)
    assert m.purity[0] == pytest.approx(1.0)
    assert m.purity[1] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(m.purity[2]) and m.selections[2] == 0  # never selected: undefined, not skipped
    assert m.top_tokens[0] == [(7, 30)]
    assert m.distinct.tolist() == [1, vocab, 0]
    # the original project's H_max = log(distinct ids) labels a uniform pathway 0 as well; a single id is 1
    assert m.purity_distinct[0] == pytest.approx(1.0) and m.purity_distinct[1] == pytest.approx(0.0, abs=1e-12)


def test_purity_h_max_choices_differ():
    counts = np.array([[5, 5, 0, 0, 0, 0, 0, 0]])  # two ids equally often, vocabulary of 8
    assert purity(counts)[0] == pytest.approx(1 - math.log(2) / math.log(8))  # 2/3
    assert purity(counts, "distinct")[0] == pytest.approx(0.0, abs=1e-12)
    assert purity(counts, vocab_size=1024)[0] == pytest.approx(1 - math.log(2) / math.log(1024))  # 0.9
    assert entropy(counts)[0] == pytest.approx(math.log(2))
    with pytest.raises(ConfigError):
        purity(counts, "distinct-ish")


def test_token_counts_and_load_count_every_selection():
    tokens = np.array([1, 2, 1, 3])
    indices = np.array([[0, 1], [1, 2], [0, 2], [3, 0]])
    counts = pathway_token_counts(tokens, indices, num_pathways=5, vocab_size=4)
    assert counts.sum() == tokens.size * 2
    assert counts[0].tolist() == [0, 2, 0, 1] and counts[4].sum() == 0
    m = pathway_metrics(tokens, indices, num_pathways=5, vocab_size=4)
    assert m.selections.tolist() == [3, 2, 2, 1, 0]
    assert m.load.sum() == pytest.approx(1.0)
    # utilisation: pathways with >= 1 % of the selections, out of all five (the empty one counts)
    assert m.utilisation == pytest.approx(4 / 5)
    assert pathway_metrics(tokens, indices, 5, 4, min_load=0.2).utilisation == pytest.approx(3 / 5)
    # one rare pathway (1 selection in 1000) is below the 1 % threshold but still in the denominator
    rare = np.zeros((1000, 1), dtype=int)
    rare[0] = 1
    mr = pathway_metrics(np.zeros(1000, dtype=int), rare, 2, 4)
    assert mr.utilisation == pytest.approx(0.5) and mr.selections[1] == 1 and mr.purity[1] == pytest.approx(1.0)


def test_random_router_control_is_uniform():
    n, num, k, vocab = 20_000, 16, 4, 1000
    idx = random_topk(n, num, k, seed=0)
    assert idx.shape == (n, k)
    assert all(len(set(row)) == k for row in idx[:200].tolist())  # k distinct pathways per position
    tokens = np.random.default_rng(1).zipf(1.3, n) % vocab
    m = pathway_metrics(tokens, idx, num, vocab)
    assert m.utilisation == 1.0
    assert m.load_balance > 0.999
    assert np.abs(m.load - 1 / num).max() < 0.005
    # a pathway fed a random sample looks about as pure as the corpus itself
    assert abs(m.mean_purity - m.corpus_purity) < 0.05
    with pytest.raises(ConfigError):
        random_topk(10, 4, 5)


def test_permuted_control_keeps_loads_and_destroys_specialisation():
    rng = np.random.default_rng(0)
    n, num, vocab = 4000, 8, 64
    tokens = rng.integers(0, vocab, n)
    specialised = np.stack([tokens % num, (tokens + 1) % num], axis=1)  # a token-determined router
    m = pathway_metrics(tokens, specialised, num, vocab)
    c = pathway_metrics(tokens, permuted_routing(specialised, seed=0), num, vocab)
    np.testing.assert_array_equal(m.selections, c.selections)  # same loads
    assert m.mean_purity > c.mean_purity + 0.2  # specialisation is gone
    assert m.purity[0] == pytest.approx(1 - math.log(16) / math.log(vocab), abs=0.01)  # 16 ids, ~equally often


def test_purity_by_domain_and_domain_specialisation():
    tokens = np.array([1, 1, 1, 1, 5, 6, 7, 8])
    domains = np.array(["code"] * 4 + ["prose"] * 4)
    indices = np.array([0, 0, 0, 0, 1, 1, 1, 0])[:, None]
    df = purity_by_domain(tokens, indices, domains, num_pathways=2, vocab_size=16)
    code0 = df[(df.domain == "code") & (df.pathway == 0)].iloc[0]
    assert code0.purity == pytest.approx(1.0) and code0.selections == 4
    prose1 = df[(df.domain == "prose") & (df.pathway == 1)].iloc[0]
    assert prose1.purity == pytest.approx(1 - math.log(3) / math.log(16))
    spec = domain_specialisation(indices, domains, num_pathways=2)
    assert spec.loc[1, "share_prose"] == pytest.approx(1.0) and spec.loc[1, "domain_purity"] == pytest.approx(1.0)
    assert spec.loc[0, "share_code"] == pytest.approx(0.8) and spec.loc[0, "lift_code"] == pytest.approx(1.6)


def test_validation_and_examples():
    with pytest.raises(ConfigError):
        pathway_metrics(np.arange(3), np.zeros((4, 1), dtype=int), 2, 10)  # length mismatch
    with pytest.raises(ConfigError):
        pathway_metrics(np.arange(3), np.full((3, 1), 2), 2, 10)  # pathway out of range
    with pytest.raises(ConfigError):
        pathway_metrics(np.array([0, 10]), np.zeros((2, 1), dtype=int), 2, 10)  # token out of range
    tokens = np.arange(10)
    seq = np.array([0] * 5 + [1] * 5)
    indices = np.array([1, 0, 0, 0, 0, 0, 1, 0, 0, 0])[:, None]
    ex = pathway_examples(indices, pathway=1, n_examples=5, seq_ids=seq, window=3, token_ids=tokens)
    assert [p for p, _ in ex] == [0, 6]
    assert ex[1][1].tolist() == [5, 6]  # clipped at the start of sequence 1


def test_metrics_from_a_routed_model_against_controls():
    """The notebook's path: collect_routing -> pathway metrics for untrained and control routers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from routelib.models.pathways import RoutedLLM, RoutingConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    routed = RoutedLLM(model, RoutingConfig(num_pathways=8, top_k_pathways=2))
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    tokens, sel = routed.collect_routing(ids)
    assert tokens.shape == (128,) and sel[0].shape == (128, 2)
    df = compare_routers(tokens, {"untrained": sel, "random": {0: random_topk(128, 8, 2)},
                                  "permuted": {0: permuted_routing(sel[0])}}, num_pathways=8, vocab_size=96)
    assert list(df.router) == ["untrained", "random", "permuted"]
    assert df[["mean_purity", "utilisation", "load_balance"]].notna().all().all()
    assert (df.mean_purity > 0).all() and (df.mean_purity <= 1).all()
