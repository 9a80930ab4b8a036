"""routelib.routing.predict.metrics: the four metrics against a hand-worked example, the chance
formulas, and the errors for bad shapes."""

import numpy as np
import pytest

from routelib.routing.predict import metrics as M
from routelib.routing.predict.dataset import PredictorError


def test_chance_metrics_formulas():
    assert M.chance_metrics(8, 2) == pytest.approx({"top1": 0.125, "top2_hit": 0.25, "set_recall": 0.25,
                                                    "exact_set": 1 / 28})
    assert M.chance_metrics(4, 1) == pytest.approx({"top1": 0.25, "top2_hit": 0.5, "set_recall": 0.25,
                                                    "exact_set": 0.25})
    with pytest.raises(PredictorError, match="need E >= 2"):
        M.chance_metrics(1, 1)


def test_metrics_on_a_worked_example():
    experts = np.array([[2, 5], [1, 0], [3, 4], [6, 7]])  # true top-1 first
    scores = np.array([
        [0, 0, 9, 0, 0, 8, 0, 0],  # ranks 2, 5: all right
        [5, 9, 0, 0, 0, 0, 0, 0],  # ranks 1, 0: top-1 right, same set
        [0, 0, 0, 1, 9, 0, 0, 0],  # ranks 4, 3, then ties -> 0: top-1 wrong, top-2 hit, set right
        [0, 0, 0, 0, 0, 0, 0, 0],  # all tied: ranks 0, 1 (lower id wins): nothing
    ], float)
    per = M.routing_metrics_per_token(scores, experts)
    np.testing.assert_array_equal(per["top1"], [1, 1, 0, 0])
    np.testing.assert_array_equal(per["top2_hit"], [1, 1, 1, 0])
    np.testing.assert_array_equal(per["set_recall"], [1, 1, 1, 0])
    np.testing.assert_array_equal(per["exact_set"], [1, 1, 1, 0])
    scores[3, 7] = 1  # predicted {7, 0}: one of two right, true top-1 (6) missed
    per = M.routing_metrics_per_token(scores, experts)
    assert per["set_recall"][3] == 0.5 and per["exact_set"][3] == 0 and per["top2_hit"][3] == 0
    assert M.routing_metrics(scores, experts)["set_recall"] == pytest.approx(3.5 / 4)
    np.testing.assert_array_equal(M.rank_experts(np.zeros((1, 4)), 4), [[0, 1, 2, 3]])


def test_metrics_reject_bad_shapes():
    with pytest.raises(PredictorError, match=r"scores \(N, E\) and experts \(N, k\)"):
        M.routing_metrics(np.zeros((3, 8)), np.zeros((2, 2), int))
