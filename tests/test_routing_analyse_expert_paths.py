"""routelib.routing.analyse.expert_paths on constructed routing: a planted path structure is found;
paths over independent layers add nothing beyond the size-matched control; the control/content split is
exact and the router reads only the control part; principal angles."""

import numpy as np
import pytest

from routelib.errors import ConfigError
from routelib.routing.analyse import expert_paths as P

N, E = 4000, 4


def planted(seed: int = 0):
    """A label of 16 values fixes the pair (expert at layer 0, expert at layer 1) = (y // 4, y % 4);
    layer 2 is random."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 16, N)
    experts = np.stack([y // 4, y % 4, rng.integers(0, E, N)], axis=1)[:, :, None]  # (N, 3, 1)
    return y, experts


def test_a_planted_path_is_found_and_single_experts_see_half_of_it():
    y, experts = planted()
    path = P.specificity(y, P.path_ids(experts, [0, 1]))
    single = P.specificity(y, experts[:, 0, 0])
    assert path["nmi"] == pytest.approx(1.0) and single["nmi"] == pytest.approx(0.5, abs=0.01)
    assert path["excess"] > single["excess"] + 0.4 and path["nmi"] > path["null_p95"]


def test_paths_over_independent_layers_add_nothing_beyond_the_size_matched_control():
    y, experts = planted()
    shuffled = P.independent_layers(experts, seed=1)  # each layer keeps its usage, the layers decouple
    label = shuffled[:, 0, 0]  # a label that only layer 0 carries
    path = P.specificity(label, P.path_ids(shuffled, [0, 1, 2]))
    single = P.specificity(label, shuffled[:, 0, 0])
    assert path["nmi"] >= single["nmi"] - 1e-9  # naive: more groups never look worse ...
    assert path["excess"] <= single["excess"] + 0.02  # ... but beyond the size-matched null, no gain
    noise = P.specificity(np.random.default_rng(2).integers(0, 16, N), P.path_ids(shuffled))
    assert noise["nmi"] <= noise["null_p95"] + 0.01 and abs(noise["excess"]) < 0.02


def test_independent_layers_keep_every_layers_usage():
    _, experts = planted()
    shuffled = P.independent_layers(experts)
    for layer in range(experts.shape[1]):
        assert np.bincount(shuffled[:, layer, 0], minlength=E).tolist() == np.bincount(experts[:, layer, 0], minlength=E).tolist()


def test_top_k_sets_ignore_the_order_of_choices():
    experts = np.array([[[0, 1], [2, 3]], [[1, 0], [3, 2]], [[0, 2], [2, 3]]])
    assert P.path_ids(experts, top1=False).tolist()[:2] == [P.path_ids(experts, top1=False)[0]] * 2
    assert len(set(P.path_ids(experts, top1=True).tolist())) == 2


def test_control_and_content_reconstruct_the_state_and_the_router_reads_only_control():
    rng = np.random.default_rng(0)
    hidden, router = rng.standard_normal((50, 32)), rng.standard_normal((8, 32))
    control, content = P.control_content(hidden, router)
    np.testing.assert_allclose(control + content, hidden, atol=1e-12)
    np.testing.assert_allclose(content @ router.T, 0, atol=1e-10)
    np.testing.assert_allclose(control @ router.T, hidden @ router.T, atol=1e-10)
    assert np.linalg.matrix_rank(control) == 8


def test_principal_angles():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 64))
    assert P.principal_angles(a, 3 * a[::-1]) == pytest.approx(np.zeros(4), abs=1e-6)  # the same row space
    eye = np.eye(8)
    assert P.principal_angles(eye[:2], eye[2:4]) == pytest.approx([np.pi / 2] * 2)
    null = P.random_subspace_angles(4, 4, 512, draws=5)
    assert null.shape == (5, 4) and null.mean() > 1.2  # random subspaces of a large space: nearly orthogonal


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="layers"):
        P.path_ids(np.zeros((3, 2, 1), int), [5])
    with pytest.raises(ConfigError, match="share H"):
        P.control_content(np.zeros((3, 4)), np.zeros((2, 5)))


def test_the_within_label_control_keeps_each_layers_label_statistics_and_breaks_the_joint():
    rng = np.random.default_rng(4)
    token = rng.integers(0, 5, N)
    joint = rng.integers(0, E, N)  # layers 0 and 1 agree with each other, whatever the token
    experts = np.stack([(token + joint) % E, (token + joint) % E], axis=1)[:, :, None]
    shuffled = P.independent_layers(experts, seed=1, within=token)
    for t in range(5):  # each layer's expert counts per token are unchanged
        for layer in range(2):
            assert sorted(shuffled[token == t, layer, 0]) == sorted(experts[token == t, layer, 0])
    agree = (shuffled[:, 0, 0] == shuffled[:, 1, 0]).mean()
    assert (experts[:, 0, 0] == experts[:, 1, 0]).all() and agree < 0.4  # the joint structure is gone
