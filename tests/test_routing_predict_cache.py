"""routelib.routing.predict.cache: expert-cache policies replayed on request streams; Belady's bound."""

import numpy as np
import pytest

from routelib.errors import ConfigError
from routelib.routing.predict import prefetch
from routelib.routing.predict.cache import POLICIES, hit_rate_curve, next_use, simulate_cache


def random_requests(seed: int, tokens: int = 60, layers: int = 4, experts: int = 8, k: int = 2, skew: float = 1.2):
    """(T, L, k) distinct experts per (token, layer), drawn from a skewed per-layer distribution."""
    rng = np.random.default_rng(seed)
    out = np.zeros((tokens, layers, k), np.int64)
    for layer in range(layers):
        p = rng.permutation(experts) + 1.0
        p = p ** skew / (p ** skew).sum()
        for t in range(tokens):
            out[t, layer] = rng.choice(experts, k, replace=False, p=p)
    return out


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_belady_is_never_beaten(seed, scope):
    req = random_requests(seed)
    rng = np.random.default_rng(100 + seed)
    slots = int(rng.integers(2, 8)) if scope == "layer" else int(rng.integers(2, 32))
    rates = {p: simulate_cache(req, 8, slots, p, scope=scope).hits.sum() for p in POLICIES}
    assert all(rates["belady"] >= v for v in rates.values()), (slots, rates)


def test_lru_equals_the_reference_recency_ranks():
    """A per-layer LRU cache of c slots holds exactly the experts of recency rank < c (prefetch.lru_ranks)."""
    req = random_requests(3, tokens=80, layers=1)
    ranks = prefetch.lru_ranks(req[:, 0], 8)  # (T, k)
    for c in range(2, 9):
        got = simulate_cache(req, 8, c, "lru").hits[:, 0]
        np.testing.assert_array_equal(got, ranks < c)


def test_a_cache_of_every_expert_misses_only_the_first_requests():
    req = random_requests(5)
    first = sum(len(np.unique(req[:, layer])) for layer in range(req.shape[1]))
    for policy in POLICIES:
        result = simulate_cache(req, 8, 8, policy)
        assert (~result.hits).sum() == first, policy
        assert result.loads.sum() == first


def test_a_perfect_prefetch_hits_everything():
    req = random_requests(7)
    for policy in ("lru", "lfu", "least_stale", "belady"):
        assert simulate_cache(req, 8, 2, policy, prefetch=req).hit_rate == 1.0, policy


def test_least_stale_keeps_the_layers_about_to_run_in_a_global_cache():
    """Two layers, one expert each, the same two experts over and over: a global cache of 2 keeps both;
    with a third layer cycling through new experts, least-stale evicts the layer just computed, LRU the
    layer about to run."""
    T = 30
    req = np.zeros((T, 3, 1), np.int64)
    req[:, 0, 0], req[:, 1, 0] = 0, 1
    req[:, 2, 0] = np.arange(T) % 4  # a layer that never repeats within 4 tokens
    stale = simulate_cache(req, 4, 2, "least_stale", scope="global").hits[:, :2].mean()
    lru = simulate_cache(req, 4, 2, "lru", scope="global").hits[:, :2].mean()
    assert stale > lru


def test_static_holds_the_most_frequent_and_never_changes():
    req = np.array([[[0]], [[1]], [[0]], [[2]], [[0]]])
    result = simulate_cache(req, 3, 1, "static")
    assert result.hits[:, 0, 0].tolist() == [False, False, True, False, True]


def test_next_use():
    assert next_use(np.array([5, 3, 5, 5, 3])).tolist()[:4] == [2, 4, 3, np.iinfo(np.int64).max]


def test_hit_rate_curve_covers_each_policy_and_size():
    req = random_requests(1, tokens=20)
    curve = hit_rate_curve(req, 8)
    assert set(curve["policy"]) == set(POLICIES) and sorted(set(curve["slots"])) == list(range(2, 9))
    assert curve.groupby("policy")["hit_rate"].apply(lambda s: s.is_monotonic_increasing).all()


@pytest.mark.parametrize("kw, match", [
    (dict(policy="fifo"), "policy='fifo'"),
    (dict(slots=1), "cannot hold the 2 experts"),
    (dict(scope="node"), "scope='node'"),
])
def test_bad_settings_are_refused(kw, match):
    args = dict(policy="lru", slots=4, scope="layer") | kw
    with pytest.raises(ConfigError, match=match):
        simulate_cache(random_requests(0, tokens=3), 8, args["slots"], args["policy"], scope=args["scope"])


def test_expert_ids_out_of_range_are_refused():
    with pytest.raises(ConfigError, match="outside"):
        simulate_cache(np.full((2, 1, 2), 9), 8, 4)
