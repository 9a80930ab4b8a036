"""routelib.routing.analyse.predictability: predictability, hop curves, paths, usage tests -- on synthetic routing
whose answer is known, and on the shipped traces' layout."""

import math

import numpy as np
import pytest

from routelib.routing.analyse import predictability as A

E = 8


def routing(first: np.ndarray, k: int = 2) -> np.ndarray:
    """(N, L) top-1 ids -> (N, L, k) experts: slot j = (top-1 + j) mod E (distinct slots)."""
    return np.stack([(first + j) % E for j in range(k)], -1).astype(np.int16)


def chain(n: int, layers: int, seed: int = 0) -> np.ndarray:
    """Deterministic transitions: layer l+1's expert is a fixed permutation of layer l's."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(E)
    first = np.empty((n, layers), np.int64)
    first[:, 0] = rng.integers(0, E, n)
    for l in range(1, layers):
        first[:, l] = perm[first[:, l - 1]]
    return routing(first)


def independent(n: int, layers: int, seed: int = 0) -> np.ndarray:
    return routing(np.random.default_rng(seed).integers(0, E, (n, layers)))


def test_deterministic_transitions_are_fully_predictable():
    ex = chain(5000, 4)
    U = A.predictability_matrix(ex, E)
    assert np.allclose(U.to_numpy(), 1.0)
    acc = A.predictability_matrix(ex, E, "lookup_accuracy")
    assert np.allclose(acc.to_numpy(), 1.0)
    hops = A.hop_curve(ex, E)
    assert list(hops["hop"]) == [1, 2, 3] and list(hops["pairs"]) == [3, 2, 1]
    assert np.allclose(hops["uncertainty"], 1.0) and np.allclose(hops["lookup_accuracy"], 1.0)
    assert (hops["prior_accuracy"] < 0.2).all()  # uniform layers: prior near 1/8


def test_independent_layers_sit_at_the_chance_floor():
    n = 40_000
    ex = independent(n, 3)
    U = A.predictability_matrix(ex, E).to_numpy()
    off = U[~np.eye(3, dtype=bool)]
    floor = A.chance_uncertainty(n, E)
    assert 0 <= off.max() < 5 * floor  # Miller's bias, not information
    acc = A.predictability_matrix(ex, E, "lookup_accuracy").to_numpy()[~np.eye(3, dtype=bool)]
    assert abs(acc.mean() - 1 / E) < 0.01


def test_skewed_layer_gives_high_accuracy_but_zero_uncertainty_coefficient():
    rng = np.random.default_rng(1)
    n = 20_000
    src = rng.integers(0, E, n)
    dst = np.where(rng.random(n) < 0.7, 3, rng.integers(0, E, n))  # 70 % expert 3, independent of src
    joint = A.joint_counts(src, dst, E)
    assert joint.sum() == n and joint.shape == (E, E)
    assert A.prior_accuracy(joint) == pytest.approx(0.7 + 0.3 / E, abs=0.01)
    assert A.lookup_accuracy(joint) == pytest.approx(A.prior_accuracy(joint), abs=0.01)
    assert A.uncertainty_coefficient(joint) < 0.002


def test_uncertainty_coefficient_hand_computed():
    # X uniform on {0,1}; Y = X with prob 0.9: I = 1 - H(0.9) bits, H(Y) = 1 bit
    joint = np.zeros((E, E))
    joint[0, 0], joint[0, 1], joint[1, 1], joint[1, 0] = 45, 5, 45, 5
    h = -(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1))
    assert A.uncertainty_coefficient(joint) == pytest.approx(1 - h)
    assert A.lookup_accuracy(joint) == pytest.approx(0.9)
    const = np.zeros((E, E))
    const[:, 2] = 10
    assert math.isnan(A.uncertainty_coefficient(const))  # the destination never varies


def test_paths_and_prefixes():
    first = np.array([[0, 1, 2]] * 5 + [[0, 1, 3]] * 3 + [[4, 4, 4]] * 2)
    ex = routing(first)
    top = A.path_counts(ex, top=2)
    assert list(top["path"]) == ["0-1-2", "0-1-3"] and list(top["count"]) == [5, 3]
    assert top["cumulative"].iloc[-1] == pytest.approx(0.8)
    assert top.attrs["distinct"] == 3 and top.attrs["tokens"] == 10
    assert list(A.path_counts(ex, depth=2, top=5)["count"]) == [8, 2]
    conc = A.prefix_concentration(ex, E, top=(1,))
    assert list(conc["distinct"]) == [2, 2, 3] and list(conc["possible"]) == [8, 64, 512]
    assert conc["top1_share"].tolist() == pytest.approx([0.8, 0.8, 0.5])
    texts = ["a"] * 4 + ["b"] + ["c"] * 3 + ["d"] * 2
    tok = A.path_tokens(ex, texts, ["0-1-2", "4-4-4"], top=1)
    assert tok["distinct_tokens"].tolist() == [2, 1] and tok["top_tokens"].tolist() == ["'a'×4", "'d'×2"]


def test_expert_usage_counts_every_slot():
    ex = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 1]]], np.int16)  # (N=2, L=2, k=2)
    u = A.expert_usage(ex, 4)
    assert u.shape == (2, 4) and np.allclose(u.sum(1), 1)
    assert u[0].tolist() == [0.5, 0.25, 0.25, 0] and u[1].tolist() == [0, 0.25, 0.5, 0.25]


def _two_datasets(shift: float, problems: int = 40, tokens: int = 50, seed: int = 0):
    """Problems of datasets a/b; b moves ``shift`` of its mass to expert 0; problem-level noise."""
    rng = np.random.default_rng(seed)
    firsts, keys, labels = [], [], []
    for p in range(problems):
        label = "a" if p % 2 else "b"
        probs = rng.dirichlet(np.full(E, 1.0))  # each problem has its own routing mix
        if label == "b":
            probs = (1 - shift) * probs + shift * np.eye(E)[0]
        firsts.append(rng.choice(E, size=(tokens, 2), p=probs))
        keys += [f"{label}/{p}"] * tokens
        labels += [label] * tokens
    return routing(np.concatenate(firsts)), np.array(keys), np.array(labels)


def test_permutation_test_finds_a_real_difference_and_not_a_spurious_one():
    ex, keys, labels = _two_datasets(shift=0.3)
    real = A.usage_difference_test(ex, keys, labels, E, permutations=200)
    assert (real["p_perm"] < 0.01).all() and (real["p_perm_fwer"] < 0.05).all()
    assert real.attrs["datasets"] == ["b", "a"] and real.attrs["problems"] == 40
    ex, keys, labels = _two_datasets(shift=0.0)
    null = A.usage_difference_test(ex, keys, labels, E, permutations=200)
    assert (null["p_perm"] > 0.01).all()
    # Tokens within a problem are dependent: chi-square "finds" a difference that is not there.
    assert (null["p_chi2"] < 0.01).any()


def test_chi_square_hand_computed():
    stat, dof, p = A.chi_square(np.array([[10, 20], [20, 10]]))
    assert stat == pytest.approx(20 / 3) and dof == 1
    assert p == pytest.approx(math.erfc(math.sqrt(stat / 2)))  # chi2(1) survival = erfc(sqrt(x/2))
    with pytest.raises(A.AnalysisError, match="all-zero"):
        A.chi_square(np.array([[0, 2], [0, 3]]))


def test_sample_tokens():
    assert A.sample_tokens(10, None).tolist() == list(range(10))
    assert A.sample_tokens(10, 50).tolist() == list(range(10))
    s = A.sample_tokens(1000, 100, seed=3)
    assert len(s) == 100 and len(set(s)) == 100 and (np.diff(s) > 0).all()
    assert s.tolist() == A.sample_tokens(1000, 100, seed=3).tolist()


def test_bad_inputs_are_named():
    ex = chain(10, 3)
    with pytest.raises(A.AnalysisError, match="tokens, layers, k"):
        A.top1(ex[:, :, 0])
    with pytest.raises(A.AnalysisError, match=r"\[0, 4\)"):
        A.predictability_matrix(ex, 4)
    with pytest.raises(A.AnalysisError, match="unknown measure"):
        A.predictability_matrix(ex, E, "accuracy")
    with pytest.raises(A.AnalysisError, match="depth"):
        A.path_counts(ex, depth=4)
    with pytest.raises(A.AnalysisError, match="two MoE layers"):
        A.hop_curve(ex[:, :1], E)
    with pytest.raises(A.AnalysisError, match="exactly two datasets"):
        A.usage_difference_test(ex, np.arange(10), np.array(["a"] * 10), E)
    with pytest.raises(A.AnalysisError, match="both datasets"):
        A.usage_difference_test(ex, np.zeros(10), np.array(["a", "b"] * 5), E)
    with pytest.raises(A.AnalysisError, match="sample_size"):
        A.sample_tokens(10, 0)
