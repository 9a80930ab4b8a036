"""routelib.routing.predict.predictors: every predictor on synthetic traces with a known answer
(deterministic transitions -> 100 %, independent layers -> chance); the MLP's masking, save/load and
resume; the hidden-state probe on a tiny Mixtral; evaluate, the tables, the CLI and its errors.
The synthetic traces and the hidden states are tested in test_routing_predict_dataset.py, the metrics in
test_routing_predict_metrics.py, the splits in test_routing_predict_splits.py."""

import json
import math

import numpy as np
import pytest

from routelib.routing import predict as P
from routelib.routing.predict import evaluation as E
from routelib.routing.predict.dataset import HiddenStatesUnavailable, PredictorError

# module fixtures and helpers, shared (test_routing_predict_prefetch imports deterministic and make_data from here)
from test_routing_predict_dataset import (EXPERTS, K, LAYERS, deterministic, make_data, problem_list,  # noqa: F401
                               synthetic_arrays, tiny_traces, write_traces)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def independent(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("ind"), "independent", per_dataset=20, length=100)


def split_data(data, seed=0):
    split = P.make_splits(data, "problem", seed=seed)[0]
    return data.take(split.train), data.take(split.test)


FAST_MLP = P.MLPConfig(hidden_size=64, steps=300, batch_size=256, lr=1e-2, token_dim=0)


def fitted(name, train, pairs):
    makers = {"mlp": lambda: P.MLPPredictor(FAST_MLP), "mlp_history": lambda: P.HistoryMLPPredictor(FAST_MLP)}
    predictor = makers[name]() if name in makers else P.make_predictor(name)
    return predictor.fit(train, pairs)


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
    assert E.main([str(out), "--split", "dataset", "--hops", "1,3", "--predictors", "prior,lookup"]) == 0
    text = capsys.readouterr().out
    assert "lookup" in text and "chance" in text and "math" in text and "code" in text
    lines = [line.split() for line in text.splitlines() if " lookup " in line]
    assert len(lines) == 4 and all(float(line[-4]) == 1.0 for line in lines)  # 2 directions x 2 hops, top1 = 1
    assert E.main([str(out), "--hops", "4"]) == 2
    assert "hop 4 from layer 0 targets layer 4" in capsys.readouterr().err
    assert E.main([str(out), "--predictors", "lookup,gru"]) == 2
    assert "unknown predictor ['gru']" in capsys.readouterr().err
    assert E.main([str(tmp_path / "nothing")]) == 2
    assert "manifest.json not found" in capsys.readouterr().err


def test_metric_table(deterministic):
    summary = P.summarize(P.evaluate(deterministic, split="problem,dataset", predictors="prior,lookup"))
    table = P.metric_table(summary, "direction", "top1", hop=1, subset="all")
    assert list(table.index) == ["chance", "prior", "lookup"]
    assert set(table.columns) == {"problem: code+math -> code+math", "dataset: code -> math", "dataset: math -> code"}
    assert (table.loc["lookup"] == 1.0).all()
    with pytest.raises(PredictorError, match="no rows with"):
        P.metric_table(summary, "hop", hop=7)


# ---- the previous token: prev_token and history ------------------------------------------


def recurrent_data(tmp_path, per_dataset=12, length=60, seed=0):
    """Layer 0: a random bit b_t (set {0, 2} or {1, 3}); layers 1-3: y_t = b_t xor y_{t-1} (set {4, 5}
    or {6, 7}; y = 0 at a sequence start): the target is a function of the current token's layer 0
    and the previous token's layer 1 together, of neither alone."""
    rng = np.random.default_rng(seed)
    problems = problem_list(per_dataset, length)
    n = sum(p[2] for p in problems)
    bits = rng.integers(0, 2, n)
    y = np.zeros(n, np.int64)
    for i in range(n):
        y[i] = bits[i] ^ (y[i - 1] if i % length else 0)
    experts = np.zeros((n, LAYERS, K), np.int64)
    experts[:, 0] = np.stack([bits, 2 + bits], 1)
    experts[:, 1:] = np.stack([4 + 2 * y, 5 + 2 * y], 1)[:, None, :]
    weights = np.broadcast_to(np.float32([0.6, 0.4]), experts.shape).copy()
    return P.load_routing(write_traces(tmp_path / "rec", experts, weights, problems))


def test_known_previous_only_at_decode_time(deterministic):
    prev = P.known_previous(deterministic)
    starts = deterministic.position == 0
    assert (prev[starts] == -1).all() and (prev[~deterministic.generated] == -1).all()
    gen = np.flatnonzero(deterministic.generated)
    assert (deterministic.problem[prev[gen]] == deterministic.problem[gen]).all()
    assert (deterministic.position[prev[gen]] == deterministic.position[gen] - 1).all()
    everywhere = P.known_previous(deterministic, prompt=True)
    assert (everywhere[starts] == -1).all() and (everywhere[~starts] >= 0).all()
    # a token split: predecessors on the training side are unknown, never another sequence's token
    part = deterministic.take(np.arange(0, len(deterministic), 2))
    assert (P.known_previous(part) == -1).all()


def test_history_needs_both_the_previous_token_and_the_current_layers(tmp_path):
    data = recurrent_data(tmp_path)
    train, test = split_data(data)
    pairs = [(0, 1)]
    gen = test.generated
    top1 = {}
    for name in ("ngram", "prev_token", "history"):
        predictor = P.make_predictor(name).fit(train, pairs)
        per = P.routing_metrics_per_token(predictor.predict_scores(test, 0, 1), test.experts[:, 1])
        top1[name] = (per["top1"][gen].mean(), per["top1"][~gen].mean())
    assert top1["history"][0] == 1.0  # decode steps: both halves of the key known
    assert 0.4 < top1["history"][1] < 0.6  # prefill: the previous token's layer 1 is not known yet
    assert 0.4 < top1["ngram"][0] < 0.6 and 0.4 < top1["prev_token"][0] < 0.6
    cfg = P.EvalConfig(history_prompt=True)
    prompt_too = P.make_predictor("history", cfg).fit(train, pairs)
    per = P.routing_metrics_per_token(prompt_too.predict_scores(test, 0, 1), test.experts[:, 1])
    assert per["top1"][test.position > 0].mean() == 1.0


def test_prev_token_repeats_the_previous_set_and_falls_back_to_the_prior(tmp_path):
    data = recurrent_data(tmp_path)
    train, test = split_data(data)
    predictor = P.PrevTokenPredictor().fit(train, [(0, 1), (0, 2)])
    prior = P.PriorPredictor().fit(train, [(0, 1), (0, 2)])
    scores = predictor.predict_scores(test, 0, 2)
    prev = P.known_previous(test)
    known = prev >= 0
    np.testing.assert_array_equal(np.sort(P.rank_experts(scores[known])[:, :K], 1),
                                  np.sort(test.experts[prev[known], 2], 1))
    assert (P.rank_experts(scores[known])[:, 0] == test.experts[prev[known], 2, 0]).all()  # by gate weight
    np.testing.assert_array_equal(P.rank_experts(scores[~known]),
                                  P.rank_experts(prior.predict_scores(test, 0, 2)[~known]))


@pytest.mark.parametrize("name", ["prev_token", "history", "mlp_history"])
def test_previous_token_predictors_do_not_leak(tmp_path, name):
    """The scores of a token change neither with the current token's layers after the source layer,
    nor with any later token of its sequence, nor (in the prefill) with the previous token."""
    data = recurrent_data(tmp_path)
    train, test = split_data(data)
    predictor = fitted(name, train, [(0, 1), (1, 2)])
    same = np.testing.assert_array_equal if name != "mlp_history" else \
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # float batches may round apart
    rng = np.random.default_rng(5)
    for layer, hop in [(0, 1), (1, 2)]:
        base = predictor.predict_scores(test, layer, hop)
        last = np.r_[test.problem[1:] != test.problem[:-1], True]  # the last token of each sequence
        changed = test.take(np.arange(len(test)))
        changed.experts = test.experts.copy()
        shuffled = np.argsort(rng.random((last.sum(), LAYERS - layer - 1, EXPERTS)), -1)[..., :K]
        changed.experts[last, layer + 1:] = shuffled
        same(predictor.predict_scores(changed, layer, hop)[last], base[last])
        # a prefix of every sequence scores its tokens as the whole sequence does
        prefix = test.position < 25
        same(predictor.predict_scores(test.take(prefix), layer, hop), base[prefix])
        # prompt tokens: their predecessor's later layers do not matter
        hidden_prev = test.take(np.arange(len(test)))
        hidden_prev.experts = test.experts.copy()
        hidden_prev.experts[:, layer + 1:] = np.roll(test.experts[:, layer + 1:], 1, axis=0)
        prompt = ~test.generated
        same(predictor.predict_scores(hidden_prev, layer, hop)[prompt], base[prompt])


def test_prev_token_cache_equals_lru_at_k(tmp_path):
    """A cache of k slots under LRU holds the previous token's set: the prev_token predictor's hit
    rate at c = k equals LRU's on decoded tokens."""
    from routelib.routing.predict import prefetch

    data = recurrent_data(tmp_path)
    train, test = split_data(data)
    predictor = P.PrevTokenPredictor().fit(train, P.layer_pairs(LAYERS, [1]))
    mask = test.generated & (test.position > 0)
    curves = prefetch.prefetch_curves({"prev_token": predictor}, test, mask=mask, per_layer=True)
    at_k = curves[curves["cache_size"] == K].pivot(index="target_layer", columns="name", values="hit_rate")
    np.testing.assert_allclose(at_k["prev_token"], at_k["lru"])
    assert set(curves["target_layer"]) == {1, 2, 3}


def test_mlp_history_learns_what_needs_the_previous_token(tmp_path):
    data = recurrent_data(tmp_path)
    train, test = split_data(data)
    plain = fitted("mlp", train, [(0, 1)])
    both = fitted("mlp_history", train, [(0, 1)])
    gen = test.generated
    top1 = {name: P.routing_metrics_per_token(p.predict_scores(test, 0, 1), test.experts[:, 1])["top1"]
            for name, p in (("mlp", plain), ("mlp_history", both))}
    assert top1["mlp_history"][gen].mean() > 0.95  # decode steps: the xor of two known bits
    assert 0.4 < top1["mlp_history"][~gen].mean() < 0.6  # prefill: the predecessor is not known
    assert 0.4 < top1["mlp"][gen].mean() < 0.6
    saved = both.save(tmp_path / "mlp_history")
    loaded = P.HistoryMLPPredictor.load(saved.parent)
    assert loaded.cfg.previous and loaded.prompt is False
    np.testing.assert_array_equal(loaded.predict_scores(test, 0, 1), both.predict_scores(test, 0, 1))


def test_cli_defaults_run_on_two_problems_per_dataset(tmp_path, capsys):
    """A small real set: 2 problems per dataset, every default option (the MLP shortened): one whole
    problem of each dataset is held out, and the CLI says so before the table."""
    problems = problem_list(2, 30)
    experts, weights = synthetic_arrays("deterministic", 120)
    out = write_traces(tmp_path / "t", experts, weights, problems)
    assert E.main([str(out), "--mlp_steps", "20"]) == 0
    text = capsys.readouterr().out
    assert "whole problems held out (code 1 of 2, math 1 of 2); 60 training tokens, 60 test tokens" in text
    assert " mlp " in text and " ngram " in text
