"""routelib.routing.predict.splits: problem splits grouped, stratified and seeded; dataset splits both ways;
token splits mixing problems; leaks and empty sides refused; test subsets; the repetition and
journey-overlap diagnostics."""

import numpy as np
import pytest

from routelib.routing.predict import dataset as D
from routelib.routing.predict import splits as S
from routelib.routing.predict.dataset import PredictorError

from test_routing_predict_dataset import deterministic, problem_list, synthetic_arrays, write_traces  # noqa: F401 -- shared

pytestmark = pytest.mark.usefixtures("one_thread")


def test_problem_split_is_grouped_stratified_and_seeded(deterministic):
    data = deterministic
    (split,) = S.make_splits(data, "problem", seed=3, test_fraction=0.3)
    train_p, test_p = set(data.problem[split.train]), set(data.problem[split.test])
    assert not train_p & test_p and train_p | test_p == set(range(len(data.problems)))
    assert len(split.train) + len(split.test) == len(data)
    for name in ("code", "math"):  # 3 of 10 problems of each dataset held out
        assert sum(data.problems[p][0] == name for p in test_p) == 3
    (same,) = S.make_splits(data, "problem", seed=3, test_fraction=0.3)
    np.testing.assert_array_equal(same.test, split.test)
    (other,) = S.make_splits(data, "problem", seed=4, test_fraction=0.3)
    assert not np.array_equal(other.test, split.test)


def test_dataset_split_goes_both_ways(deterministic):
    splits = S.make_splits(deterministic, "dataset")
    assert [(s.train_label, s.test_label) for s in splits] == [("math", "code"), ("code", "math")]
    for s in splits:
        assert set(deterministic.dataset[s.test]) == {s.test_label}
        assert set(deterministic.dataset[s.train]) == {s.train_label}


def test_token_split_mixes_problems(deterministic):
    (split,) = S.make_splits(deterministic, "token", seed=0, test_fraction=0.25)
    assert len(split.test) == round(0.25 * len(deterministic))
    assert np.intersect1d(deterministic.problem[split.train], deterministic.problem[split.test]).size > 0
    assert np.intersect1d(split.train, split.test).size == 0


def test_leaks_and_empty_sides_are_refused(deterministic):
    rows = np.arange(len(deterministic))
    with pytest.raises(PredictorError, match="leaks: problem"):
        S.check_no_leak(deterministic, S.Split("problem", "a", "b", rows[::2], rows[1::2]))
    with pytest.raises(PredictorError, match="the test side is empty"):  # one problem per dataset: none held out
        S.make_splits(deterministic.take(np.isin(deterministic.problem, [0, 10])), "problem")
    (small,) = S.make_splits(deterministic, "problem", test_fraction=0.01)  # round(0.1) = 0: still one each
    assert sorted(deterministic.problems[p][0] for p in np.unique(deterministic.problem[small.test])) == ["code", "math"]
    with pytest.raises(PredictorError, match="unknown split 'random'"):
        S.make_splits(deterministic, "random")
    one = deterministic.take(deterministic.dataset == "code")
    with pytest.raises(PredictorError, match="needs two datasets"):
        S.make_splits(one, "dataset")


def test_subsets(deterministic, tmp_path):
    masks = S.subset_masks(deterministic, ["all", "prompt", "generated", "unique"])
    assert masks["all"].all() and not (masks["prompt"] & masks["generated"]).any()
    assert (masks["prompt"] | masks["generated"]).all()
    problems = problem_list(1, 6)  # two problems of 6 tokens
    experts = np.tile(synthetic_arrays("deterministic", 3)[0], (4, 1, 1))  # 3 journeys, 4 times each
    out = write_traces(tmp_path / "rep", experts, np.full(experts.shape, 0.5, np.float32), problems,
                       token_ids=np.zeros(12, int))
    unique = S.subset_masks(D.load_routing(out), ["unique"])["unique"]
    np.testing.assert_array_equal(np.flatnonzero(unique), [0, 1, 2])
    with pytest.raises(PredictorError, match="unknown subset"):
        S.subset_masks(deterministic, ["decode"])


def test_repetition_and_overlap_diagnostics(tmp_path):
    problems = problem_list(2, 6)  # 4 problems of 6 tokens, 2 per dataset
    base = synthetic_arrays("deterministic", 6)[0]
    experts = np.concatenate([base, base, base[::-1], base])  # problem 2 reverses problem 0
    tokens = np.tile(np.arange(6), 4)
    tokens[6] = 9  # problem 1 differs from problem 0 in its first token only
    out = write_traces(tmp_path / "rep", experts, np.full(experts.shape, 0.5, np.float32), problems,
                       token_ids=tokens)
    data = D.load_routing(out)
    table = D.repetition_table(data).set_index(["dataset", "phase"])
    assert table.loc[("code", "prompt"), "tokens"] == 6 and table.loc[("code", "prompt"), "distinct_journeys"] == 4
    assert table.loc[("code", "prompt"), "repeated_share"] == pytest.approx(2 / 6)
    train = np.flatnonzero(data.problem == 0)
    for test_problem, expected in [(1, 5 / 6), (3, 1.0), (2, 0.0)]:  # reversed journeys pair other token ids
        split = S.Split("problem", "a", "b", train, np.flatnonzero(data.problem == test_problem))
        assert S.journey_overlap(data, split) == pytest.approx(expected), test_problem


@pytest.mark.parametrize("num, fraction, held", [(1, 0.25, 0), (2, 0.25, 1), (2, 0.9, 1), (3, 0.25, 1), (8, 0.25, 2),
                                                 (10, 0.3, 3), (4, 0.99, 3)])
def test_problem_split_keeps_a_problem_on_each_side(num, fraction, held):
    assert S.held_out_problems(num, fraction) == held
