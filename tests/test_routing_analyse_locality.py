"""routelib.routing.analyse.locality: constructed sequences with a known repetition (always repeat, never
repeat, i.i.d. from a skewed distribution, a per-sequence topic) recover the expected rates and
chance levels; the paired rows, the bootstrap and the errors."""

import math

import numpy as np
import pytest

from routelib.routing.analyse import locality as Lc
from routelib.routing.analyse.locality import LocalityError

E, K, L = 8, 2, 3


def layout(num_seq, length):
    """sequence and position arrays for num_seq sequences of ``length`` tokens, row-major."""
    return np.repeat(np.arange(num_seq), length), np.tile(np.arange(length), num_seq)


def rates(table, measure, phase="all", group="all", distance=1):
    rows = table[(table["measure"] == measure) & (table["phase"] == phase) & (table["group"] == group)
                 & (table["distance"] == distance)]
    return rows.set_index("layer")


def test_previous_rows_within_sequences_only():
    seq = np.array([0, 0, 0, 1, 1, 0])
    pos = np.array([0, 1, 2, 0, 1, 3])
    np.testing.assert_array_equal(Lc.previous_rows(seq, pos), [-1, 0, 1, -1, 3, 2])
    np.testing.assert_array_equal(Lc.previous_rows(seq, pos, 2), [-1, -1, 0, -1, -1, 1])
    # a missing position: no partner rather than the wrong one
    np.testing.assert_array_equal(Lc.previous_rows(np.array([0, 0]), np.array([0, 2])), [-1, -1])
    with pytest.raises(LocalityError, match="occurs twice"):
        Lc.previous_rows(np.array([0, 0]), np.array([1, 1]))
    with pytest.raises(LocalityError, match="distance"):
        Lc.previous_rows(seq, pos, 0)


def test_uniform_chance():
    u = Lc.uniform_chance(8, 2)
    assert u["top1_same"] == 0.125 and u["set_overlap"] == 0.25
    assert u["set_shared"] == pytest.approx(1 - 15 / 28)  # the Mixtral paper's 46 % random level
    assert Lc.uniform_chance(4, 1)["set_shared"] == 0.25


def test_always_repeat():
    rng = np.random.default_rng(0)
    seq, pos = layout(20, 30)
    sets = np.argsort(rng.random((20, L, E)), -1)[..., :K]  # one set per sequence and layer
    experts = sets[seq]  # (N, L, k): every token repeats its sequence's set
    t = Lc.consecutive_routing(experts, seq, pos, E, distances=(1, 5), bootstrap=200)
    for measure in Lc.MEASURES:
        for d in (1, 5):
            r = rates(t, measure, distance=d)
            assert (r["rate"] == 1).all() and (r["ci_low"] == 1).all() and (r["ci_high"] == 1).all()
            assert r["chance_in_sequence"].to_numpy() == pytest.approx(1.0)  # each sequence uses one set
            assert (r["chance"] < 0.9).all()  # pooled over 20 random sets: far less
    assert (rates(t, "top1_same")["pairs"] == 20 * 29).all()
    assert (rates(t, "top1_same", distance=5)["pairs"] == 20 * 25).all()


def test_never_repeat():
    seq, pos = layout(10, 40)
    # cycle through the four disjoint sets {0,1}, {2,3}, {4,5}, {6,7}: consecutive sets never meet
    block = (pos[:, None] % 4) * 2 + np.arange(K)  # (N, k)
    experts = np.repeat(block[:, None, :], L, 1)
    t = Lc.consecutive_routing(experts, seq, pos, E, distances=(1, 2, 4), bootstrap=100)
    for measure in Lc.MEASURES:
        assert (rates(t, measure)["rate"] == 0).all()
        assert (rates(t, measure, distance=2)["rate"] == 0).all()
        assert (rates(t, measure, distance=4)["rate"] == 1).all()  # the cycle's period
    # usage is uniform over the four disjoint sets: each chance is P(the same set) = 1/4 (for the
    # overlap: sum_e pi_e^2 / k = 8 * (1/4)^2 / 2)
    r = rates(t, "top1_same")
    assert r["chance"].to_numpy() == pytest.approx(0.25, abs=0.01)
    assert rates(t, "set_overlap")["chance"].to_numpy() == pytest.approx(0.25, abs=0.01)
    assert rates(t, "set_shared")["chance"].to_numpy() == pytest.approx(0.25, abs=0.01)


def test_iid_skewed_recovers_usage_chance_not_uniform():
    """i.i.d. tokens from a skewed distribution: the rates equal the usage chance (sum p^2 for the
    top-1; the derived formulas for the sets), well above uniform routing's, and the bootstrap
    interval covers it."""
    rng = np.random.default_rng(1)
    p = np.array([0.4, 0.2, 0.1, 0.1, 0.08, 0.06, 0.04, 0.02])
    seq, pos = layout(200, 100)
    n = len(seq)
    first = rng.choice(E, size=(n, L), p=p)
    second = (first + 1 + rng.integers(0, E - 1, (n, L))) % E  # another expert, uniformly
    experts = np.stack([first, second], -1)  # (N, L, 2)
    t = Lc.consecutive_routing(experts, seq, pos, E, bootstrap=300)
    top1 = rates(t, "top1_same")
    assert top1["chance"].to_numpy() == pytest.approx((p ** 2).sum(), abs=0.005)
    assert top1["rate"].to_numpy() == pytest.approx((p ** 2).sum(), abs=0.01)
    assert ((top1["ci_low"] <= top1["chance"]) & (top1["chance"] <= top1["ci_high"])).all()
    assert (top1["chance"] > 1.5 * top1["chance_uniform"]).all()
    # inclusion probability of e: p_e + (1 - p_e) / 7 (the second expert is another one, uniformly)
    incl = p + (1 - p) / (E - 1)
    overlap = rates(t, "set_overlap")
    assert overlap["chance"].to_numpy() == pytest.approx((incl ** 2).sum() / K, abs=0.005)
    assert overlap["rate"].to_numpy() == pytest.approx((incl ** 2).sum() / K, abs=0.01)
    # sets: P(disjoint) by enumerating the set distribution
    q = np.zeros((E, E))
    for a in range(E):
        for b in range(E):
            if a != b:
                q[min(a, b), max(a, b)] += p[a] / (E - 1)
    pairs = [(a, b, q[a, b]) for a in range(E) for b in range(a + 1, E)]
    disjoint = sum(w1 * w2 for a, b, w1 in pairs for c, d, w2 in pairs if len({a, b, c, d}) == 4)
    shared = rates(t, "set_shared")
    assert shared["chance"].to_numpy() == pytest.approx(1 - disjoint, abs=0.005)
    assert shared["rate"].to_numpy() == pytest.approx(1 - disjoint, abs=0.01)
    assert t["lift"].to_numpy() == pytest.approx(1.0, abs=0.05)


def test_per_sequence_topic_is_separated_from_adjacency():
    """Each sequence draws i.i.d. from its own two experts: the pooled chance is low, but the
    in-sequence chance equals the rate (no adjacency effect beyond the topic)."""
    rng = np.random.default_rng(2)
    seq, pos = layout(100, 200)
    topics = np.argsort(rng.random((100, E)), 1)[:, :2]  # (S, 2) two experts per sequence
    top = topics[seq, rng.integers(0, 2, len(seq))]  # (N,)
    experts = np.stack([top, (top + 1 + rng.integers(0, E - 1, len(seq))) % E], -1)[:, None, :]  # (N, 1, 2)
    r = rates(Lc.consecutive_routing(experts, seq, pos, E, bootstrap=0), "top1_same").iloc[0]
    assert r["rate"] == pytest.approx(0.5, abs=0.02)
    assert r["chance_in_sequence"] == pytest.approx(0.5, abs=0.02)
    assert r["chance"] == pytest.approx(1 / E, abs=0.02)
    assert math.isnan(r["ci_low"])


def test_groups_and_phases():
    seq, pos = layout(4, 10)
    generated = pos >= 5
    groups = np.where(seq < 2, "code", "math")
    # code: always repeats; math: never repeats (alternating disjoint sets)
    experts = np.where((seq < 2)[:, None], np.array([[0, 1]]), np.where((pos % 2)[:, None] == 0, [[2, 3]], [[4, 5]]))
    experts = np.repeat(experts[:, None, :], 2, 1)  # (N, 2, 2)
    t = Lc.consecutive_routing(experts, seq, pos, E, generated=generated, groups=groups, bootstrap=50)
    assert set(t["group"]) == {"all", "code", "math"}
    assert (rates(t, "top1_same", group="code")["rate"] == 1).all()
    assert (rates(t, "top1_same", group="math")["rate"] == 0).all()
    assert (rates(t, "top1_same")["rate"] == 0.5).all()
    # phases: prompt pairs 4 per sequence, generated 4, "all" adds the one across the boundary
    assert rates(t, "top1_same", "prompt", "code")["pairs"].iloc[0] == 8
    assert rates(t, "top1_same", "generated", "code")["pairs"].iloc[0] == 8
    assert rates(t, "top1_same", "all", "code")["pairs"].iloc[0] == 18
    view = Lc.paper_view(t)
    assert list(view.columns.get_level_values(0).unique()) == ["first choice", "first or second choice"]
    assert view.loc[("code", 1), ("first choice", "rate")] == 1


def test_bootstrap_interval_resamples_sequences():
    # two sequences, one all hits, one all misses, very unequal lengths: the sequence-level interval
    # spans nearly [0, 1]; a pair-level one would be tight around the mean
    hits = np.r_[np.ones(10), np.zeros(1000)][:, None]
    seq = np.r_[np.zeros(10, int), np.ones(1000, int)]
    low, high = Lc.bootstrap_interval(hits, seq, 2000, seed=0)
    assert low[0] == 0 and high[0] > 0.4
    a = Lc.bootstrap_interval(hits, seq, 100, seed=3)
    b = Lc.bootstrap_interval(hits, seq, 100, seed=3)
    np.testing.assert_array_equal(a, b)


def test_clear_errors():
    seq, pos = layout(2, 5)
    experts = np.zeros((10, 1, 2), int)
    with pytest.raises(LocalityError, match="tokens, layers, k"):
        Lc.consecutive_routing(experts[:, 0], seq, pos, E)
    with pytest.raises(LocalityError, match=r"\[0, 8\)"):
        Lc.consecutive_routing(experts + 8, seq, pos, E)
    with pytest.raises(LocalityError, match="unknown phase"):
        Lc.consecutive_routing(experts, seq, pos, E, phases=("decode",))
    with pytest.raises(LocalityError, match="two groups"):
        Lc.consecutive_routing(experts, seq, pos, E, groups=np.arange(10) % 2)
    with pytest.raises(LocalityError, match="one entry per token"):
        Lc.consecutive_routing(experts, seq[:5], pos, E)
