"""routelib.routing.analyse.control on constructed data: a label planted in the router's row space is
decoded from the control part and not from the content part (and the other way round); probes on noise
stay at chance; k-means finds planted clusters; principal angles; bad inputs are refused."""

import numpy as np
import pytest

from routelib.errors import ConfigError
from routelib.routing.analyse import control as C
from routelib.routing.analyse.expert_paths import normalized_mi

H, E, SEQS, LEN = 32, 4, 60, 40
N = SEQS * LEN


def planted(seed: int = 0):
    """Router inputs with a 3-valued label ``a`` written only inside the router's row space and a
    3-valued label ``b`` written only outside it, on unit noise; sequences of LEN tokens."""
    rng = np.random.default_rng(seed)
    router = rng.standard_normal((E, H))
    control, content = C.subspace_bases(router)
    a, b = rng.integers(0, 3, N), rng.integers(0, 3, N)
    hidden = rng.standard_normal((N, H)) + 3 * control[a] + 3 * content[b]
    return hidden, router, {"a": a, "b": b}, np.repeat(np.arange(SEQS), LEN)


def accuracy(table, label, part):
    return table.set_index(["label", "part"]).loc[(label, part), "accuracy"]


def test_bases_are_orthonormal_complements_and_centring_drops_one_dimension():
    router = np.random.default_rng(1).standard_normal((E, H))
    control, content = C.subspace_bases(router)
    both = np.vstack([control, content])
    np.testing.assert_allclose(both @ both.T, np.eye(H), atol=1e-10)
    np.testing.assert_allclose(content @ router.T, 0, atol=1e-10)  # the router reads nothing of the content
    centred, _ = C.subspace_bases(router, centre=True)
    assert len(control) == E and len(centred) == E - 1
    logits = lambda h: h @ router.T  # noqa: E731
    h = np.random.default_rng(2).standard_normal((5, H))
    shifted = h + 10 * (router.mean(0) - centred.T @ centred @ router.mean(0))  # moved outside the centred space
    assert (logits(shifted).argmax(1) == logits(h).argmax(1)).all()  # ... changes no choice


def test_a_label_in_the_row_space_is_decoded_from_control_only_and_vice_versa():
    hidden, router, labels, seqs = planted()
    train = C.sequence_split(seqs, 0.25, seed=0)
    table = C.probe_parts(hidden, router, labels, train)
    assert set(table["part"]) == set(C.PARTS) and (table["dims"].to_numpy() > 0).all()
    chance = table.groupby("label")["chance"].first()
    assert accuracy(table, "a", "control") > 0.9 and accuracy(table, "b", "content") > 0.9
    assert accuracy(table, "b", "content_matched") > 0.9  # b is the content's largest variance: its top PCs hold it
    for label, part in (("a", "content"), ("a", "content_matched"), ("b", "control")):
        assert accuracy(table, label, part) < chance[label] + 0.06, (label, part)


def test_a_probe_on_noise_stays_at_chance():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((3000, 20)), rng.integers(0, 4, 3000)
    score = C.probe_accuracy(x[:2000], y[:2000], x[2000:], y[2000:])
    assert score["classes"] == 4 and 0.2 < score["chance"] < 0.3
    assert abs(score["accuracy"] - score["chance"]) < 0.05


def test_unlabelled_rows_are_left_out_and_frequent_tokens_come_from_train_only():
    tokens = np.array([5, 5, 5, 7, 7, 9, 9, 9, 9, 1])
    train = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 1], bool)
    assert C.frequent_tokens(tokens, train, 1).tolist() == [5, 5, 5] + [C.UNLABELLED] * 7
    assert C.position_buckets([0, 15, 16, 63, 64, 300], (16, 64)).tolist() == [0, 0, 1, 1, 2, 2]


def test_sequence_split_keeps_sequences_whole_per_stratum():
    seqs = np.repeat(np.arange(20), 5)
    domain = np.repeat(np.arange(20) % 2, 5)
    train = C.sequence_split(seqs, 0.25, seed=4, strata=domain)
    for s in range(20):
        assert len(set(train[seqs == s])) == 1  # a sequence is never split
    assert [(~train[domain == d]).sum() // 5 for d in (0, 1)] == [2, 2]  # round(0.25 * 10) per domain
    assert not np.array_equal(train, C.sequence_split(seqs, 0.25, seed=5, strata=domain))


def test_kmeans_recovers_planted_clusters_and_specificity_sees_them():
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 4, 2000)
    x = rng.standard_normal((2000, 6)) + 8 * np.eye(6)[truth]
    labels, centres = C.kmeans(x, 4, seed=0)
    assert centres.shape == (4, 6) and normalized_mi(truth, labels) > 0.99
    table = C.cluster_specificity({"x": x}, {"truth": truth, "noise": rng.integers(0, 4, 2000)}, k=4)
    excess = table.set_index("label")["excess"]
    assert excess["truth"] > 0.95 and abs(excess["noise"]) < 0.01


def test_layer_angles_are_zero_for_equal_routers_and_near_the_null_for_random_ones():
    rng = np.random.default_rng(6)
    r = rng.standard_normal((E, 128))
    same = C.layer_angles(np.stack([r, 2 * r[::-1]]))
    assert same["mean_angle"].iloc[0] == pytest.approx(0, abs=1e-4) and same["null_mean"].iloc[0] > 60
    rand = C.layer_angles(rng.standard_normal((3, E, 128)), centre=True)
    assert len(rand) == 2 and (rand["rank"] == E - 1).all()
    assert (abs(rand["mean_angle"] - rand["null_mean"]) < 8).all()


@pytest.mark.parametrize("call, match", [
    (lambda: C.split_coordinates(np.zeros((3, 4)), np.ones((2, 5))), "share H"),
    (lambda: C.subspace_bases(np.ones((3, 4)), centre=True), "no control subspace"),
    (lambda: C.sequence_split(np.arange(4), held_out=1.5), "held_out"),
    (lambda: C.sequence_split(np.zeros(4)), "two or more sequences per stratum"),
    (lambda: C.probe_accuracy(np.zeros((4, 2)), [1, 1, 1, 1], np.zeros((2, 2)), [1, 0]), "two or more classes"),
    (lambda: C.probe_accuracy(np.zeros((4, 2)), [0, 1, 0, 1], np.zeros((2, 3)), [1, 0]), "must match"),
    (lambda: C.probe_accuracy(np.full((2, 2), np.nan), [0, 1], np.zeros((1, 2)), [1]), "non-finite"),
    (lambda: C.kmeans(np.zeros((3, 2)), 5), "k must be"),
    (lambda: C.position_buckets([1, 2], (64, 16)), "increasing"),
    (lambda: C.frequent_tokens([1, 2], [True], 3), "one flag per token"),
    (lambda: C.layer_angles(np.zeros((1, 2, 3))), "layers >= 2"),
    (lambda: C.ProbeConfig(steps=0), "steps"),
])
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
