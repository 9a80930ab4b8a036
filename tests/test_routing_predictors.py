"""routelib.routing.predictors: metrics against hand-worked examples and chance formulas; every
predictor on synthetic traces with a known answer (deterministic transitions -> 100 %, independent
layers -> chance); splits that cannot leak; the MLP's masking, save/load and resume; the hidden-state
predictors on a tiny Mixtral; evaluate, the CLI and its errors."""

import json
import math

import numpy as np
import pytest
import torch

from routelib.routing import predictors as P
from routelib.routing import traces as T
from routelib.routing.predictors import HiddenStatesUnavailable, PredictorError

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, EXPERTS, K = 4, 8, 2


# ---- synthetic traces ------------------------------------------------------------------------------


def random_sets(rng, n, num_experts=EXPERTS, k=K):
    """(n, k) distinct expert ids per row, uniformly random."""
    return np.argsort(rng.random((n, num_experts)), axis=1)[:, :k]


def synthetic_arrays(kind, n, seed=0, num_layers=LAYERS, num_experts=EXPERTS, k=K):
    """experts and weights (n, L, k) with a known structure:
    deterministic: the set of layer l+1 = (the set of layer l + l + 1) mod E, the lower id first;
    same: every layer repeats layer 0; xor: layer 2 depends on layers 0 and 1 together, on neither
    alone; independent: every layer uniformly random, gate weights random."""
    rng = np.random.default_rng(seed)
    experts = np.zeros((n, num_layers, k), np.int64)
    experts[:, 0] = random_sets(rng, n, num_experts, k)
    for layer in range(1, num_layers):
        if kind == "deterministic":  # the next set, lower id in slot 0: a function of the previous set
            experts[:, layer] = np.sort((experts[:, layer - 1] + layer) % num_experts, axis=1)
        elif kind == "same":
            experts[:, layer] = experts[:, 0]
        elif kind == "independent":
            experts[:, layer] = random_sets(rng, n, num_experts, k)
        elif kind == "xor":  # layer 1 random in {0,1}x{2,3}; layer 2 = {4,5} if parities agree else {6,7}
            experts[:, layer] = random_sets(rng, n, num_experts, k) if layer != 2 else 0
    if kind == "xor":
        bits0, bits1 = rng.integers(0, 2, n), rng.integers(0, 2, n)
        experts[:, 0] = np.stack([bits0, 2 + bits0], 1)  # layer-0 sets {0,2} or {1,3}
        experts[:, 1] = np.stack([bits1, 2 + bits1], 1)
        experts[:, 2] = np.where((bits0 == bits1)[:, None], [4, 5], [6, 7])
    if kind == "independent":
        weights = np.sort(rng.dirichlet(np.ones(k), (n, num_layers)), axis=2)[..., ::-1]
    else:
        weights = np.broadcast_to(np.linspace(0.6, 0.4, k) / np.linspace(0.6, 0.4, k).sum(), (n, num_layers, k))
    return experts, np.ascontiguousarray(weights, dtype=np.float32)


def write_traces(out, experts, weights, problems, num_experts=EXPERTS, token_ids=None, model="no/such-model"):
    """A valid trace folder: ``problems`` is a list of (dataset, problem_id, length) covering the rows
    in order; one shard per dataset; first half of each problem "prompt", the rest "generated"."""
    out.mkdir(parents=True, exist_ok=True)
    rows = sum(length for _, _, length in problems)
    assert rows == len(experts)
    token_ids = np.arange(rows) % 50 if token_ids is None else token_ids
    num_layers, k = experts.shape[1:]
    shards, datasets, start = [], {}, 0
    for name in dict.fromkeys(d for d, _, _ in problems):
        cols = {c: [] for c in T.SCALAR_COLUMNS}
        index, first = 0, start
        for d, pid, length in problems:
            if d != name:
                continue
            cols["dataset"] += [d] * length
            cols["problem_id"] += [pid] * length
            cols["problem_index"] += [index] * length
            cols["position"] += list(range(length))
            cols["phase"] += ["prompt"] * (length // 2) + ["generated"] * (length - length // 2)
            index += 1
        n = len(cols["dataset"])
        cols["token_id"] = [int(t) for t in token_ids[first:first + n]]
        cols["token_text"] = [str(t) for t in cols["token_id"]]
        table = T.shard_table(cols, experts[first:first + n], weights[first:first + n], None, num_experts)
        fname = T.shard_name(name, 0)
        shards.append({"file": fname, "dataset": name, "rows": n, **T.shard_counts(table),
                       **T.write_shard(out / fname, table)})
        datasets[name] = {"num_problems": index}
        start += n
    manifest = {"format": T.FORMAT, "format_version": T.FORMAT_VERSION, "model": {"name_or_path": model},
                "tokenizer": {"vocab_size": 50},
                "layout": {"num_moe_layers": num_layers, "moe_layers": list(range(num_layers)), "top_k": k,
                           "num_experts": num_experts, "full_distribution": False},
                "datasets": datasets, "shards": shards}
    T.write_manifest(out, manifest)
    return out


def problem_list(per_dataset, length, datasets=("code", "math")):
    return [(d, f"{d}/{i}", length) for d in datasets for i in range(per_dataset)]


def make_data(tmp_path, kind, per_dataset=10, length=40, seed=0, **kw):
    problems = problem_list(per_dataset, length)
    experts, weights = synthetic_arrays(kind, sum(p[2] for p in problems), seed, **kw)
    out = write_traces(tmp_path / kind, experts, weights, problems, num_experts=kw.get("num_experts", EXPERTS))
    return P.load_routing(out)


@pytest.fixture(scope="module")
def deterministic(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("det"), "deterministic")


@pytest.fixture(scope="module")
def independent(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("ind"), "independent", per_dataset=20, length=100)


def split_data(data, seed=0):
    split = P.make_splits(data, "problem", seed=seed)[0]
    return data.take(split.train), data.take(split.test)


FAST_MLP = P.MLPConfig(hidden_size=64, steps=300, batch_size=256, lr=1e-2, token_dim=0)


def fitted(name, train, pairs):
    predictor = P.MLPPredictor(FAST_MLP) if name == "mlp" else P.make_predictor(name)
    return predictor.fit(train, pairs)


# ---- metrics ---------------------------------------------------------------------------------------


def test_chance_metrics_formulas():
    assert P.chance_metrics(8, 2) == pytest.approx({"top1": 0.125, "top2_hit": 0.25, "set_recall": 0.25,
                                                    "exact_set": 1 / 28})
    assert P.chance_metrics(4, 1) == pytest.approx({"top1": 0.25, "top2_hit": 0.5, "set_recall": 0.25,
                                                    "exact_set": 0.25})
    with pytest.raises(PredictorError, match="need E >= 2"):
        P.chance_metrics(1, 1)


def test_metrics_on_a_worked_example():
    experts = np.array([[2, 5], [1, 0], [3, 4], [6, 7]])  # true top-1 first
    scores = np.array([
        [0, 0, 9, 0, 0, 8, 0, 0],  # ranks 2, 5: all right
        [5, 9, 0, 0, 0, 0, 0, 0],  # ranks 1, 0: top-1 right, same set
        [0, 0, 0, 1, 9, 0, 0, 0],  # ranks 4, 3, then ties -> 0: top-1 wrong, top-2 hit, set right
        [0, 0, 0, 0, 0, 0, 0, 0],  # all tied: ranks 0, 1 (lower id wins): nothing
    ], float)
    per = P.routing_metrics_per_token(scores, experts)
    np.testing.assert_array_equal(per["top1"], [1, 1, 0, 0])
    np.testing.assert_array_equal(per["top2_hit"], [1, 1, 1, 0])
    np.testing.assert_array_equal(per["set_recall"], [1, 1, 1, 0])
    np.testing.assert_array_equal(per["exact_set"], [1, 1, 1, 0])
    scores[3, 7] = 1  # predicted {7, 0}: one of two right, true top-1 (6) missed
    per = P.routing_metrics_per_token(scores, experts)
    assert per["set_recall"][3] == 0.5 and per["exact_set"][3] == 0 and per["top2_hit"][3] == 0
    assert P.routing_metrics(scores, experts)["set_recall"] == pytest.approx(3.5 / 4)
    np.testing.assert_array_equal(P.rank_experts(np.zeros((1, 4)), 4), [[0, 1, 2, 3]])


def test_metrics_reject_bad_shapes():
    with pytest.raises(PredictorError, match=r"scores \(N, E\) and experts \(N, k\)"):
        P.routing_metrics(np.zeros((3, 8)), np.zeros((2, 2), int))


def test_gate_vectors_renormalise():
    g = P.gate_vectors(np.array([[3, 1]]), np.array([[0.3, 0.1]], np.float32), 4)
    np.testing.assert_allclose(g, [[0, 0.25, 0, 0.75]])


# ---- predictors with a known answer ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["lookup", "ngram", "mlp"])
def test_deterministic_transitions_are_predicted_exactly(deterministic, name):
    train, test = split_data(deterministic)
    hops = [1, 2] if name != "mlp" else [1]
    pairs = P.layer_pairs(LAYERS, hops)
    predictor = fitted(name, train, pairs)
    for layer, hop in pairs:
        m = P.routing_metrics(predictor.predict_scores(test, layer, hop), test.experts[:, layer + hop])
        assert m == pytest.approx({"top1": 1.0, "top2_hit": 1.0, "set_recall": 1.0, "exact_set": 1.0}), (layer, hop)


@pytest.mark.parametrize("name", ["random", "prior", "same", "lookup", "ngram", "mlp"])
def test_independent_layers_give_chance(independent, name):
    train, test = split_data(independent)
    pairs = P.layer_pairs(LAYERS, [1])
    predictor = fitted(name, train, pairs)
    chance = P.chance_metrics(EXPERTS, K)
    for layer, hop in pairs:
        m = P.routing_metrics(predictor.predict_scores(test, layer, hop), test.experts[:, layer + hop])
        for metric in ("top1", "top2_hit", "set_recall"):
            assert abs(m[metric] - chance[metric]) < 0.04, (name, layer, metric, m[metric])
        assert abs(m["exact_set"] - chance["exact_set"]) < 0.02


def test_same_expert_is_exact_when_layers_repeat(tmp_path):
    data = make_data(tmp_path, "same")
    train, test = split_data(data)
    same = P.SameExpertPredictor().fit(train, P.layer_pairs(LAYERS, [1, 3]))
    for layer, hop in [(0, 1), (2, 1), (0, 3)]:
        assert P.routing_metrics(same.predict_scores(test, layer, hop), test.experts[:, layer + hop])["exact_set"] == 1


def test_prior_ranks_by_training_frequency(deterministic):
    prior = P.PriorPredictor().fit(deterministic, [(0, 1)])
    scores = prior.predict_scores(deterministic, 0, 1)
    assert np.allclose(scores, scores[0])  # one ranking for every token
    mass = np.zeros(EXPERTS)  # the mean gate weight of each expert at layer 1, by a plain loop
    for ids, w in zip(deterministic.experts[:, 1], deterministic.weights[:, 1]):
        for e, g in zip(ids, w):
            mass[e] += g / w.sum() / len(deterministic)
    np.testing.assert_allclose(scores[0], mass, rtol=1e-5)
    assert P.rank_experts(scores[:1], 1)[0, 0] == np.argmax(mass)


def test_ngram_uses_two_layers_where_one_says_nothing(tmp_path):
    """Layer 2 depends on the parities of layers 0 and 1 together (XOR): the 1-layer table sees
    chance between two sets, the 2-gram sees the answer."""
    data = make_data(tmp_path, "xor", per_dataset=10, length=60)
    train, test = split_data(data)
    truth = test.experts[:, 2]
    lookup = P.LookupPredictor().fit(train, [(1, 1)])
    bigram = P.NGramPredictor(n=2).fit(train, [(1, 1)])
    assert abs(P.routing_metrics(lookup.predict_scores(test, 1, 1), truth)["top1"] - 0.5) < 0.1  # 4 or 6?
    assert P.routing_metrics(bigram.predict_scores(test, 1, 1), truth)["exact_set"] == 1.0


def test_ngram_backs_off_to_shorter_keys_then_prior(deterministic):
    train, test = split_data(deterministic)
    trigram = P.NGramPredictor(n=3).fit(train, [(2, 1)])
    prior = P.PriorPredictor().fit(train, [(2, 1)])
    row = test.take(np.arange(1))
    unseen_history = row.take(np.arange(1))
    unseen_history.experts = row.experts.copy()
    unseen_history.experts[0, 0] = [7, 6]  # layers 1..2 as before: the 3-gram key is new, the 2-gram is not
    np.testing.assert_allclose(trigram.predict_scores(unseen_history, 2, 1), trigram.predict_scores(row, 2, 1),
                               atol=0.05)  # the 2-gram (still deterministic) decides
    without = train.take(~(np.sort(train.experts[:, 2], 1) == [5, 7]).all(1))  # never sees the set {5, 7} at layer 2
    lookup = P.LookupPredictor().fit(without, [(2, 1)])
    prior = P.PriorPredictor().fit(without, [(2, 1)])
    nothing_seen = row.take(np.arange(1))
    nothing_seen.experts = np.array([[[7, 6], [7, 6], [7, 5], [0, 1]]])
    np.testing.assert_allclose(lookup.predict_scores(nothing_seen, 2, 1), prior.predict_scores(nothing_seen, 2, 1))
    strict = P.NGramPredictor(n=1, min_count=10 ** 9).fit(without, [(2, 1)])  # no key is ever trusted
    np.testing.assert_allclose(strict.predict_scores(row, 2, 1), prior.predict_scores(row, 2, 1))


def test_random_predictor_is_seeded(deterministic):
    a = P.RandomPredictor(seed=1).fit(deterministic, [(0, 1)])
    np.testing.assert_array_equal(a.predict_scores(deterministic, 0, 1), a.predict_scores(deterministic, 0, 1))
    b = P.RandomPredictor(seed=2).fit(deterministic, [(0, 1)])
    assert not np.array_equal(a.predict_scores(deterministic, 0, 1), b.predict_scores(deterministic, 0, 1))


# ---- the MLP -----------------------------------------------------------------------------------------


def test_mlp_never_sees_layers_after_the_source(deterministic):
    train, test = split_data(deterministic)
    mlp = P.MLPPredictor(P.MLPConfig(hidden_size=32, steps=20, token_dim=4)).fit(train, P.layer_pairs(LAYERS, [1, 2]))
    changed = test.take(np.arange(len(test)))
    changed.experts = test.experts.copy()
    changed.experts[:, 2:] = (changed.experts[:, 2:] + 3) % EXPERTS  # layers 2.. rewritten
    for layer, hop in [(0, 1), (1, 1), (0, 2), (1, 2)]:
        np.testing.assert_array_equal(mlp.predict_scores(test, layer, hop), mlp.predict_scores(changed, layer, hop))
    assert not np.array_equal(mlp.predict_scores(test, 2, 1), mlp.predict_scores(changed, 2, 1))


def test_mlp_saves_loads_and_resumes(deterministic, tmp_path):
    train, test = split_data(deterministic)
    pairs = P.layer_pairs(LAYERS, [1])
    cfg = P.MLPConfig(hidden_size=32, steps=30, token_dim=4)
    mlp = P.MLPPredictor(cfg, out_dir=tmp_path / "mlp").fit(train, pairs)
    meta = json.loads((tmp_path / "mlp" / "mlp.json").read_text())
    assert meta["config"]["steps"] == 30 and meta["pairs"] == [list(p) for p in pairs]
    assert meta["layout"] == {"num_layers": LAYERS, "top_k": K, "num_experts": EXPERTS}
    loaded = P.MLPPredictor.load(tmp_path / "mlp")
    np.testing.assert_allclose(loaded.predict_scores(test, 1, 1), mlp.predict_scores(test, 1, 1), rtol=1e-6)
    again = P.MLPPredictor(cfg, out_dir=tmp_path / "mlp").fit(train, pairs)  # finished run: resumed, no step
    assert again.history == mlp.history
    np.testing.assert_allclose(again.predict_scores(test, 1, 1), mlp.predict_scores(test, 1, 1), rtol=1e-6)
    assert len(list((tmp_path / "mlp").glob("checkpoints-*"))) == 1
    with pytest.raises(PredictorError, match="not a saved MLPPredictor"):
        P.MLPPredictor.load(tmp_path)


def test_mlp_training_is_deterministic(deterministic):
    train, test = split_data(deterministic)
    cfg = P.MLPConfig(hidden_size=32, steps=15, token_dim=4)
    a = P.MLPPredictor(cfg).fit(train, [(0, 1)]).predict_scores(test, 0, 1)
    b = P.MLPPredictor(cfg).fit(train, [(0, 1)]).predict_scores(test, 0, 1)
    np.testing.assert_array_equal(a, b)


# ---- splits ----------------------------------------------------------------------------------------


def test_problem_split_is_grouped_stratified_and_seeded(deterministic):
    data = deterministic
    (split,) = P.make_splits(data, "problem", seed=3, test_fraction=0.3)
    train_p, test_p = set(data.problem[split.train]), set(data.problem[split.test])
    assert not train_p & test_p and train_p | test_p == set(range(len(data.problems)))
    assert len(split.train) + len(split.test) == len(data)
    for name in ("code", "math"):  # 3 of 10 problems of each dataset held out
        assert sum(data.problems[p][0] == name for p in test_p) == 3
    (same,) = P.make_splits(data, "problem", seed=3, test_fraction=0.3)
    np.testing.assert_array_equal(same.test, split.test)
    (other,) = P.make_splits(data, "problem", seed=4, test_fraction=0.3)
    assert not np.array_equal(other.test, split.test)


def test_dataset_split_goes_both_ways(deterministic):
    splits = P.make_splits(deterministic, "dataset")
    assert [(s.train_label, s.test_label) for s in splits] == [("math", "code"), ("code", "math")]
    for s in splits:
        assert set(deterministic.dataset[s.test]) == {s.test_label}
        assert set(deterministic.dataset[s.train]) == {s.train_label}


def test_token_split_mixes_problems(deterministic):
    (split,) = P.make_splits(deterministic, "token", seed=0, test_fraction=0.25)
    assert len(split.test) == round(0.25 * len(deterministic))
    assert np.intersect1d(deterministic.problem[split.train], deterministic.problem[split.test]).size > 0
    assert np.intersect1d(split.train, split.test).size == 0


def test_leaks_and_empty_sides_are_refused(deterministic):
    rows = np.arange(len(deterministic))
    with pytest.raises(PredictorError, match="leaks: problem"):
        P.check_no_leak(deterministic, P.Split("problem", "a", "b", rows[::2], rows[1::2]))
    with pytest.raises(PredictorError, match="the test side is empty"):
        P.make_splits(deterministic, "problem", test_fraction=0.01)  # round(0.1) = 0 problems per dataset
    with pytest.raises(PredictorError, match="unknown split 'random'"):
        P.make_splits(deterministic, "random")
    one = deterministic.take(deterministic.dataset == "code")
    with pytest.raises(PredictorError, match="needs two datasets"):
        P.make_splits(one, "dataset")


def test_subsets(deterministic, tmp_path):
    masks = P.subset_masks(deterministic, ["all", "prompt", "generated", "unique"])
    assert masks["all"].all() and not (masks["prompt"] & masks["generated"]).any()
    assert (masks["prompt"] | masks["generated"]).all()
    problems = problem_list(1, 6)  # two problems of 6 tokens
    experts = np.tile(synthetic_arrays("deterministic", 3)[0], (4, 1, 1))  # 3 journeys, 4 times each
    out = write_traces(tmp_path / "rep", experts, np.full(experts.shape, 0.5, np.float32), problems,
                       token_ids=np.zeros(12, int))
    unique = P.subset_masks(P.load_routing(out), ["unique"])["unique"]
    np.testing.assert_array_equal(np.flatnonzero(unique), [0, 1, 2])
    with pytest.raises(PredictorError, match="unknown subset"):
        P.subset_masks(deterministic, ["decode"])


# ---- errors ----------------------------------------------------------------------------------------


def test_clear_errors(deterministic):
    with pytest.raises(PredictorError, match="hop 2 from layer 2 targets layer 4, beyond the last MoE layer 3"):
        P.check_pair(LAYERS, 2, 2)
    with pytest.raises(PredictorError, match="hop 4 from layer 0 targets layer 4"):
        P.layer_pairs(LAYERS, [1, 4])
    with pytest.raises(PredictorError, match="hop must be an integer >= 1"):
        P.check_pair(LAYERS, 0, 0)
    lookup = P.LookupPredictor()
    with pytest.raises(PredictorError, match="call fit"):
        lookup.predict_scores(deterministic, 0, 1)
    lookup.fit(deterministic, [(0, 1)])
    with pytest.raises(PredictorError, match="beyond the last MoE layer"):
        lookup.predict_scores(deterministic, 3, 1)
    with pytest.raises(PredictorError, match=r"not fitted for layer 1, hop 1; fitted pairs \[\(0, 1\)\]"):
        lookup.predict_scores(deterministic, 1, 1)
    with pytest.raises(PredictorError, match="unknown predictor 'oracle'"):
        P.make_predictor("oracle")
    with pytest.raises(PredictorError, match="unknown predictor"):
        P.EvalConfig(predictors="lookup,gru")
    with pytest.raises(PredictorError, match="empty training set"):
        P.PriorPredictor().fit(deterministic.take(np.zeros(0, int)), [(0, 1)])
    with pytest.raises(HiddenStatesUnavailable, match="attach_hidden_states"):
        P.HiddenRouterPredictor().fit(deterministic, [(0, 1)])


def test_hidden_predictors_need_a_loadable_model(deterministic):
    data = deterministic.take(np.arange(len(deterministic)))
    with pytest.raises(HiddenStatesUnavailable, match="'no/such-model', and it cannot be loaded"):
        P.attach_hidden_states(data, progress=False)
    with pytest.raises(HiddenStatesUnavailable, match="cannot be loaded"):
        P.evaluate(data, predictors="prior,hidden_router")


# ---- the hidden-state predictors on a real (tiny) model ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_traces(tmp_path_factory):
    from test_routing_collect import run, tiny_model

    from routelib.data.tokenizer import load_tokenizer

    model = tiny_model("mixtral")
    prompts = {f"p{i}": text for i, text in enumerate(
        ["def add(a, b):", "Question: 2 + 2?\nAnswer:", "Once upon a time", "import os\nimport sys", "x = [1, 2, 3]",
         "The capital of France is", "for i in range(10):", "class A:\n    pass"])}
    out = tmp_path_factory.mktemp("tiny") / "traces"
    run(model, load_tokenizer("bpe8k"), out, prompts=prompts, max_new_tokens=10, batch_size=4)
    return model, out


def test_hidden_states_reproduce_the_traced_routing(tiny_traces):
    model, out = tiny_traces
    data = P.load_routing(out)
    hidden = P.attach_hidden_states(data, model, batch_tokens=64, progress=False)  # several padded batches
    assert hidden.agreement == 1.0 and hidden.x.shape == (len(data), 3, 32) and hidden.x.dtype == np.float16
    routers = [layer.mlp.gate for layer in model.model.layers]
    zero_shot = P.HiddenRouterPredictor().fit(data, [(0, 1), (0, 2), (1, 1)])
    for layer, hop in [(0, 1), (0, 2), (1, 1)]:
        with torch.no_grad():
            logits = routers[layer + hop](torch.from_numpy(hidden.x[:, layer]).float())[0]
        np.testing.assert_allclose(zero_shot.predict_scores(data, layer, hop), torch.softmax(logits, -1).numpy(),
                                   rtol=1e-5, atol=1e-6)
    # each router applied to its own layer's input gives back the traced top-k: the input is the right one
    for layer in range(3):
        with torch.no_grad():
            ids = routers[layer](torch.from_numpy(hidden.x[:, layer]).float())[2].numpy()
        assert (np.sort(ids, 1) == np.sort(data.experts[:, layer], 1)).mean() > 0.99


def test_hidden_probe_starts_at_the_router_and_learns(tiny_traces):
    model, out = tiny_traces
    data = P.load_routing(out)
    P.attach_hidden_states(data, model, progress=False)
    pairs = [(0, 1), (1, 1)]
    untrained = P.HiddenProbePredictor(P.ProbeConfig(steps=1, lr=1e-9)).fit(data, pairs)
    zero_shot = P.HiddenRouterPredictor().fit(data, pairs)
    np.testing.assert_allclose(untrained.predict_scores(data, 0, 1), zero_shot.predict_scores(data, 0, 1), atol=1e-4)
    probe = P.HiddenProbePredictor(P.ProbeConfig(steps=150, batch_size=128, lr=3e-2)).fit(data, pairs)
    for layer, hop in pairs:
        truth = data.experts[:, layer + hop]
        trained = P.routing_metrics(probe.predict_scores(data, layer, hop), truth)["set_recall"]
        assert trained >= P.routing_metrics(zero_shot.predict_scores(data, layer, hop), truth)["set_recall"]


def test_hidden_states_refuse_another_model(tiny_traces):
    from test_routing_collect import tiny_model

    _, out = tiny_traces
    with pytest.raises(HiddenStatesUnavailable, match="router weights differ"):
        P.attach_hidden_states(P.load_routing(out), tiny_model("mixtral", seed=1), progress=False)
    token_split = P.load_routing(out)
    token_split = token_split.take(np.arange(1, len(token_split)))  # position 0 of the first problem missing
    with pytest.raises(PredictorError, match="positions are not 0..n-1"):
        P.attach_hidden_states(token_split, tiny_traces[0], progress=False)


# ---- evaluate and the CLI --------------------------------------------------------------------------


def test_evaluate_and_summaries(deterministic):
    cfg = P.EvalConfig(split="problem,dataset", hops="1,2", predictors="random,lookup,ngram",
                       subsets="all,generated")
    per_layer = P.evaluate(deterministic, cfg)
    assert set(per_layer["split"]) == {"problem", "dataset"}
    # problem: 3 predictors + chance, 2 subsets, 3 + 2 pairs; dataset: the same for each direction
    assert len(per_layer) == 3 * 4 * 2 * 5
    summary = P.summarize(per_layer)
    lookup = summary[(summary["predictor"] == "lookup") & (summary["split"] == "problem")]
    assert (lookup["top1"] == 1.0).all() and set(lookup["layers"]) == {3, 2}
    chance = summary[summary["predictor"] == "chance"]
    assert (chance["top1"] == 0.125).all()
    assert summary["predictor"].tolist()[:4] == ["chance", "random", "lookup", "ngram"]
    table = P.seed_table(summary)
    assert table.loc["lookup", "top1"] == 1.0 and table.loc["lookup", "seed_top1"] == 0.42
    assert table.loc["lookup", "x_random"] == pytest.approx(8.0)
    assert math.isnan(table.loc["ngram", "seed_top1"])
    with pytest.raises(PredictorError, match="no rows for split 'token'"):
        P.seed_table(summary, split="token")


def test_evaluate_reads_a_trace_dir_and_saves_the_mlp(tmp_path):
    problems = problem_list(4, 20)
    experts, weights = synthetic_arrays("deterministic", 160)
    out = write_traces(tmp_path / "t", experts, weights, problems)
    per_layer = P.evaluate(out, predictors="mlp", mlp_steps=5, mlp_hidden=8, out_dir=str(tmp_path / "run"))
    assert set(per_layer["predictor"]) == {"mlp", "chance"}
    saved = list((tmp_path / "run").glob("mlp-*/mlp.safetensors"))
    assert len(saved) == 1


def test_cli_prints_the_table(tmp_path, capsys):
    problems = problem_list(6, 50)  # 300 tokens per dataset: every one of the 28 sets seen in training
    experts, weights = synthetic_arrays("deterministic", 600)
    out = write_traces(tmp_path / "t", experts, weights, problems)
    assert P.main([str(out), "--split", "dataset", "--hops", "1,3", "--predictors", "prior,lookup"]) == 0
    text = capsys.readouterr().out
    assert "lookup" in text and "chance" in text and "math" in text and "code" in text
    lines = [line.split() for line in text.splitlines() if " lookup " in line]
    assert len(lines) == 4 and all(float(line[-4]) == 1.0 for line in lines)  # 2 directions x 2 hops, top1 = 1
    assert P.main([str(out), "--hops", "4"]) == 2
    assert "hop 4 from layer 0 targets layer 4" in capsys.readouterr().err
    assert P.main([str(out), "--predictors", "lookup,gru"]) == 2
    assert "unknown predictor ['gru']" in capsys.readouterr().err
    assert P.main([str(tmp_path / "nothing")]) == 2
    assert "manifest.json not found" in capsys.readouterr().err


def test_repetition_and_overlap_diagnostics(tmp_path):
    problems = problem_list(2, 6)  # 4 problems of 6 tokens, 2 per dataset
    base = synthetic_arrays("deterministic", 6)[0]
    experts = np.concatenate([base, base, base[::-1], base])  # problem 2 reverses problem 0
    tokens = np.tile(np.arange(6), 4)
    tokens[6] = 9  # problem 1 differs from problem 0 in its first token only
    out = write_traces(tmp_path / "rep", experts, np.full(experts.shape, 0.5, np.float32), problems,
                       token_ids=tokens)
    data = P.load_routing(out)
    table = P.repetition_table(data).set_index(["dataset", "phase"])
    assert table.loc[("code", "prompt"), "tokens"] == 6 and table.loc[("code", "prompt"), "distinct_journeys"] == 4
    assert table.loc[("code", "prompt"), "repeated_share"] == pytest.approx(2 / 6)
    train = np.flatnonzero(data.problem == 0)
    for test_problem, expected in [(1, 5 / 6), (3, 1.0), (2, 0.0)]:  # reversed journeys pair other token ids
        split = P.Split("problem", "a", "b", train, np.flatnonzero(data.problem == test_problem))
        assert P.journey_overlap(data, split) == pytest.approx(expected), test_problem


def test_metric_table(deterministic):
    summary = P.summarize(P.evaluate(deterministic, split="problem,dataset", predictors="prior,lookup"))
    table = P.metric_table(summary, "direction", "top1", hop=1, subset="all")
    assert list(table.index) == ["chance", "prior", "lookup"]
    assert set(table.columns) == {"problem: code+math -> code+math", "dataset: code -> math", "dataset: math -> code"}
    assert (table.loc["lookup"] == 1.0).all()
    with pytest.raises(PredictorError, match="no rows with"):
        P.metric_table(summary, "hop", hop=7)
