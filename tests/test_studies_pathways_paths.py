"""Notebook 01's "Paths, not pathways" (routelib.studies.pathways.pathway_paths) on constructed routing samples
whose structure is planted: the sample's frame, the verdicts per router and depth, the depth sweep."""

import numpy as np
import pytest

from routelib.errors import ConfigError
from routelib.routing.analyse.expert_paths import path_ids
from routelib.studies.pathways.pathway_paths import (depth_sweep, path_verdicts, pathway_path_verdicts, role_table,
                                                     sample_frame, verdict_lines)

#: token id -> text: "." plays several roles (routelib.routing.analyse.roles), the rest are letters or a space.
TEXT = {0: ".", 1: " ", **{i: chr(ord("a") + i) for i in range(2, 16)}}


class Decoder:
    """The one method of a tokenizer that the roles read."""

    def decode(self, ids):
        return "".join(TEXT[int(i)] for i in ids)


def planted_sample(seed: int = 0, windows: int = 40, length: int = 50) -> dict[str, np.ndarray]:
    """A sample as ``samples/<run>.npz`` holds it: windows alternate code and fiction; the trained router's
    first choices at layers 0 and 1 together name the token (token // 4, token % 4: each layer alone half of
    it), and for "." they name its role instead (layer 0 the register, layer 1 whether a space follows);
    layer 2 alone names the token up to a pair (token // 2: better than layer 0 or 1, worse than the two
    together); the untrained router is noise."""
    rng = np.random.default_rng(seed)
    n = windows * length
    tokens = rng.choice(16, n, p=[0.15, 0.3] + [0.55 / 14] * 14)  # "." often before a space, a letter or "."
    domains = np.repeat(np.where(np.arange(windows) % 2 == 0, "code", "fiction"), length)
    seq_ids = np.repeat(np.arange(windows), length)
    trained = rng.integers(0, 16, (n, 3, 4)).astype(np.uint8)
    trained[:, 0, 0], trained[:, 1, 0] = tokens // 4, tokens % 4
    last = np.r_[seq_ids[1:] != seq_ids[:-1], True]  # a window's last position: no next token
    dot = (tokens == 0) & ~last
    space_next = np.r_[tokens[1:] == 1, False]
    trained[dot, 0, 0] = 8 + (domains[dot] == "code")
    trained[dot, 1, 0] = 8 + space_next[dot]
    trained[:, 2, 0] = tokens // 2
    untrained = rng.integers(0, 16, (n, 3, 4)).astype(np.uint8)
    return dict(tokens=tokens.astype(np.int32), domains=domains, seq_ids=seq_ids.astype(np.int32),
                layers=np.array([2, 4, 6], dtype=np.int32), trained=trained, untrained=untrained)


@pytest.fixture(scope="module")
def planted():
    return sample_frame(planted_sample())


def test_sample_frame_reads_an_npz(tmp_path):
    arrays = planted_sample()
    np.savez_compressed(tmp_path / "run.npz", **arrays)
    frame, trained, untrained = sample_frame(tmp_path / "run.npz")
    assert list(frame.columns[:3]) == ["problem_id", "token_id", "dataset"]
    assert frame.loc[0, "problem_id"] == "code/0" and frame.loc[len(frame) - 1, "problem_id"] == "fiction/39"
    assert (frame["dataset"] == "text").all() and frame["token_id"].tolist() == arrays["tokens"].tolist()
    assert trained.dtype == np.int64 and np.array_equal(trained, arrays["trained"])
    assert np.array_equal(untrained, arrays["untrained"])
    # the register is read from the window's domain: "." in code and in prose plays twice the roles it
    # plays when every window is read as code
    roles = role_table(frame, trained, Decoder(), min_count=10, permutations=2)
    code_only = role_table(frame.assign(dataset="code"), trained, Decoder(), min_count=10, permutations=2)
    assert roles["token"].tolist() == ["'.'"] and roles.loc[0, "roles"] == 2 * code_only.loc[0, "roles"] >= 4


@pytest.mark.parametrize("mutate, message", [
    pytest.param(lambda a: a.pop("untrained"), "lacks", id="missing-key"),
    pytest.param(lambda a: a.update(trained=a["trained"][:, :2]), "shape", id="layers"),
    pytest.param(lambda a: a.update(trained=a["trained"][:-1]), "shape", id="positions"),
    pytest.param(lambda a: a["seq_ids"].__setitem__(slice(100, 125), 0), "runs of positions", id="split-window"),
])
def test_sample_frame_rejects_bad_samples(mutate, message):
    arrays = planted_sample()
    mutate(arrays)
    with pytest.raises(ConfigError, match=message):
        sample_frame(arrays)


def test_verdicts_find_the_planted_paths(planted):
    """Paths over the block of layers 0-1 name the token and the role of "."; each layer alone carries half:
    the path beats the better layer of its block (by more than it beats layer 2, the best layer overall)
    for the trained router and not for the untrained one, the layers-independent control explains
    nothing, and the intervals bracket the estimates."""
    frame, trained, untrained = planted
    table = pathway_path_verdicts(frame, {"trained": trained, "untrained": untrained}, Decoder(), depths=(None, 2),
                                  draws=5, permutations=3, min_count=50)
    assert set(table["router"]) == {"trained", "untrained"}
    assert set(table["path"]) == {"all 3 layers", "blocks of 2 layers"} and set(table["depth"]) == {3, 2}
    row = table.set_index(["router", "depth", "measure"])["estimate"]
    diff = "token identity: path minus best single expert"
    value = table.set_index(["router", "depth", "measure"])["value"]
    # a router blind to the token: no plug-in excess (its bootstrap bias is the resampling's, see the module)
    assert row["trained", 2, diff] > 0.3 and abs(value["untrained", 2, diff]) < 0.05
    assert abs(row["trained", 2, "token identity: path, layers independent"]) < 0.05
    assert row["trained", 2, "token identity: path"] > row["trained", 2, "token identity: single expert (best layer)"] + 0.2
    roles = table[(table["verdict"] == "c") & table["measure"].str.contains("best")].set_index(["router", "depth"])
    assert roles.loc[("trained", 2), "low"] > 0.2 and roles.loc[("untrained", 2), "estimate"] < 0.1
    b = table[table["verdict"] == "b"]
    assert (b["low"] <= b["estimate"] + 1e-12).all() and (b["estimate"] <= b["high"] + 1e-12).all()
    lines = verdict_lines(table[(table["router"] == "trained") & (table["depth"] == 2)])
    assert [line[:3] for line in lines] == ["(a)", "(b)", "(c)"]


def test_depth_sweep_counts_paths_and_sees_saturation():
    """Excess over the size-matched null rises from one layer to the planted pair; a path unique to every
    position names the token perfectly and still has no excess: the null absorbs it."""
    frame, trained, _ = sample_frame(planted_sample())
    sweep = depth_sweep(frame, {"trained": trained}, permutations=3).set_index("depth")
    assert sweep.loc[2, "excess_mean"] > sweep.loc[1, "excess_mean"] + 0.2
    assert sweep.loc[2, "paths"] == len(np.unique(trained[:, :2, 0], axis=0)) and sweep.loc[2, "blocks"] == 1
    unique = np.zeros((len(frame), 2, 1), dtype=np.int64)
    unique[:, 0, 0], unique[:, 1, 0] = np.divmod(np.arange(len(frame)), 64)  # one path per position
    saturated = depth_sweep(frame, {"unique": unique}, depths=[2], permutations=3).iloc[0]
    assert saturated["paths_share"] == 1.0 and abs(saturated["excess_mean"]) < 1e-9


def test_path_ids_fast_code_equals_a_row_wise_unique():
    def reference(experts, layers, top1=True):
        chosen = experts[:, layers, :1] if top1 else np.sort(experts[:, layers], axis=2)
        return np.unique(chosen.reshape(len(experts), -1), axis=0, return_inverse=True)[1].ravel()

    rng = np.random.default_rng(1)
    experts = rng.integers(0, 16, (500, 5, 2))
    for layers in ([0], [1, 2], [4, 0, 3], list(range(5))):
        assert np.array_equal(path_ids(experts, layers), reference(experts, layers))
        assert np.array_equal(path_ids(experts, layers, top1=False), reference(experts, layers, top1=False))
    wide = rng.integers(0, 4, (300, 40, 1))  # 4 ** 40 overflows the mixed-radix code: the row-wise unique
    assert np.array_equal(path_ids(wide), reference(wide, list(range(40))))
    with pytest.raises(ConfigError, match="depth"):
        path_verdicts(*sample_frame(planted_sample())[:2], Decoder(), draws=1, depth=4)


def test_random_router_is_the_studys_random_top_k_control():
    from routelib.studies.pathways import RoutingSample, control_selections
    from routelib.studies.pathways.pathway_paths import random_router

    arrays = planted_sample()
    layers = [int(layer) for layer in arrays["layers"]]
    samples = [RoutingSample(arrays["tokens"].astype(np.int64), arrays["domains"], arrays["seq_ids"].astype(np.int64),
                             {layer: arrays[router][:, j].astype(np.int64) for j, layer in enumerate(layers)})
               for router in ("trained", "untrained")]
    control = control_selections(*samples, num_pathways=16, seed=3)["random top-k"]
    mine = random_router(len(arrays["tokens"]), len(layers), 16, 4, seed=3)
    assert mine.shape == (len(arrays["tokens"]), 3, 4)
    assert np.array_equal(mine, np.stack([control[layer] for layer in layers], axis=1))
