"""routelib.routing.analyse.usage: the statistics every model is compared on, against hand-computed
cases; and on the published OLMoE/Mixtral aggregates where they are on this machine."""

import numpy as np
import pandas as pd
import pytest

from routelib.errors import ConfigError
from routelib.routing.analyse import usage as U


def test_usage_of_uniform_and_of_one_expert():
    assert U.usage_stats([5, 5, 5, 5]) == pytest.approx({"entropy": 1.0, "max_share": 0.25, "uniform_share": 0.25})
    one = U.usage_stats([0, 9, 0, 0])
    assert one["entropy"] == pytest.approx(0.0) and one["max_share"] == 1.0


def test_domains_that_route_alike_and_apart():
    alike = U.domain_stats(pd.DataFrame([[1, 1, 2, 0], [2, 2, 4, 0]], index=["a", "b"]))
    assert alike["tv_from_pooled"].tolist() == pytest.approx([0, 0]) and alike["top_lift"].tolist() == pytest.approx([2, 2])
    apart = U.domain_stats(pd.DataFrame([[4, 0], [0, 4]], index=["a", "b"]))
    assert apart["tv_from_pooled"].tolist() == pytest.approx([0.5, 0.5])


def test_transitions_determined_and_independent():
    det = U.transition_stats(np.diag([3, 5, 2]))
    assert det["uncertainty_coefficient"] == pytest.approx(1) and det["lookup_accuracy"] == 1
    indep = U.transition_stats(np.outer([1, 2, 3], [4, 1, 1]))
    assert indep["uncertainty_coefficient"] == pytest.approx(0, abs=1e-12)
    assert indep["lookup_accuracy"] == pytest.approx(indep["prior_accuracy"]) == pytest.approx(4 / 6)


def test_vocabulary_share_of_the_top_expert():
    frame = pd.DataFrame({"token_id": [7, 7, 7, 9], "expert": [0, 0, 1, 3], "count": [3, 1, 1, 6]})
    # token 7: 4 of its 5 routings to expert 0; token 9: 6 of 6 -> (4 + 6) / 11
    assert U.vocabulary_stats(frame) == {"top_expert_share": pytest.approx(10 / 11),
                                         "top_expert_rate": pytest.approx(10 / 11), "tokens": 2}
    assert U.vocabulary_stats(frame, min_count=6) == {"top_expert_share": 1.0, "top_expert_rate": 1.0, "tokens": 1}


def test_vocabulary_rate_counts_occurrences_under_top_k():
    # top-2: token 5 occurs 4 times, always with expert 0 and twice each with 1 and 2 -> 4 of 8 routings to
    # expert 0 (share 0.5), but expert 0 in every occurrence (rate 1)
    frame = pd.DataFrame({"token_id": [5, 5, 5], "expert": [0, 1, 2], "count": [4, 2, 2]})
    stats = U.vocabulary_stats(frame, top_k=2)
    assert stats["top_expert_share"] == pytest.approx(0.5) and stats["top_expert_rate"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="top_k"):
        U.vocabulary_stats(frame, top_k=0)


def test_counts_from_traces():
    experts = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 1]], [[1, 0], [3, 2]]])  # (N=3, L=2, k=2)
    assert U.layer_counts(experts, 0, 4).tolist() == [3, 2, 1, 0]
    assert U.layer_counts(experts, 0, 4, first_only=True).tolist() == [2, 1, 0, 0]
    assert U.transition_counts(experts, 0, 1, 4)[0, 2] == 2 and U.transition_counts(experts, 0, 1, 4).sum() == 3
    dom = U.domain_counts(experts, 1, 4, ["x", "y", "x"])
    assert dom.loc["x"].tolist() == [0, 0, 2, 2] and dom.loc["y"].tolist() == [0, 1, 1, 0]
    tok = U.token_expert_counts(experts, 0, [5, 5, 6])
    assert tok[tok["token_id"] == 5].set_index("expert")["count"].to_dict() == {0: 2, 1: 1, 2: 1}


def test_relative_depths():
    assert U.relative_depths(32) == [0, 8, 16] and U.relative_depths(30) == [0, 7, 14] and U.relative_depths(6) == [0, 1, 2]


def test_empty_counts_are_refused():
    with pytest.raises(ConfigError, match="positive total"):
        U.usage_stats([0, 0])


def test_the_published_aggregates_give_sane_statistics():
    from test_routing_record_olmoe_analysis import published_root
    from routelib.routing.record import olmoe_analysis as O

    root = published_root()
    for model in ("mistral", "olmoe"):
        counts = pd.concat([O.expert_counts(root, model, d).assign(domain=d) for d in O.DOMAINS])
        layer0 = counts[counts["layer"] == 0].pivot_table(index="domain", columns="expert", values="count", fill_value=0)
        stats = U.domain_stats(layer0)
        assert (stats["tv_from_pooled"].between(0, 1)).all()
        flow = O.transitions_top1(root, model, "wikipedia")
        joint = flow[flow["from_layer"] == 0].pivot_table(index="from_expert", columns="to_expert", values="count",
                                                          fill_value=0)
        t = U.transition_stats(joint.to_numpy())
        assert 0 <= t["uncertainty_coefficient"] <= 1 and t["lookup_accuracy"] >= t["prior_accuracy"]
