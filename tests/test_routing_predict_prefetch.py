"""routelib.routing.predict.prefetch: cache hit curves against a literal cache simulation, LRU on a worked
sequence, the oracle and a perfect predictor, latency tables on a tiny Mixtral, FLOP counts."""

from collections import OrderedDict

import numpy as np
import pytest

from routelib.routing import predict as P
from routelib.routing.predict import prefetch
from routelib.routing.predict.dataset import PredictorError

from test_routing_predict_predictors import deterministic, make_data  # noqa: F401 -- a module fixture, shared

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def independent(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("ind"), "independent", per_dataset=6, length=50)


def literal_ranking_hits(scores, experts, c):
    """Reference: fill a set with the c best-scored experts (ties to the lower id), count true ones."""
    hits = 0
    for s, truth in zip(scores, experts):
        cache = set(sorted(range(len(s)), key=lambda e: (-s[e], e))[:c])
        hits += len(cache & set(truth.tolist()))
    return hits / experts.size


def literal_lru(experts, c):
    """Reference: an OrderedDict cache of c experts; a token looks up its experts (hits per token),
    then loads them, the highest gate weight last (most recent)."""
    cache, hits = OrderedDict(), []
    for row in experts.tolist():
        hits.append(sum(e in cache for e in row))
        for e in reversed(row):
            cache.pop(e, None)
            cache[e] = True
            if len(cache) > c:
                cache.popitem(last=False)
    return np.array(hits)


def test_ranking_hit_curve_matches_a_literal_cache():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, (200, 6)).astype(float)  # many ties
    experts = np.argsort(rng.random((200, 6)), 1)[:, :2]
    curve = prefetch.ranking_hit_curve(scores, experts)
    expected = [literal_ranking_hits(scores, experts, c) for c in range(1, 7)]
    np.testing.assert_allclose(curve, expected)
    assert curve[-1] == 1.0
    assert curve[1] == pytest.approx(P.routing_metrics(scores, experts)["set_recall"])  # c = k


def test_lru_ranks_on_a_worked_sequence():
    experts = np.array([[0, 1], [1, 2], [0, 3], [2, 1]])
    # before token 1 the list is [0, 1]; before 2: [1, 2, 0]; before 3: [0, 3, 1, 2]
    np.testing.assert_array_equal(prefetch.lru_ranks(experts, 4), [[4, 4], [1, 4], [2, 4], [3, 2]])


def test_lru_hit_curve_matches_a_literal_cache(independent):
    data = independent
    for layer in (0, 2):
        curve = prefetch.lru_hit_curve(data, layer)
        masked = prefetch.lru_hit_curve(data, layer, data.generated)  # every token passes, generated ones count
        for c in range(1, data.num_experts + 1):
            hits = np.zeros(len(data))
            for rows in P.sequences(data):
                hits[rows] = literal_lru(data.experts[rows, layer], c)
            assert curve[c - 1] == pytest.approx(hits.sum() / (len(data) * data.top_k)), (layer, c)
            assert masked[c - 1] == pytest.approx(hits[data.generated].sum() / (data.generated.sum() * data.top_k))
    assert prefetch.lru_hit_curve(data, 1)[-1] < 1  # cold misses at every sequence start


def test_prefetch_curves_perfect_predictor_and_oracle(deterministic):
    (split,) = P.make_splits(deterministic, "problem")
    train, test = deterministic.take(split.train), deterministic.take(split.test)
    pairs = P.layer_pairs(test.num_layers, [1, 2])
    predictors = {"lookup": P.LookupPredictor().fit(train, pairs), "prior": P.PriorPredictor().fit(train, pairs)}
    curves = prefetch.prefetch_curves(predictors, test, hop=1)
    by = {name: g.set_index("cache_size")["hit_rate"] for name, g in curves.groupby("name")}
    assert set(by) == {"lookup", "prior", "lru", "oracle"}
    np.testing.assert_allclose(by["oracle"].to_numpy(), [0.5] + [1.0] * 7)
    np.testing.assert_allclose(by["lookup"].to_numpy(), [0.5] + [1.0] * 7)  # knows the set, so c = k suffices
    assert by["prior"][8] == 1.0 and by["prior"][2] < 1
    assert list(by["lru"].index) == list(range(1, 9))
    gen = prefetch.prefetch_curves(predictors, test, hop=2, mask=test.generated, lru=False, oracle=False)
    assert set(gen["name"]) == {"lookup", "prior"}
    with pytest.raises(PredictorError, match="selects no tokens"):
        prefetch.prefetch_curves(predictors, test, mask=np.zeros(len(test), bool))
    with pytest.raises(PredictorError, match="beyond the last MoE layer"):
        prefetch.prefetch_curves(predictors, test, hop=4)


def test_latency_tables_on_a_tiny_mixtral(tmp_path):
    from test_routing_record_collect import run, tiny_model

    from routelib.data.tokenizer import load_tokenizer

    model = tiny_model("mixtral")
    run(model, load_tokenizer("bpe8k"), tmp_path / "t", prompts={"a": "def f(x):", "b": "Once upon"}, max_new_tokens=8)
    data = P.load_routing(tmp_path / "t")
    P.attach_hidden_states(data, model, progress=False)
    pairs = [(0, 1)]
    predictors = {"lookup": P.LookupPredictor().fit(data, pairs),
                  "hidden_router": P.HiddenRouterPredictor().fit(data, pairs)}
    pred = prefetch.predictor_latency(predictors, data, batch_sizes=(1, 8), min_time_s=0.01)
    layer = prefetch.moe_layer_latency(model, data.hidden.x[:, 0], batch_sizes=(1, 8), min_time_s=0.01)
    table = prefetch.latency_table(pred, layer)
    assert list(table["name"]) == ["moe_layer", "moe_layer", "lookup", "hidden_router", "lookup", "hidden_router"]
    assert (table.loc[table["name"] == "moe_layer", "pct_of_layer"] == 100).all()
    assert (table["ms_per_call"] > 0).all()
    np.testing.assert_allclose(table["us_per_token"], 1e3 * table["ms_per_call"] / table["batch"])
    assert prefetch.moe_block(model, 1) is model.model.layers[1].mlp
    with pytest.raises(PredictorError, match="batch size 999"):
        prefetch.predictor_latency(predictors, data, batch_sizes=(999,))
    with pytest.raises(PredictorError, match="MoE layer 5: the model has 3"):
        prefetch.moe_block(model, 5)


def test_flop_counts(deterministic):
    assert prefetch.moe_layer_flops(4096, 14336, 2, 8) == 2 * 4096 * 8 + 2 * 3 * 2 * 4096 * 14336  # Mixtral: ~0.7 GFLOP
    mlp = P.MLPPredictor(P.MLPConfig(hidden_size=16, num_layers=2, steps=1, token_dim=4)).fit(deterministic, [(0, 1)])
    width = 4 * 2 * 8 + 4 + 3 + 4  # history, source one-hot, hop one-hot, token embedding
    assert prefetch.predictor_flops(mlp) == 2 * (width * 16 + 16 * 16 + 16 * 8)
    assert prefetch.predictor_flops(P.LookupPredictor().fit(deterministic, [(0, 1)])) is None
    assert prefetch.predictor_flops(P.HiddenRouterPredictor(), hidden_size=32) is None  # not fitted
    table = prefetch.flops_table({"mlp": mlp, "prior": P.PriorPredictor()}, {"big": 2e9}, hidden_size=32)
    assert list(table["name"]) == ["mlp"]
    assert table.loc[0, "pct_of_big"] == pytest.approx(100 * prefetch.predictor_flops(mlp) / 2e9)
