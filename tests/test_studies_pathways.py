"""The pathway study (notebook 01) on a tiny randomly initialised Llama saved like a pretrained model:
layer selection, what each train scope trains, the loss, fine-tuning with resume, one-pass
evaluation (perplexity = a reference computation, routing = collect_routing), controls, the tables
and the seed-claims row set. SmolLM2 itself only where its shape matters (no weights loaded)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from routelib import metrics
from routelib.studies import pathways as ps
from routelib.errors import ConfigError
from routelib.models.pathways import PathwayMLP, RoutedLLM, decoder_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 8192  # the shipped bpe8k tokenizer, so the real corpus streams feed the tiny model


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    """A tiny Llama (4 layers, MLP 64 wide) + the bpe8k tokenizer, saved as load_pretrained reads it."""
    return tiny_llama_dir


def study_cfg(model_dir, tmp_path, **kw) -> ps.PathwayStudyConfig:
    base = dict(model_name=str(model_dir), num_pathways=8, top_k_pathways=2, domains="news,encyclopedic",
                seq_len=16, batch_size=4, steps=6, lr=1e-2, warmup_steps=1, eval_windows=6, eval_batch_size=4,
                out_dir=str(tmp_path / "runs"), device="cpu", bench_tokens=64, bench_min_time_s=0.001)
    return ps.PathwayStudyConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kw, layers", [
    pytest.param({}, list(range(0, 30, 2)), id="seed-every-other"),
    pytest.param({"route_every_n_layers": 4, "first_routed_layer": 12, "last_routed_layer": 24}, [12, 16, 20, 24], id="window"),
    pytest.param({"first_routed_layer": 27}, [27, 29], id="odd-start"),
    pytest.param({"routed_layers": "20, 4,4"}, [4, 20], id="explicit"),
])
def test_layers_for_smollm2_depth(kw, layers):
    assert ps.PathwayStudyConfig(**kw).layers(30) == layers


@pytest.mark.parametrize("kw, match", [
    pytest.param({"train_scope": "mlp"}, "train_scope", id="scope"),
    pytest.param({"routed_layers": "a,b"}, "routed_layers", id="layers-text"),
    pytest.param({"routed_layers": "-1"}, "non-negative", id="layers-negative"),
    pytest.param({"domains": "code,poetry"}, "poetry", id="domain"),
    pytest.param({"top_k_pathways": 20}, "top_k_pathways", id="k>N"),
    pytest.param({"impl": "fast"}, "impl", id="impl"),
    pytest.param({"steps": 0}, "steps", id="steps"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        ps.PathwayStudyConfig(**kw)


def test_layers_out_of_range_name_the_model_depth():
    with pytest.raises(ConfigError, match="30 layers"):
        ps.PathwayStudyConfig(routed_layers="2,31").layers(30)
    with pytest.raises(ConfigError, match="first_routed_layer"):
        ps.PathwayStudyConfig(first_routed_layer=10, last_routed_layer=4).layers(30)


def test_run_hash_ignores_stop_step_not_lr(model_dir, tmp_path):
    cfg = study_cfg(model_dir, tmp_path)
    rc = cfg.routing_config([0, 2])
    from routelib.train import TrainConfig

    h = ps.run_hash(cfg, rc, TrainConfig(max_steps=6, warmup_steps=1))
    assert h == ps.run_hash(cfg, rc, TrainConfig(max_steps=6, warmup_steps=1, stop_step=3))
    assert h != ps.run_hash(cfg, rc, TrainConfig(max_steps=6, warmup_steps=1, lr=1e-3))
    assert h != ps.run_hash(cfg, cfg.routing_config([0]), TrainConfig(max_steps=6, warmup_steps=1))


# ---------------------------------------------------------------------------- model, scope, loss
@pytest.fixture
def routed(model_dir, tmp_path):
    cfg = study_cfg(model_dir, tmp_path, routed_layers="1,3")
    model, tok = ps.load_base(cfg)
    return cfg, ps.build_routed(model, cfg), tok


def test_build_routed_is_reproducible_and_exact_in_all_mode(model_dir, tmp_path):
    cfg = study_cfg(model_dir, tmp_path, routed_layers="1,3")
    base, _ = ps.load_base(cfg)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
    a = ps.build_routed(base, cfg)
    b = ps.build_routed(ps.load_base(cfg)[0], cfg)
    assert a.routed_layers == [1, 3] and isinstance(decoder_layers(a.model)[1].mlp, PathwayMLP)
    assert torch.equal(a.routers()[1].proj.weight, b.routers()[1].proj.weight)  # same seed, same router
    with torch.no_grad():
        assert torch.equal(a.set_mode("all")(ids).logits, ref)


@pytest.mark.parametrize("scope", ps.TRAIN_SCOPES)
def test_set_trainable_scopes(routed, scope):
    cfg, model, _ = routed
    n = ps.set_trainable(model, scope)
    router = sum(p.numel() for p in model.router_parameters())
    mlps = sum(p.numel() for m in model.pathway_mlps().values() for p in m.mlp.parameters())
    expected = {"router": router, "router+mlp": router + mlps, "full": sum(p.numel() for p in model.parameters())}
    assert n == expected[scope] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert router == 2 * 32 * cfg.num_pathways
    with pytest.raises(ConfigError, match="scope"):
        ps.set_trainable(model, "everything")


def test_routed_lm_loss_is_cross_entropy_plus_weighted_aux(routed):
    cfg, model, _ = routed
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    model.train()
    loss, logged = ps.routed_lm_loss(model, x, y)
    with torch.no_grad():
        out = model(x)
    ce = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    assert set(logged) == {"lm_loss", "glbl", "switch", "max_load"}
    assert logged["lm_loss"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ce.item() + cfg.glbl_weight * logged["glbl"].item(), rel=1e-5)
    assert 1 / cfg.num_pathways <= logged["max_load"].item() <= 1 / cfg.top_k_pathways + 1e-6


# ------------------------------------------------------------------------------------ fine-tuning
def test_fine_tune_router_scope_moves_only_routers_and_resumes(model_dir, tmp_path):
    cfg = study_cfg(model_dir, tmp_path, routed_layers="1,3", train_scope="router")
    model, tok = ps.load_base(cfg)
    routed = ps.build_routed(model, cfg)
    before = {k: v.clone() for k, v in routed.state_dict().items()}
    batch_fn = ps.training_batches(cfg, tok)
    result = ps.fine_tune(routed, cfg, batch_fn)
    after = routed.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".router." in k or ".freq." in k for k in changed), sorted(changed)
    assert any(".router." in k for k in changed)
    assert result.step == cfg.steps and not routed.training
    assert {"lm_loss", "glbl", "switch", "max_load"} <= set(result.history[-1])
    # a second call with the same parameters loads the finished run instead of retraining
    again = ps.build_routed(ps.load_base(cfg)[0], cfg)
    ps.fine_tune(again, cfg, batch_fn)
    assert all(torch.equal(after[k], v) for k, v in again.state_dict().items())


def test_fine_tune_in_two_chunks_equals_one_run(model_dir, tmp_path):
    cfg = study_cfg(model_dir, tmp_path, routed_layers="0,2", train_scope="router+mlp", steps=4)
    base, tok = ps.load_base(cfg)
    batch_fn = ps.training_batches(cfg, tok)
    whole = ps.build_routed(base, cfg)
    ps.fine_tune(whole, cfg, batch_fn)
    cfg2 = dataclasses.replace(cfg, out_dir=str(tmp_path / "chunked"))
    chunked = ps.build_routed(ps.load_base(cfg)[0], cfg2)
    assert ps.fine_tune(chunked, cfg2, batch_fn, stop_step=2).step == 2
    chunked = ps.build_routed(ps.load_base(cfg)[0], cfg2)
    assert ps.fine_tune(chunked, cfg2, batch_fn).step == 4
    for (k, a), b in zip(whole.state_dict().items(), chunked.state_dict().values()):
        assert torch.equal(a, b), k


def test_switch_arm_swaps_the_losses():
    arm = ps.switch_arm(ps.PathwayStudyConfig(glbl_weight=0.02, switch_weight=0.0))
    assert (arm.glbl_weight, arm.switch_weight) == (0.0, 0.02)


# -------------------------------------------------------------------------------------- evaluation
def test_evaluate_matches_reference_and_collect_routing(routed):
    cfg, model, tok = routed
    eval_data = ps.domain_eval_data(cfg, tok)
    assert list(eval_data) == ["news", "encyclopedic"]  # the order cfg.domains gives
    res = ps.evaluate(model, eval_data)
    # perplexity: a plain loop over the same batches
    nll, n = 0.0, 0
    with torch.no_grad():
        for batches in eval_data.values():
            for x, y in batches:
                nll += F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="sum").item()
                n += y.numel()
    assert res.perplexity["overall"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    # routing: what collect_routing sees, with domains and window ids
    s = res.sample
    xs = torch.cat([x for b in eval_data.values() for x, _ in b])
    tokens, sel = model.collect_routing(xs)
    assert np.array_equal(s.tokens, tokens) and sorted(s.selections) == [1, 3]
    assert all(np.array_equal(s.selections[i], sel[i]) for i in sel)
    assert len(s) == 2 * cfg.eval_windows * cfg.seq_len
    assert list(s.domains[:cfg.seq_len]) == ["news"] * cfg.seq_len and s.domains[-1] == "encyclopedic"
    assert np.array_equal(np.unique(s.seq_ids), np.arange(2 * cfg.eval_windows))
    # the un-routed model: perplexity only
    base = ps.evaluate(model.unwrap(), eval_data)
    assert base.sample is None and set(base.perplexity) == {"encyclopedic", "news", "overall"}
    table = ps.perplexity_table({"base": base, "routed": res})
    assert table.loc["base", "ratio_to_base"] == 1.0
    assert table.loc["routed", "ppl_news"] == pytest.approx(res.perplexity["news"])


# --------------------------------------------------------------------------- monosemanticity tables
def synthetic_sample(n=600, N=4, k=1, seed=0) -> ps.RoutingSample:
    """Layer 0: token 7 always goes to pathway 0, the rest at random among 1..3; layer 1 random."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50, n)
    tokens[::5] = 7
    l0 = np.where(tokens == 7, 0, rng.integers(1, N, n))[:, None]
    l1 = rng.integers(0, N, (n, k))
    domains = np.where(np.arange(n) < n // 2, "code", "news")
    return ps.RoutingSample(tokens, domains, np.arange(n) // 20, {0: l0, 1: l1})


def test_controls_keep_loads_and_positions():
    s = synthetic_sample()
    untrained = ps.RoutingSample(s.tokens, s.domains, s.seq_ids, {0: s.selections[1], 1: s.selections[0]})
    routers = ps.control_selections(s, untrained, num_pathways=4, seed=0)
    assert list(routers) == list(ps.ROUTERS)
    for layer, idx in s.selections.items():
        assert np.array_equal(np.bincount(routers["permuted"][layer].ravel(), minlength=4),
                              np.bincount(idx.ravel(), minlength=4))
        assert routers["random top-k"][layer].shape == idx.shape
    assert routers["untrained"][0] is untrained.selections[0]
    other = ps.RoutingSample(s.tokens[::-1].copy(), s.domains, s.seq_ids, s.selections)
    with pytest.raises(ConfigError, match="same positions"):
        ps.control_selections(s, other, 4)


def test_tables_find_the_planted_pathway():
    s = synthetic_sample()
    routers = ps.control_selections(s, s, num_pathways=4, seed=0)
    per = ps.router_metrics(s, routers, num_pathways=4, vocab_size=50)
    summary = ps.summary_table(per)
    assert len(summary) == len(ps.ROUTERS) * 2
    head = ps.headline_purity(summary)
    assert list(head.index) == list(ps.ROUTERS)
    assert head.loc["fine-tuned", "mean_purity"] > head.loc["random top-k", "mean_purity"]
    top = ps.specialised_pathways(per, decode=lambda t: f"t{t}", n=3)
    assert (top.loc[0, "layer"], top.loc[0, "pathway"]) == (0, 0) and top.loc[0, "top_tokens"].startswith("'t7'")
    assert top.loc[0, "purity"] == pytest.approx(1.0)
    assert top["excess"].is_monotonic_decreasing
    excess = ps.purity_excess(s, routers, 4, 50).set_index(["router", "layer"])["excess"]
    assert excess["fine-tuned", 0] > 0.1  # token 7 -> pathway 0 is an association a permutation destroys
    assert abs(excess["random top-k", 0]) < 0.05 and abs(excess["fine-tuned", 1]) < 0.05
    pur = ps.pathway_purities(per)
    assert len(pur) == len(ps.ROUTERS) * 2 * 4
    by_domain = ps.purity_per_domain(s, routers, 4, 50)
    assert list(by_domain.columns) == list(ps.ROUTERS) and list(by_domain.index) == ["code", "news"]
    doms = ps.pathway_domains(s, 0, 4)
    assert doms.loc[0, "share_code"] + doms.loc[0, "share_news"] == pytest.approx(1.0)


def test_pathway_contexts_stay_in_their_window_and_end_on_the_routed_token():
    s = synthetic_sample()
    ex = ps.pathway_contexts(s, 0, 0, decode_ids=lambda ids: " ".join(f"t{i}" for i in ids), n_examples=5, window=6)
    assert len(ex) == 5
    for e in ex:
        assert e["token"] == "t7" and e["domain"] in ("code", "news")
        assert len(e["context"].split()) <= 6
    positions = metrics.pathway_examples(s.selections[0], 0, 5, seq_ids=s.seq_ids, window=6)
    for pos, span in positions:
        assert np.all(s.seq_ids[span] == s.seq_ids[pos])


# ------------------------------------------------------------------------------------ speed, claims
def test_speed_and_seed_claims(model_dir, tmp_path):
    cfg = study_cfg(model_dir, tmp_path)
    speed = ps.pathway_speed(cfg, hidden_size=32, intermediate_size=64)
    assert set(speed["name"]) == {"dense_masked", "sparse", "dense_mlp"}
    assert speed.attrs["flop_share_sparse"] == pytest.approx(2 / 8 + 2 * 32 * 8 / (6 * 32 * 64))
    s = synthetic_sample()
    head = ps.headline_purity(ps.summary_table(ps.router_metrics(s, ps.control_selections(s, s, 4), 4, 50)))
    table = ps.perplexity_table({n: ps.EvalResult({"overall": v}, None) for n, v in
                                 (("base", 10.0), ("untrained", 40.0), ("fine-tuned", 20.0))})
    claims = ps.seed_claims(table, head, speed, cfg, routed=[0, 2], num_layers=4)
    assert len(claims) == 5 and "excess" not in claims["this run"].iloc[3]
    head["purity_excess"] = [0.25, 0.0, 0.0, 0.0]
    assert "fine-tuned +0.2500" in ps.seed_claims(table, head, speed, cfg, [0, 2], 4)["this run"].iloc[3]
    assert "10.00 base -> 40.00 routed (untrained) -> 20.00 fine-tuned" in claims["this run"].iloc[-1]
    assert "2 of 4 layers routed (0, 2)" in claims["this run"].iloc[0]


# ---------------------------------------------------------------------------- figure and explorer
def test_four_panel_figure_draws_every_router():
    import matplotlib

    matplotlib.use("Agg")
    from routelib.studies.pathways import views as pathway_views

    s = synthetic_sample()
    routers = ps.control_selections(s, s, num_pathways=4, seed=0)
    per = ps.router_metrics(s, routers, 4, 50)
    summary, purities = ps.summary_table(per), ps.pathway_purities(per)
    top = ps.specialised_pathways(per, decode=lambda t: f"t{t}", n=4)
    fig = pathway_views.plot_monosemanticity(summary, purities, top)
    (a, b), (c, d) = fig.axes[0:2], fig.axes[2:4]
    assert [line.get_label() for line in a.lines][:4] == list(ps.ROUTERS)
    assert np.allclose(a.lines[0].get_ydata(), summary[summary.router == "fine-tuned"]["mean_purity"])
    assert len(c.patches) == 4 and c.get_yticklabels()[-1].get_text().startswith("L0 P0: 't7'")
    assert len(d.patches) == len(ps.ROUTERS) * 2  # a bar per router and layer
    fig2 = pathway_views.plot_purity_by_domain(ps.purity_per_domain(s, routers, 4, 50))
    assert fig2.axes[0].get_legend() is not None
    import matplotlib.pyplot as plt

    plt.close("all")


def test_pathway_html_lists_tokens_domains_and_contexts():
    from routelib.studies.pathways import views as pw

    s = synthetic_sample()
    routers = ps.control_selections(s, s, num_pathways=4, seed=0)
    per = ps.router_metrics(s, routers, 4, 50)
    decode = lambda ids: "".join(f"<t{i}>" for i in ids)  # noqa: E731 -- "<" must be escaped in the HTML
    page = pw.pathway_html(s, per["fine-tuned"], 0, 0, decode, control=per["permuted"], n_examples=3)
    assert "layer 0, pathway 0" in page and "purity 1.000" in page and "under the control" in page
    assert "&lt;t7&gt;" in page and "<t7>" not in page
    assert page.count("<mark>") == 3 and "code" in page and "news" in page
    assert pw.purest_pathway(per["fine-tuned"]) == (0, 0)
    with pytest.raises(ConfigError, match="not routed"):
        pw.pathway_html(s, per["fine-tuned"], 5, 0, decode)
    with pytest.raises(ConfigError, match="out of range"):
        pw.pathway_html(s, per["fine-tuned"], 0, 4, decode)
    box = pw.pathway_explorer(s, per["fine-tuned"], decode, control=per["permuted"])
    view = box.children[1]
    assert "layer 0, pathway 0" in view.value
    box.children[0].children[1].value = 2  # move the pathway slider: the view follows
    assert "layer 0, pathway 2" in view.value
    assert "layer 1, pathway 3" in pw.pathway_explorer(s, per["fine-tuned"], decode, start=(1, 3)).children[1].value
    with pytest.raises(ConfigError, match="not routed"):
        pw.pathway_explorer(s, per["fine-tuned"], decode, start=(7, 0))


# --------------------------------------------------------------------- per-layer cost of routing
def test_layer_sensitivity_leaves_the_model_unchanged(model_dir, tmp_path):
    cfg = study_cfg(model_dir, tmp_path)
    model, _ = ps.load_base(cfg)
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    y = torch.roll(x, -1, 1)
    with torch.no_grad():
        ref = model(x).logits
    df = ps.layer_sensitivity(model, cfg, x, y, [0, 2])
    assert list(df["layer"]) == [0, 2] and not any(isinstance(layer.mlp, PathwayMLP) for layer in decoder_layers(model))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
        one = ps.build_routed(model, dataclasses.replace(cfg, routed_layers="2"))
        nll = F.cross_entropy(one(x).logits.flatten(0, 1), y.flatten()).item()
    assert df.set_index("layer").loc[2, "nll"] == pytest.approx(nll, rel=1e-6)
    assert df["delta_nll"].tolist() == pytest.approx((df["nll"] - df.attrs["base_nll"]).tolist())


@pytest.mark.parametrize("make", [pytest.param("llama", id="llama"), pytest.param("gpt2", id="gpt2")])
def test_selection_error_against_a_direct_computation(make):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if make == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, mlp_bias=True))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    model.eval()
    routed = RoutedLLM(model, ps.PathwayStudyConfig(num_pathways=8, top_k_pathways=2).routing_config([0])).eval()
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    pm = routed.pathway_mlps()[0]
    inputs = {}
    hook = pm.register_forward_pre_hook(lambda mod, args: inputs.__setitem__("x", args[0].reshape(-1, 32)))
    df = ps.selection_error(routed, x)
    hook.remove()
    assert pm.mode == "routed" and not routed.training  # modes restored (GPT-2's dropout stays off)
    # direct: each pathway's output through dense_masked with a one-hot choice, minus the output bias
    xs = inputs["x"]
    n = xs.shape[0]
    with torch.no_grad():
        bias = getattr(pm.mlp, pm.out_name).bias
        outs = torch.stack([pm.dense_masked(xs, torch.full((n, 1), p), torch.ones(n, 1)) - bias for p in range(8)], 1)
        y = pm.full(xs) - bias
        dec = pm.router(xs)
        kept = (torch.gather(outs, 1, dec.indices[..., None].expand(-1, -1, 32)) * dec.weights[..., None]).sum(1)
    want = ((y - kept).norm(dim=-1) / y.norm(dim=-1)).mean().item()
    assert df.loc[0, "router"] == pytest.approx(want, rel=1e-4)
    assert df.loc[0, "best_k"] <= df.loc[0, "random"] + 1e-6


def test_probe_batch_takes_domains_in_turn():
    data = {"a": [(torch.full((2, 3), 1), torch.full((2, 3), -1))],
            "b": [(torch.full((1, 3), 2), torch.full((1, 3), -2)), (torch.full((1, 3), 3), torch.full((1, 3), -3))]}
    x, y = ps.probe_batch(data, 3)
    assert x[:, 0].tolist() == [1, 2, 1] and torch.equal(y, -x)
    assert ps.probe_batch(data, 4)[0][:, 0].tolist() == [1, 2, 1, 3]
    with pytest.raises(ConfigError, match="windows"):
        ps.probe_batch(data, 5)


# ---------------------------------------------------------------------- neuron grouping
@pytest.mark.parametrize("kw, match", [
    pytest.param({"grouping": "random"}, "grouping", id="grouping"),
    pytest.param({"grouping_split": "dev"}, "unknown split", id="split"),
    pytest.param({"grouping_windows": 0}, "grouping_windows", id="windows"),
    pytest.param({"grouping_top_fraction": 1.0}, "grouping_top_fraction", id="top-fraction"),
])
def test_grouping_config_rejects_bad_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        ps.PathwayStudyConfig(**kw)


@pytest.mark.parametrize("grouping", ["coactivation", "weights"])
def test_grouped_routing_is_the_base_model_in_all_mode_and_unroute_restores_it(model_dir, tmp_path, grouping):
    cfg = study_cfg(model_dir, tmp_path, routed_layers="1,3", grouping=grouping, grouping_windows=2)
    model, tok = ps.load_base(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    routed = ps.build_routed(model, cfg, tokenizer=tok)
    assert set(routed.neuron_orders) == {1, 3}
    assert not torch.equal(routed.neuron_orders[1], torch.arange(64))  # the groups are not the base order
    again = ps.build_routed(ps.load_base(cfg)[0], cfg, tokenizer=tok)
    assert all(torch.equal(routed.neuron_orders[i], again.neuron_orders[i]) for i in (1, 3))  # deterministic
    with torch.no_grad():
        torch.testing.assert_close(routed.set_mode("all")(ids).logits, ref, rtol=1e-5, atol=1e-5)
    back = ps.unroute(routed)
    assert all(torch.equal(before[k], v) for k, v in back.state_dict().items())


def test_stored_orders_are_reused_and_checked(model_dir, tmp_path):
    cfg = study_cfg(model_dir, tmp_path, routed_layers="1,3", grouping="weights")
    first = ps.build_routed(ps.load_base(cfg)[0], cfg)
    again = ps.build_routed(ps.load_base(cfg)[0], cfg, orders=first.neuron_orders)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    ps.save_orders(tmp_path / "g.npz", first.neuron_orders)
    back = ps.load_orders(tmp_path / "g.npz")
    assert sorted(back) == [1, 3] and all(torch.equal(back[i], first.neuron_orders[i]) for i in (1, 3))
    with pytest.raises(ConfigError, match="do not fit"):
        ps.build_routed(ps.load_base(cfg)[0], cfg, orders={1: first.neuron_orders[1]})
    with pytest.raises(ConfigError, match="do not fit"):
        ps.build_routed(ps.load_base(cfg)[0], dataclasses.replace(cfg, grouping="contiguous"), orders=first.neuron_orders)


def test_coactivation_needs_the_tokenizer(model_dir, tmp_path):
    cfg = study_cfg(model_dir, tmp_path, routed_layers="1", grouping="coactivation")
    with pytest.raises(ConfigError, match="needs the tokenizer"):
        ps.build_routed(ps.load_base(cfg)[0], cfg)


def test_grouping_sample_takes_windows_of_every_domain(model_dir, tmp_path):
    cfg = study_cfg(model_dir, tmp_path, grouping_windows=3)
    _, tok = ps.load_base(cfg)
    x = ps.grouping_sample(cfg, tok)
    assert x.shape == (6, cfg.seq_len)  # 2 domains x 3 windows


def test_run_hash_depends_on_grouping(model_dir, tmp_path):
    from routelib.train import TrainConfig

    cfg = study_cfg(model_dir, tmp_path)
    rc, tc = cfg.routing_config([0]), TrainConfig(max_steps=6, warmup_steps=1)
    hashes = {g: ps.run_hash(dataclasses.replace(cfg, grouping=g), rc, tc) for g in ("contiguous", "coactivation", "weights")}
    assert len(set(hashes.values())) == 3


def test_grouping_error_reports_both_groupings_and_leaves_the_model(model_dir, tmp_path):
    cfg = study_cfg(model_dir, tmp_path, routed_layers="0,2", grouping_windows=2)
    model, tok = ps.load_base(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    table = ps.grouping_error(model, cfg, x, tokenizer=tok, groupings=("contiguous", "coactivation"))
    assert list(table.index) == [0, 2]
    assert set(table.columns) == {(g, m) for g in ("contiguous", "coactivation") for m in ("router", "random", "best_k")}
    assert (table.xs("best_k", axis=1, level="measure") <= table.xs("random", axis=1, level="measure") + 1e-6).all().all()
    assert ((table > 0) & (table < 2)).all().all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model comes back as it was
    # the contiguous half is selection_error of the plain routed model
    direct = ps.selection_error(ps.build_routed(model, cfg, tokenizer=tok), x, seed=cfg.seed)
    np.testing.assert_allclose(table["contiguous"][direct.columns].to_numpy(), direct.to_numpy(), rtol=1e-6)
