"""Neuron grouping for pathways (routelib.models.grouping): the balanced assignment and k-means (equal
groups, a partition, deterministic, planted groups recovered), the features, and the permutation that
makes groups contiguous while the MLP computes the same function (Llama gated MLP, GPT-2 Conv1D)."""

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from routelib.errors import ConfigError
from routelib.models import grouping as g
from routelib.models.pathways import PathwayMLP, RoutingConfig, decoder_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(num_groups=4, size=6, dims=40, noise=0.05, seed=0):
    """Items in ``num_groups`` tight directions, listed in a shuffled order -> (features, true labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_groups, dims))
    truth = np.repeat(np.arange(num_groups), size)
    shuffle = rng.permutation(truth.size)
    truth = truth[shuffle]
    return centres[truth] + noise * rng.normal(size=(truth.size, dims)), truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return len({(x, y) for x, y in zip(a, b)}) == len(set(a)) == len(set(b))


# ------------------------------------------------------------------------------------ assignment
def test_balanced_assign_takes_the_most_similar_pairs_within_capacity():
    sim = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.0, 0.5]])
    # items 0 and 1 fill group 0 first; item 2 would prefer group 0 but it is full
    assert g.balanced_assign(sim, 2).tolist() == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match="do not fill"):
        g.balanced_assign(sim, 3)


@pytest.mark.parametrize("num_groups, size", [pytest.param(4, 6, id="4x6"), pytest.param(16, 3, id="16x3"),
                                              pytest.param(1, 8, id="one-group")])
def test_balanced_kmeans_recovers_planted_equal_groups(num_groups, size):
    feats, truth = planted(num_groups, size)
    labels = g.balanced_kmeans(feats, num_groups, seed=3)
    assert np.bincount(labels, minlength=num_groups).tolist() == [size] * num_groups  # balanced
    assert set(labels.tolist()) == set(range(num_groups)) and labels.shape == truth.shape  # a partition
    assert same_partition(labels, truth)
    assert labels[0] == 0  # numbered by lowest member


def test_balanced_kmeans_is_balanced_on_unbalanced_data_and_deterministic():
    rng = np.random.default_rng(1)
    feats = np.concatenate([rng.normal(size=(30, 8)) + 5, rng.normal(size=(2, 8)) - 5])  # one big blob, one tiny
    a = g.balanced_kmeans(feats, 4, seed=7)
    assert np.bincount(a).tolist() == [8, 8, 8, 8]
    assert np.array_equal(a, g.balanced_kmeans(torch.from_numpy(feats), 4, seed=7))  # numpy or torch, same seed
    assert a[30] == a[31]  # the two far-away items share a group


@pytest.mark.parametrize("kw, match", [
    pytest.param(dict(num_groups=5), "positive divisor", id="not-a-divisor"),
    pytest.param(dict(num_groups=0), "positive divisor", id="zero"),
    pytest.param(dict(num_groups=True), "positive divisor", id="bool"),
    pytest.param(dict(num_groups=4, iters=0), "iters", id="iters"),
])
def test_balanced_kmeans_rejects_bad_input(kw, match):
    with pytest.raises(ConfigError, match=match):
        g.balanced_kmeans(np.ones((24, 3)), **kw)


def test_balanced_kmeans_rejects_nan_and_bad_shape():
    with pytest.raises(ConfigError, match="NaN"):
        g.balanced_kmeans(np.full((4, 2), np.nan), 2)
    with pytest.raises(ConfigError, match="items, dims"):
        g.balanced_kmeans(np.ones(4), 2)


def test_group_order_and_inverse():
    labels = np.array([1, 0, 1, 0, 2, 2])
    order = g.group_order(labels)
    assert order.tolist() == [1, 3, 0, 2, 4, 5]
    assert torch.equal(order[g.inverse_order(order)], torch.arange(6))


def test_coactivation_features_find_neurons_firing_on_the_same_tokens():
    # 4 groups of 8 neurons; each token type switches one group on; neurons in a shuffled order
    rng = np.random.default_rng(0)
    truth = rng.permutation(np.repeat(np.arange(4), 8))
    kind = rng.integers(0, 4, size=200)
    hidden = (kind[:, None] == truth[None, :]) * rng.uniform(0.5, 1.5, size=(200, 32))  # (n, I)
    hidden = hidden * rng.choice([-1, 1], size=hidden.shape)  # SwiGLU activations are signed
    for top in (0.1, 0.0):  # MoEfication's binary "active" pattern (a token's top 10 %), or the magnitudes
        feats = g.activation_features(torch.tensor(hidden, dtype=torch.float32), top_fraction=top)
        assert feats.shape == (32, 200)
        assert same_partition(g.balanced_kmeans(feats, 4), truth)
    binary = g.activation_features(torch.tensor(hidden, dtype=torch.float32), top_fraction=0.1)
    assert set(binary.unique().tolist()) == {0.0, 1.0} and (binary.sum(0) >= 3).all()  # >= 10 % of 32 per token
    with pytest.raises(ConfigError, match="top_fraction"):
        g.activation_features(torch.ones(3, 4), top_fraction=1.0)


# ----------------------------------------------------------------------------------- permutation
def tiny(make: str):
    torch.manual_seed(0)
    if make == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, mlp_bias=True))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_inner=32, n_layer=2, n_head=2, n_positions=16))
    return model.eval()


@pytest.mark.parametrize("make", ["llama", "gpt2"])
def test_permuted_mlp_computes_the_same_function_and_pathways_are_the_groups(make):
    model = tiny(make)
    mlp = decoder_layers(model)[0].mlp
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))  # (n, H)
    with torch.no_grad():
        ref = mlp(x)
        ref_hidden = g.mlp_hidden(model, [0], torch.arange(10)[None])[0]  # (10, I)
    labels = np.repeat(np.arange(4), 8)[np.random.default_rng(0).permutation(32)]
    order = g.group_order(labels)
    params = [id(p) for p in mlp.parameters()]
    g.permute_neurons(mlp, order)
    assert [id(p) for p in mlp.parameters()] == params  # same tensors: optimizers keep them
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)  # same function, other summation order
        hidden = g.mlp_hidden(model, [0], torch.arange(10)[None])[0]
    torch.testing.assert_close(hidden, ref_hidden[:, order])
    # wrapped as pathways: every pathway on is the MLP; pathway p holds exactly group p's neurons
    pm = PathwayMLP(mlp, RoutingConfig(num_pathways=4, top_k_pathways=2, impl="sparse"))
    with torch.no_grad():
        torch.testing.assert_close(pm.full(x), ref, rtol=1e-5, atol=1e-6)
        idx = torch.tensor([[0, 3]] * 10)
        w = torch.ones(10, 2)
        torch.testing.assert_close(pm.sparse(x, idx, w), pm.dense_masked(x, idx, w), rtol=1e-5, atol=1e-6)
    for p in range(4):
        assert (labels[order[8 * p: 8 * (p + 1)].numpy()] == p).all()
    g.permute_neurons(mlp, g.inverse_order(order))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)


def test_permute_rejects_a_non_permutation():
    mlp = decoder_layers(tiny("llama"))[0].mlp
    with pytest.raises(ConfigError, match="permutation of the 32"):
        g.permute_neurons(mlp, torch.zeros(32, dtype=torch.long))
    with pytest.raises(ConfigError, match="permutation of the 32"):
        g.permute_neurons(mlp, torch.arange(16))
    with pytest.raises(ConfigError, match="not a supported MLP"):
        g.permute_neurons(torch.nn.Linear(2, 2), torch.arange(2))


@pytest.mark.parametrize("grouping", g.GROUPINGS)
def test_neuron_groups_are_balanced_orders(grouping):
    model = tiny("llama")
    mlp = decoder_layers(model)[1].mlp
    hidden = g.mlp_hidden(model, [1], torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0)))[1]
    order = g.neuron_groups(mlp, 4, grouping, hidden=hidden, seed=0)
    assert sorted(order.tolist()) == list(range(32))
    if grouping == "contiguous":
        assert order.tolist() == list(range(32))
    assert torch.equal(order, g.neuron_groups(mlp, 4, grouping, hidden=hidden, seed=0))  # deterministic
    feats = g.weight_features(mlp)
    assert feats.shape == (32, 32) and torch.allclose(feats[:, :16].norm(dim=1), torch.ones(32))


def test_neuron_groups_bad_input():
    mlp = decoder_layers(tiny("llama"))[0].mlp
    with pytest.raises(ConfigError, match="choose one of"):
        g.neuron_groups(mlp, 4, "random")
    with pytest.raises(ConfigError, match="needs the MLP's activations"):
        g.neuron_groups(mlp, 4, "coactivation")
    with pytest.raises(ConfigError, match="neurons, the MLP 32"):
        g.neuron_groups(mlp, 4, "coactivation", hidden=torch.ones(3, 8))
