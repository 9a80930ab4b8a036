"""routelib.routing.analyse.weights and .geometry: weights read from tiny random MoEs of every supported
architecture reproduce the experts' forward; the analyses on cases with known answers; and the
shipped subject."""

import numpy as np
import pytest
import torch

from routelib.routing.analyse import geometry as G
from routelib.routing.analyse.weights import UnsupportedMoEError, checkpoint_steps, hf_from_checkpoint, moe_weights
from test_routing_record_collect import tiny_model


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_extracted_weights_reproduce_each_expert(kind):
    model = tiny_model(kind)
    w = moe_weights(model)
    expected_layers = [1, 2] if kind == "qwen2_moe" else [0, 1, 2]  # qwen2_moe: layer 0 is dense
    assert [layer.index for layer in w.layers] == expected_layers
    assert w.top_k == model.config.num_experts_per_tok and w.routers().shape[:2] == (len(expected_layers), w.num_experts)
    modules = dict(model.named_modules())
    x = torch.randn(5, w.hidden_size)
    for layer in w.layers:
        experts = modules[layer.router_name.rsplit(".", 1)[0]].experts
        router = modules[layer.router_name]
        assert torch.equal(layer.router, router.weight)
        for e in range(w.num_experts):
            ref = experts(x, torch.full((5, 1), e), torch.ones(5, 1))
            ours = (torch.nn.functional.silu(x @ layer.gate[e].T) * (x @ layer.up[e].T)) @ layer.down[e].T
            torch.testing.assert_close(ours, ref)


def test_unsupported_models_are_named():
    from routelib.routing.record.routers import NoMoELayersError

    with pytest.raises(NoMoELayersError, match="LlamaForCausalLM"):
        moe_weights(tiny_model("llama"))
    model = tiny_model("mixtral")
    model.model.layers[0].mlp.experts = torch.nn.Identity()
    with pytest.raises(UnsupportedMoEError, match="MixtralForCausalLM.*Identity"):
        moe_weights(model)


def test_checkpoint_becomes_the_same_function_in_transformers(tmp_path):
    from routelib.models.lm import LM, LMConfig
    from routelib.train import TrainConfig, train

    cfg = LMConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=24,
                   num_experts=4, top_k=2, max_seq_len=32)
    torch.manual_seed(0)
    lm = LM(cfg)

    def batch(step, rank, world):  # (x, y) = a random window and its shift
        x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(step))
        return x[:, :-1], x[:, 1:]

    train(lm, batch, TrainConfig(max_steps=4, warmup_steps=1, ckpt_every=2, out_dir=str(tmp_path), progress=False,
                                 log_every=1))
    steps = checkpoint_steps(tmp_path)
    assert [s for s, _ in steps] == [2, 4]
    hf = hf_from_checkpoint(steps[-1][1])
    ids = torch.randint(0, 64, (1, 12))
    torch.testing.assert_close(hf(ids).logits, lm.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(moe_weights(hf).routers()[0], lm.blocks[0].ffn.gate.weight.detach())
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint_steps(tmp_path / "nothing")


def test_cka_and_matching_known_answers():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    assert G.linear_cka(x, 3 * x @ q) == pytest.approx(1.0)  # rotation + scaling invariant
    assert G.linear_cka(x, torch.randn(200, 8, generator=gen, dtype=torch.float64)) < 0.15
    w = torch.randn(6, 32, generator=gen, dtype=torch.float64)
    perm = torch.randperm(6, generator=gen)
    score, found = G.matched_cosine(w, w[perm])
    assert score == pytest.approx(1.0) and (perm[found] == torch.arange(6)).all()
    with pytest.raises(G.GeometryError, match="same n"):
        G.linear_cka(x, x[:10])


def test_router_similarity_sees_through_permutation_and_the_mean_row():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(8, 64, generator=gen, dtype=torch.float64)
    other = torch.randn(8, 64, generator=gen, dtype=torch.float64)
    shared = 5 * torch.randn(64, generator=gen, dtype=torch.float64)  # invisible to softmax routing
    routers = torch.stack([base + shared, base[torch.randperm(8, generator=gen)] + shared, other + shared])
    centred = G.router_similarity(routers)
    assert centred["matched"].iloc[0, 1] == pytest.approx(1.0) and centred["cka"].iloc[0, 1] == pytest.approx(1.0)
    assert centred["cosine"].iloc[0, 1] < 0.9  # same experts, other order
    assert centred["cka"].iloc[0, 2] < 0.5 and centred["matched"].iloc[0, 2] < 0.6
    raw = G.router_similarity(routers, centre=False)
    assert raw["cosine"].iloc[0, 2] > 0.8  # the shared row makes unrelated routers look alike
    assert 0 < centred["matched"].attrs["null"] < 0.5 and 0 < centred["cka"].attrs["null"] < 0.3


def test_alignment_finds_a_router_built_from_its_experts():
    gen = torch.Generator().manual_seed(2)
    E, I, H = 4, 6, 48
    expert_input = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64)
    _, _, vh = torch.linalg.svd(expert_input)
    router = vh[:, 0, :].clone()  # row e = expert e's top input direction
    a = G.router_expert_alignment(router, expert_input, rank=3)
    assert np.diag(a).mean() > 0.6 and a[~np.eye(E, dtype=bool)].mean() < 0.3
    with pytest.raises(G.GeometryError, match="rank"):
        G.router_expert_alignment(router, expert_input, rank=0)


def test_coactivation_saturation_drift_and_specialisation():
    first = np.array([[0, 1], [1, 0], [0, 1], [1, 0]] * 25)  # layer 1 = 1 - layer 0
    experts = first[:, :, None]  # (N, L, k=1)
    corr = G.coactivation(experts, 2)
    assert corr[0, 3] == pytest.approx(1.0) and corr[0, 2] == pytest.approx(-1.0)  # (L0,e0) vs (L1,e1) / (L1,e0)
    assert G.coactivation_summary(corr, 2).iloc[0, 1] == pytest.approx(1.0)
    final = np.array([[[0, 1]], [[2, 3]]])  # (N=2, L=1, k=2)
    sat = G.saturation({10: np.array([[[1, 0]], [[2, 0]]]), 20: final})
    assert sat["saturation"].tolist() == [0.75, 1.0]
    w = torch.randn(1, 4, 8)
    drift = G.router_drift({1: w * 2, 2: w})
    assert drift["cosine_to_final"].tolist() == pytest.approx([1.0, 1.0]) and drift["relative_change"].iloc[1] == pytest.approx(0.5)
    spec = G.domain_predictability(experts, np.where(first[:, 0] == 0, "code", "math"), 2)
    assert spec["u_domain_given_expert"].tolist() == pytest.approx([1.0, 1.0])
    bal = G.load_balance(experts, 2)
    assert bal["cv"].tolist() == pytest.approx([0, 0]) and bal["entropy_norm"].tolist() == pytest.approx([1, 1])


def test_shipped_subject():
    from transformers import AutoModelForCausalLM

    from routelib import paths

    model = AutoModelForCausalLM.from_pretrained(str(paths.in_repo("data/moe-subject"))).eval()
    w = moe_weights(model)
    assert len(w.layers) == 6 and w.num_experts == 8 and w.top_k == 2 and w.hidden_size == 192
    x = torch.randn(3, 192)
    torch.testing.assert_close(torch.softmax(x @ w.layers[2].router.T, -1),
                               torch.softmax(x @ G.centre_routers(w.layers[2].router).T, -1))  # mean row is invisible
    spectra = G.router_spectra(w.routers())
    assert (spectra["effective_rank"] <= 7 + 1e-6).all()  # centred: E - 1 non-zero singular values


def test_router_study_config_and_tables(tmp_path):
    import pandas as pd

    from routelib.errors import ConfigError
    from routelib.studies.router_weights import RouterStudyConfig, save_tables

    with pytest.raises(ConfigError, match="subspace_rank"):
        RouterStudyConfig(subspace_rank=0)
    assert RouterStudyConfig(windows_per_domain=3).eval_windows == 3  # what domain_eval_data reads
    files = save_tables({"a": pd.DataFrame({"x": [1, 2]})}, tmp_path)
    assert files == [tmp_path / "a.csv"] and pd.read_csv(files[0])["x"].tolist() == [1, 2]


def test_domain_routing_reads_windows_with_the_models_own_tokenizer(tmp_path):
    """tokenizer='model' takes the studied model's tokenizer (the subject's is the project's BPE, so
    the ids equal bpe8k's); a tokenizer whose ids exceed the model's vocabulary is refused by name."""
    from routelib.data.tokenizer import load_tokenizer
    from routelib.errors import ConfigError
    from routelib.studies.router_weights import RouterStudyConfig, domain_routing, load_subject, window_tokenizer

    cfg = RouterStudyConfig(model="data/moe-subject", seq_len=16, windows_per_domain=1)  # v2: the 8k BPE
    text = "def add(a, b):\n    return a + b"
    assert window_tokenizer(cfg)(text)["input_ids"] == load_tokenizer("bpe8k")(text)["input_ids"]
    model = load_subject(cfg)
    experts, logprobs, domains = domain_routing(model, cfg)
    assert experts.shape[1:] == (6, 2) and len(experts) == len(domains) == len(logprobs)
    with pytest.raises(ConfigError, match="embeddings"):
        domain_routing(model, RouterStudyConfig(model="data/moe-subject", seq_len=16, windows_per_domain=1,
                                                tokenizer="smollm2"))
    with pytest.raises(ConfigError, match="no tokenizer"):
        window_tokenizer(RouterStudyConfig(model=str(tmp_path)))


def test_router_study_skips_what_a_model_lacks_with_a_reason(tmp_path):
    """Training snapshots: none, a missing file, another model's (the subject's beside a Qwen2-MoE) are
    each a one-line reason; the subject's own load. A router that is no single matrix: a reason too."""
    import dataclasses

    from routelib.studies.router_weights import RouterStudyConfig, router_matrices, training_snapshots

    qwen = moe_weights(tiny_model("qwen2_moe"))
    reasons = {
        "snapshots is None": training_snapshots(RouterStudyConfig(snapshots=None), qwen),
        "no training snapshots at": training_snapshots(RouterStudyConfig(snapshots=str(tmp_path / "none.npz")), qwen),
        "holds the snapshots of another model": training_snapshots(RouterStudyConfig(model="tiny-qwen"), qwen),
    }
    for expected, (snaps, reason) in reasons.items():
        assert snaps is None and expected in reason and "\n" not in reason
    assert "collect_snapshots" in reasons["snapshots is None"][1]
    routers, missing = router_matrices(qwen)
    assert missing is None and tuple(routers.shape) == (2, 6, 32)
    mlp_router = dataclasses.replace(qwen, layers=[dataclasses.replace(qwen.layers[0], router=None)] + qwen.layers[1:])
    routers, missing = router_matrices(mlp_router)
    assert routers is None and "not one linear map" in missing


def test_router_study_reads_the_subjects_own_snapshots():
    from transformers import AutoModelForCausalLM

    from routelib import paths
    from routelib.studies.router_weights import RouterStudyConfig, training_snapshots

    subject = moe_weights(AutoModelForCausalLM.from_pretrained(str(paths.in_repo("data/moe-subject"))).eval())
    snaps, missing = training_snapshots(RouterStudyConfig(snapshots="data/moe-subject/training_snapshots.npz"), subject)
    assert missing is None and snaps.routers.shape[1:] == (6, 8, 192)


def test_saturation_of_two_runs_on_one_axis_of_training_fraction(tmp_path):
    import pandas as pd

    from routelib.studies.router_weights import RouterStudyConfig, compare_saturation, saturation_by_fraction

    v2, missing = compare_saturation(RouterStudyConfig(compare_snapshots="data/moe-subject/training_snapshots.npz"))
    assert missing is None and v2["layer"].nunique() == 6
    toy = pd.DataFrame({"step": [0, 0, 10, 10], "layer": [0, 1, 0, 1], "saturation": [0.2, 0.4, 1.0, 1.0]})
    table = saturation_by_fraction({"v2": v2, "toy": toy})
    toy_rows = table[table["model"] == "toy"]
    assert toy_rows["fraction"].tolist() == [0.0, 1.0] and toy_rows["mean"].tolist() == pytest.approx([0.3, 1.0])
    assert toy_rows["min"].tolist() == [0.2, 1.0] and toy_rows["max"].tolist() == [0.4, 1.0]
    assert table.loc[table["model"] == "v2", "fraction"].max() == 1.0
    assert compare_saturation(RouterStudyConfig(compare_snapshots=None)) == (None, "compare_snapshots is None")
    none, why = compare_saturation(RouterStudyConfig(compare_snapshots=str(tmp_path / "none.npz")))
    assert none is None and "no training snapshots at" in why
