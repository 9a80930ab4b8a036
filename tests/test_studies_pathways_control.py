"""Notebook 01's "Control and content" (routelib.studies.pathways.control_content): the router hooks on a tiny
routed Llama (what each PathwayRouter read and chose, the pass stopped after the last routed layer), the
measurement and verdicts on router inputs whose control and content are planted, the variance shares, and
the whole pipeline on the real corpus windows with a tiny model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from routelib.errors import ConfigError
from routelib.models.pathways import RoutedLLM, RoutingConfig, decoder_layers
from routelib.routing.analyse import control as C
from routelib.studies import pathways as ps
from routelib.studies.pathways import control_content as cc

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------- hooks
def tiny_routed(routed_layers=(0, 2)) -> RoutedLLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return RoutedLLM(LlamaForCausalLM(cfg).eval(), RoutingConfig(num_pathways=4, top_k_pathways=2,
                                                                  routed_layers=tuple(routed_layers)))


def windows(seed: int, n: int, t: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 96, (n, t + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]  # (n, t) each


def test_capture_records_each_routers_input_and_choice_and_stops_after_the_last():
    routed = tiny_routed()
    data = {"code": [windows(0, 3), windows(1, 2)], "fiction": [windows(2, 3)]}
    # the reference: a full forward per batch, the MLPs' inputs read by pre-hooks, the choices from out.routing
    mlp_in, chosen = {0: [], 2: []}, {0: [], 2: []}
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: mlp_in[i].append(args[0].reshape(-1, 32)))
               for i, m in routed.pathway_mlps().items()]
    with torch.no_grad():
        for batches in data.values():
            for x, _ in batches:
                for r in routed(input_ids=x).routing:
                    chosen[r.layer].append(r.indices.reshape(-1, 2))
    for h in handles:
        h.remove()
    calls = []  # layers after the last routed one, and the LM head, must not run
    late = [decoder_layers(routed.model)[3].register_forward_hook(lambda *a: calls.append("layer 3")),
            routed.model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))]
    routed.train()
    inputs = cc.capture(routed, data)
    for h in late:
        h.remove()
    assert calls == [] and routed.training  # stopped early; the mode it came in
    assert all(not r._forward_hooks for r in routed.routers().values())  # hooks removed
    assert inputs.layers == [0, 2] and inputs.hidden.shape == (96, 2, 32) and inputs.experts.shape == (96, 2, 2)
    for j, layer in enumerate(inputs.layers):
        np.testing.assert_allclose(inputs.hidden[:, j], torch.cat(mlp_in[layer]).numpy(), rtol=1e-5, atol=1e-6)
        assert np.array_equal(inputs.experts[:, j], torch.cat(chosen[layer]).numpy())
        assert np.array_equal(inputs.routers[j], routed.routers()[layer].proj.weight.double().detach().numpy())
    assert inputs.agreement == 1.0 and inputs.seq_len == 12
    x_all = torch.cat([x for b in data.values() for x, _ in b]).reshape(-1).numpy()
    y_all = torch.cat([y for b in data.values() for _, y in b]).reshape(-1).numpy()
    assert np.array_equal(inputs.token_id, x_all) and np.array_equal(inputs.next_id, y_all)
    assert inputs.domain.tolist() == ["code"] * 60 + ["fiction"] * 36
    assert np.array_equal(inputs.window, np.repeat(np.arange(8), 12))
    assert np.array_equal(inputs.position, np.tile(np.arange(12), 8))


def test_capture_needs_two_routed_layers_and_one_window_length():
    with pytest.raises(ConfigError, match="two or more"):
        cc.capture(tiny_routed((1,)), {"code": [windows(0, 2)]})
    with pytest.raises(ConfigError, match="one length"):
        cc.capture(tiny_routed(), {"code": [windows(0, 2)], "news": [windows(1, 2, t=8)]})


# ---------------------------------------------------------------------------- planted measurement
E, H, L, TOKENS = 4, 32, 3, 10


def planted(token_in_control: bool, seed: int = 0, n_windows: int = 40, length: int = 50) -> dict:
    """Router inputs of L layers; layer l's router W_l = the identity on coordinates 4l..4l+3 (rows e_i), so
    its control is that block. Default: the control carries a random vector c that each next layer's block
    receives rolled by one (the next routed layer's choice is a function of this layer's control, not of the
    token), and coordinates 16.. carry the token's embedding at high variance (the content) -- claim (d)
    planted. ``token_in_control``: the blocks carry the token's embedding instead (so the next layer's choice
    is the token's too) and the content only noise: the surface half fails."""
    rng = np.random.default_rng(seed)
    n = n_windows * length
    token = rng.integers(0, TOKENS, n)
    routers = np.zeros((L, E, H))
    for layer in range(L):
        routers[layer, :, 4 * layer:4 * layer + 4] = np.eye(E)
    hidden = rng.normal(scale=0.1, size=(n, L, H))
    c = 3 * rng.normal(size=(TOKENS, E))[token] if token_in_control else rng.normal(size=(n, E))
    for layer in range(L):
        hidden[:, layer, 4 * layer:4 * layer + 4] += np.roll(c, layer, axis=1)
    if not token_in_control:
        hidden[:, :, 16:] += 3 * rng.normal(size=(TOKENS, H - 16))[token][:, None, :]
    logits = np.einsum("nlh,leh->nle", hidden, routers)
    experts = np.argsort(-logits, axis=2)[..., :2]  # (n, L, 2) top-2, first choice first
    window = np.repeat(np.arange(n_windows), length)
    domain = np.where(window % 2 == 0, "code", "fiction")
    return dict(hidden=hidden.astype(np.float32), routers=routers, experts=experts, token_id=token, domain=domain,
                position=np.tile(np.arange(length), n_windows), window=window,
                role=np.where(token < 5, "prose|next:word", "code|next:space"))


def measure(p: dict, **kw) -> dict:
    from routelib.routing.analyse.control import sequence_split

    train = sequence_split(p["window"], 0.25, 0, strata=p["domain"])
    kw = {"top_tokens": TOKENS, "position_edges": (12, 25, 37), "permutations": 3, "probe_steps": 30, **kw}
    return C.measure_layers(p["hidden"], p["routers"], p["experts"], p["token_id"], p["domain"], p["position"],
                             p["role"], train, **kw)


@pytest.fixture(scope="module")
def holds():
    return measure(planted(False))


def test_planted_claim_holds_under_both_definitions(holds):
    lines = cc.verdicts(holds)
    assert len(lines) == 5 + 1 + 4 + 2
    assert lines[-2].startswith("centred router (E-1): claim (d) holds by the probes")
    assert lines[-1].startswith("router W (paper, E): claim (d) holds by the probes")
    acc = holds["probes"].pivot_table(index=["definition", "label", "layer"], columns="part", values="accuracy")
    assert (acc.xs("expert", level=1)["control"] > 0.9).all()  # the router's own choice: from control
    assert (acc.xs("next_expert", level=1)["control"] > 0.8).all()
    assert (acc.xs("token", level=1)["content_matched"] > acc.xs("token", level=1)["control"] + 0.3).all()
    dims = holds["probes"].groupby("definition")["dims"].agg(["min", "max"])
    assert dims.loc["centred router (E-1)"].tolist() == [E - 1, H - E + 1]
    assert dims.loc["router W (paper, E)"].tolist() == [E, H - E]


def test_the_verdict_changes_when_the_token_sits_in_control():
    lines = cc.verdicts(measure(planted(True), permutations=1))
    for line in lines[-2:]:
        assert "claim (d) holds in part" in line and "ahead at 0/3 (below 0)" in line and "(above 0)" in line


def claim_tables(gaps: dict) -> dict:
    """Tables of :func:`C.measure_layers`' shape in which, per definition, ``gaps[definition] = (token gaps,
    next-expert gaps)`` give each layer's size-matched content minus control accuracy on the token and control
    minus size-matched content on the next layer's expert (one layer fewer); every other label ties at 0.5."""
    rows = []
    for d, (token, following) in gaps.items():
        for layer in range(len(token)):
            for label in cc.PROBE_LABELS:
                if label == "next_expert" and layer >= len(following):
                    continue
                gap = token[layer] if label == "token" else -following[layer] if label == "next_expert" else 0.0
                for part, dims, acc in (("control", 4, 0.5), ("content", 28, 0.9), ("content_matched", 4, 0.5 + gap)):
                    rows.append({"definition": d, "layer": layer, "label": label, "part": part, "dims": dims,
                                 "accuracy": acc, "chance": 0.1})
    angles = pd.DataFrame({"definition": list(gaps), "layers": "0-1", "rank": 4, "min_angle": 10.0, "null_mean": 80.0,
                           "mean_angle": [60.0 + 10 * i for i in range(len(gaps))]})
    clusters = pd.DataFrame([{"definition": d, "layer": 0, "k": 4, "part": part, "label": label, "excess": 0.1}
                             for d, parts in (("both", ("full",)), *((d, ("control", "content")) for d in gaps))
                             for part in parts for label in cc.CLUSTER_LABELS])
    return {"probes": pd.DataFrame(rows), "angles": angles, "clusters": clusters}


def test_verdicts_compare_control_with_the_size_matched_content_only():
    """All content (hundreds of dims) beats control on every label; the verdict must not count that."""
    lines = cc.verdicts(claim_tables({"A": ([-0.1] * 3, [0.1] * 2), "B": ([0.2] * 3, [-0.2] * 2)}))
    assert lines[-2] == ("A: claim (d) holds in part by the probes (mean gap in held-out accuracy over layers, 95 % "
                         "t-interval): token identity, size-matched content minus control, -0.100 [-0.100, -0.100] over "
                         "3 layers, ahead at 0/3 (below 0); the next layer's expert, control minus size-matched content, "
                         "+0.100 [+0.100, +0.100] over 2 layers, ahead at 2/2 (above 0)")
    assert lines[-1].startswith("B: claim (d) holds in part") and "ahead at 3/3 (above 0)" in lines[-1]
    assert "ahead at 0/2 (below 0)" in lines[-1]
    assert lines[5] == ("consecutive layers' control subspaces, mean principal angle: A (rank 4): 60.0 deg (60.0-60.0 "
                        "over pairs), random subspaces 80.0 deg, closer at 1/1 pairs; B (rank 4): 70.0 deg (70.0-70.0 "
                        "over pairs), random subspaces 80.0 deg, closer at 1/1 pairs")


def test_the_interval_over_layers_decides_not_the_count_of_layers():
    """Control behind at most layers, or ahead at most, is not enough: the mean gap's 95 % t-interval over
    layers must lie above 0 for a half to hold, below 0 for its opposite."""
    consistent, lopsided = [0.10, 0.12, 0.08, 0.11], [0.30, 0.02, 0.01, -0.25]  # ahead at 4/4; at 3/4 but mean ~0
    lines = cc.verdicts(claim_tables({
        "holds": (consistent, [0.05, 0.04, 0.06]),
        "token undecided": (lopsided, [0.05, 0.04, 0.06]),
        "expert undecided": (consistent, [-0.30, 0.02, 0.01]),
        "neither": (lopsided, [-0.30, 0.02, 0.01]),
        "against": ([-x for x in consistent], [-0.30, 0.02, 0.01]),
        "one pair": (consistent, [-0.05])}))[-6:]
    verdict = {line.split(":")[0]: line.split("claim (d) ")[1].split(" by the probes")[0] for line in lines}
    assert verdict == {"holds": "holds", "token undecided": "holds in part", "expert undecided": "holds in part",
                       "neither": "is not resolved", "against": "does not hold", "one pair": "holds in part"}
    assert "+0.020 [-0.337, +0.377] over 4 layers, ahead at 3/4 (includes 0)" in lines[1]
    assert "ahead at 2/3 (includes 0)" in lines[2] and "+0.050 [+0.025, +0.075] over 3 layers" in lines[0]
    assert "-0.102 [-0.130, -0.075] over 4 layers, ahead at 0/4 (below 0)" in lines[4]
    assert lines[5].endswith("-0.050 at one layer, ahead at 0/1 (no interval)")
    with pytest.raises(ConfigError, match="half_of_claim"):
        C.half_of_claim([])


def test_angles_and_clusters_see_the_planted_subspaces(holds):
    angles = holds["angles"]
    assert len(angles) == 2 * (L - 1) and (angles["mean_angle"] > 89.9).all()  # disjoint blocks: orthogonal
    assert (angles["rank"].to_numpy() == [E - 1, E - 1, E, E]).all()
    shared = measure(planted(False) | {"routers": np.repeat(planted(False)["routers"][:1], L, axis=0)},
                     permutations=1)["angles"]
    assert (shared["mean_angle"] < 1e-3).all()  # the same router at every layer: the same subspace
    excess = holds["clusters"].pivot_table(index=["label", "definition"], columns="part", values="excess")
    for definition in cc.DEFINITIONS.values():
        assert excess.loc[("token", definition[0]), "content"] > excess.loc[("token", definition[0]), "control"] + 0.2


def test_measure_layers_checks_its_inputs():
    p = planted(False, n_windows=8, length=10)
    with pytest.raises(ConfigError, match="measure_layers"):
        measure(p | {"routers": p["routers"][:1]})
    with pytest.raises(ConfigError, match="definitions"):
        measure(p, definitions=("rotated",))
    with pytest.raises(ConfigError, match=r"layers must name one or more of 0..2, got \[0, 4\]"):
        measure(p, layers=[0, 4])


def test_chosen_layers_are_the_same_rows_as_in_the_full_measurement(holds):
    p = planted(False)
    some = measure(p, layers=[2, 0])
    for name in ("probes", "clusters"):
        assert sorted(set(some[name]["layer"])) == [0, 2]
        full = holds[name][holds[name]["layer"].isin([0, 2])].reset_index(drop=True)
        pd.testing.assert_frame_equal(some[name].reset_index(drop=True), full)
    pd.testing.assert_frame_equal(some["angles"], holds["angles"])  # every consecutive pair, whatever is probed


def test_variance_shares_is_the_variance_in_each_subspace():
    p = planted(False, n_windows=10, length=20)
    inputs = cc.RouterInputs([2, 4, 6], p["hidden"], p["routers"], p["experts"], p["token_id"], p["token_id"],
                             p["domain"], p["window"], p["position"], 20, 1.0)
    shares = cc.variance_shares(inputs).set_index(["layer", "definition"])
    x = p["hidden"][:, 1].astype(np.float64)
    x = x - x.mean(0)
    block = x[:, 4:8]  # layer 4's control under the paper's definition: its block
    row = shares.loc[(4, "router W (paper, E)")]
    assert row["control"] == pytest.approx((block ** 2).sum() / (x ** 2).sum(), rel=1e-6)
    assert row["random"] == pytest.approx(E / H) and row["rank"] == E
    centred = shares.loc[(4, "centred router (E-1)")]
    centred_block = block - block.mean(1, keepdims=True)  # the centred router's row space: the block minus its mean
    assert centred["control"] == pytest.approx((centred_block ** 2).sum() / (x ** 2).sum(), rel=1e-6)
    assert 0.5 < row["content_top_r"] < 1 - row["control"]  # the token embedding dominates the content


# ------------------------------------------------------------------------------- end to end, tiny
class Decoder:
    def decode(self, ids):
        return "".join(".ab "[int(i) % 4] for i in ids)


def test_run_names_decoder_layers_and_splits_by_window():
    p = planted(False, n_windows=16, length=20)
    inputs = cc.RouterInputs([14, 16, 18], p["hidden"], p["routers"], p["experts"], p["token_id"],
                             np.roll(p["token_id"], -1), p["domain"], p["window"], p["position"], 20, 1.0)
    tables, summary = cc.run(inputs, cc.ControlContentConfig(top_tokens=TOKENS, permutations=1), Decoder())
    for name in ("probes", "clusters"):
        assert sorted(set(tables[name]["layer"])) == [14, 16, 18]
    assert tables["angles"]["layers"].tolist() == ["14-16", "16-18"] * 2
    assert summary.startswith("320 tokens (code 160, fiction 160) in windows of 20, 240 train / 80 held out by window")
    assert "routed layers 14, 16, 18" in summary and "on 100.0% of (token, layer)" in summary
    assert set(tables["probes"]["n_train"] + tables["probes"]["n_test"]) <= {320}
    rand = tables["random_control"]  # a random router's control beside the planted one
    assert sorted(set(rand["layer"])) == [14, 16, 18] and set(rand["part"]) == {"random control"}
    dims = rand.groupby("definition")["dims"].first().to_dict()
    assert dims == {"centred router (E-1)": E - 1, "router W (paper, E)": E}
    trained = tables["probes"].query("part == 'control'").groupby(["definition", "label"])["accuracy"].mean()
    random = rand.groupby(["definition", "label"])["accuracy"].mean()
    assert (trained.xs("expert", level=1) > random.xs("expert", level=1) + 0.3).all()
    assert (trained.xs("next_expert", level=1) > random.xs("next_expert", level=1) + 0.3).all()
    lines = cc.random_control_lines(tables)
    assert len(lines) == 2 and lines[1].startswith(
        "router W (paper, E): control of a random router of the same shape (4 dims) vs the trained router's, mean "
        "held-out accuracy over layers: token ")
    paper = "router W (paper, E)"
    assert f"expert {random[paper, 'expert']:.3f} vs {trained[paper, 'expert']:.3f}" in lines[1]


def test_the_pipeline_on_corpus_windows_with_a_tiny_model(tiny_llama_dir, tmp_path):
    cfg = ps.PathwayStudyConfig(model_name=str(tiny_llama_dir), num_pathways=8, top_k_pathways=2, routed_layers="1,3",
                                domains="news,code", seq_len=16, eval_batch_size=4, out_dir=str(tmp_path), device="cpu")
    model, tokenizer = ps.load_base(cfg)
    routed = ps.build_routed(model, cfg)
    data = cc.held_out_windows(cfg, tokenizer, tokens_per_domain=100)
    assert {d: sum(len(x) for x, _ in b) for d, b in data.items()} == {"news": 7, "code": 7}  # ceil(100 / 16)
    inputs = cc.capture(routed, data)
    assert inputs.hidden.shape == (224, 2, 32) and inputs.layers == [1, 3] and inputs.agreement == 1.0
    tables, summary = cc.run(inputs, cc.ControlContentConfig(top_tokens=5, permutations=1, probe_steps=5), tokenizer)
    assert "224 tokens (code 112, news 112) in windows of 16" in summary
    assert len(cc.verdicts(tables)) == 12
    assert sorted(set(tables["probes"]["label"])) == sorted(cc.PROBE_LABELS)
    fig = cc.plot_probes(tables, "tiny")
    assert len(fig.axes) == len(cc.PROBE_LABELS)
