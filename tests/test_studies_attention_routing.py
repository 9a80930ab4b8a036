"""routelib.studies.attention_routing (notebook 02's logic) and routelib.studies.attention_routing.views on a tiny study: run plan, training with routing
statistics, checkpoint reuse, comparisons and the verdict rule, the alpha sweep, the speed sweep,
token analysis and HTML, figures."""

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from routelib.studies import attention_routing as study  # noqa: E402
from routelib.studies.attention_routing import views  # noqa: E402
from routelib.config import from_params  # noqa: E402
from routelib.data import load_tokenizer  # noqa: E402
from routelib.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=16, num_heads=2, intermediate_size=32, seq_len=16, batch_size=2, steps=3, warmup_steps=1,
            lr_static=1e-3, lr_dynamic=2e-3, lr_same=[2e-3], seeds=[0, 1], alpha_sweep=[0.0, 0.5], balance_coef=0.5,
            eval_windows=2, speed_seq_lens=[16, 32], speed_batch=2, bench_min_time_s=0.01, device="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = study.HybridStudyConfig(**TINY, out_dir=str(tmp_path_factory.mktemp("hybrid")))
    eval_data = study.domain_eval_data(cfg)
    runs = study.run_all(cfg, study.plan(cfg), eval_data)
    return cfg, eval_data, runs


def test_plan_lists_each_run_once():
    cfg = study.HybridStudyConfig(**TINY)
    names = [s.name for s in study.plan(cfg)]
    assert len(names) == len(set(names))
    # per seed: static@1e-3, dynamic@2e-3 (shared with "same lr 2e-3"), static@2e-3; sweep: alpha 0 (0.5 is shared)
    assert names == ["static-lr0.001-a0-s0-n3", "dynamic-lr0.002-a0.5-s0-n3", "static-lr0.002-a0-s0-n3",
                     "static-lr0.001-a0-s1-n3", "dynamic-lr0.002-a0.5-s1-n3", "static-lr0.002-a0-s1-n3",
                     "dynamic-lr0.002-a0-s0-n3"]
    sweep = study.plan(study.HybridStudyConfig(**{**TINY, "alpha_sweep_steps": 2}))
    assert [s.alpha for s in sweep if s.steps == 2] == [0.0, 0.5]


@pytest.mark.parametrize("kw, match", [
    (dict(seeds=[]), "seeds"),
    (dict(seeds=[0, 0]), "seeds"),
    (dict(lr_same=[0.0]), "learning rates"),
    (dict(alpha_sweep=[-1.0]), "alpha"),
    (dict(speed_seq_lens=[0]), "speed_seq_lens"),
    (dict(softmax_kv="none"), "softmax_kv"),
    (dict(hidden_size=31), "divisible"),
])
def test_bad_config_is_rejected(kw, match):
    with pytest.raises(ConfigError, match=match):
        study.HybridStudyConfig(**{**TINY, **kw})


def test_notebook_parameters_build_the_config():
    cfg = from_params(study.HybridStudyConfig, {"seeds": [3, 4], "lr_same": [1e-3, 3e-3], "alpha_sweep": [0, 1]})
    assert cfg.seeds == [3, 4] and cfg.alpha_sweep == [0.0, 1.0]
    with pytest.raises(ConfigError, match="seeds"):
        from_params(study.HybridStudyConfig, {"seed": 1})  # misspelt


def test_arms_see_the_same_batches():
    cfg = study.HybridStudyConfig(**TINY)
    a, b = study.training_batches(cfg, 0), study.training_batches(cfg, 0)
    assert all(torch.equal(a(s)[0], b(s)[0]) for s in range(3))
    assert not torch.equal(a(0)[0], study.training_batches(cfg, 1)(0)[0])


def test_training_logs_routing_and_reuses_finished_runs(tiny):
    cfg, _, runs = tiny
    dyn = runs.results["dynamic-lr0.002-a0.5-s0-n3"].history[-1]
    for key in ("softmax_frac_L1", "softmax_frac_L2", "entropy_L1", "entropy_L2", "balance_loss", "tau", "lm_loss"):
        assert key in dyn and math.isfinite(dyn[key]), key
    assert 0.0 <= dyn["softmax_frac_L1"] <= 1.0 and 0.0 <= dyn["balance_loss"] <= 2.0
    assert "softmax_frac_L1" not in runs.results["static-lr0.001-a0-s0-n3"].history[-1]
    assert int(runs.models["dynamic-lr0.002-a0.5-s0-n3"].router_step) == 3  # the temperature schedule advanced
    spec = study.plan(cfg)[1]
    model, result = study.train_run(spec, cfg)  # finished: loaded, not retrained
    assert result.history == runs.results[spec.name].history
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), runs.models[spec.name].state_dict().values()))


def test_results_table(tiny):
    cfg, eval_data, runs = tiny
    t = runs.table
    assert len(t) == 7 and set(t["arm"]) == {"static", "dynamic"}
    assert np.allclose(t["val_loss"], np.log(t["ppl_overall"]))
    assert t.loc[t["arm"] == "static", "softmax_frac_L1"].isna().all()
    assert t.loc[t["arm"] == "dynamic", "softmax_frac_L1"].between(0, 1).all()
    assert (t.loc[t["arm"] == "dynamic", "params_M"] > t.loc[t["arm"] == "static", "params_M"].max()).all()
    name = "dynamic-lr0.002-a0.5-s0-n3"
    assert study.routing_summary(runs.models[name], eval_data) == {k: t.loc[name, k] for k in
                                                                   ("softmax_frac_L1", "entropy_L1", "softmax_frac_L2", "entropy_L2")}


def test_compare_experiments_matches_the_table(tiny):
    cfg, _, runs = tiny
    comp = study.compare_experiments(runs.table, cfg)
    assert list(comp.index) == ["seed lrs", "same lr 0.002"]
    t = runs.table
    s = t.loc[["static-lr0.001-a0-s0-n3", "static-lr0.001-a0-s1-n3"], "val_loss"].to_numpy()
    d = t.loc[["dynamic-lr0.002-a0.5-s0-n3", "dynamic-lr0.002-a0.5-s1-n3"], "val_loss"].to_numpy()
    row = comp.loc["seed lrs"]
    assert row["seeds"] == 2 and math.isclose(row["delta_mean"], (d - s).mean(), rel_tol=1e-9)
    assert math.isclose(row["delta_min"], (d - s).min()) and math.isclose(row["static_val_loss_std"], s.std())
    assert study.tuned_lr(t, cfg) == 2e-3


def _synthetic(deltas, frac=0.5, offsets=(0.0, 0.0)):
    """A results table with two seeds at one equal lr and the seed lrs, dynamic - static = deltas;
    seed s's losses are shifted by offsets[s] in both arms."""
    cfg = study.HybridStudyConfig(**{**TINY, "lr_same": [2e-3]})
    rows = []
    for seed, delta, off in zip(cfg.seeds, deltas, offsets):
        for arm, lr, loss in (("static", 1e-3, 5.0 + off), ("static", 2e-3, 4.0 + off), ("dynamic", 2e-3, 4.0 + off + delta)):
            rows.append(dict(run=f"{arm}{lr}{seed}", arm=arm, lr=lr, seed=seed, alpha=0.5 if arm == "dynamic" else 0.0,
                             steps=cfg.steps, val_loss=loss, ppl_overall=math.exp(loss), train_tokens_per_s=1.0,
                             softmax_frac_L1=frac if arm == "dynamic" else np.nan,
                             softmax_frac_L2=0.5 if arm == "dynamic" else np.nan))
    return pd.DataFrame(rows).set_index("run"), cfg


@pytest.mark.parametrize("deltas, offsets, outcome, leaning", [
    ((-0.2, -0.1), (0.0, 0.0), "dynamic routing wins", "dynamic"),
    ((0.1, 0.3), (0.0, 0.0), "baseline wins", "baseline"),
    ((-0.1, 0.2), (0.0, 0.0), "no clear winner", None),
    ((0.05, 0.1), (0.0, 0.5), "no clear winner", "baseline"),  # same sign, gap within the seed spread
])
def test_verdict_rule(deltas, offsets, outcome, leaning):
    table, cfg = _synthetic(deltas, offsets=offsets)
    v = study.verdict(table, cfg)
    assert (v["outcome"], v["leaning"]) == (outcome, leaning)
    assert v["pairing"] == "same lr 0.002" and v["collapsed_layers"] == []
    dyn = [4.0 + o + d for o, d in zip(offsets, deltas)]
    assert math.isclose(v["seed_spread"], max(np.std(dyn), np.std([4.0 + o for o in offsets])))
    assert math.isclose(v["delta_mean"], np.mean(deltas)) and math.isclose(v["seed_lrs_delta_mean"], np.mean(deltas) - 1.0)
    text = study.verdict_text(v, cfg, 1000, unigram=7.25)
    assert outcome in text and f"{np.mean(deltas):+.3f}" in text and "7.250" in text


def test_verdict_detects_collapse():
    table, cfg = _synthetic((0.1, 0.2), frac=0.01)
    assert study.verdict(table, cfg)["collapsed_layers"] == ["L1"]


def test_unigram_loss(tiny):
    cfg, eval_data, _ = tiny
    loss = study.unigram_loss(cfg, eval_data)
    assert math.log(50) < loss < math.log(8192)  # better than uniform, far from perfect
    stream = study.token_stream(split="train", tokenizer=cfg.tokenizer)
    ids, counts = np.unique(stream, return_counts=True)
    freq = dict(zip(ids.tolist(), counts.tolist()))
    targets = [t for b in eval_data.values() for _, y in b for t in y.flatten().tolist()]
    ref = -np.mean([math.log((freq.get(t, 0) + 1) / (len(stream) + 8192)) for t in targets])
    assert math.isclose(loss, ref, rel_tol=1e-9)


def test_alpha_sweep_and_training_routing(tiny):
    cfg, _, runs = tiny
    sweep = study.alpha_sweep_table(runs.table, cfg)
    assert list(sweep.index) == [0.0, 0.5] and sweep["softmax_frac_L1"].between(0, 1).all()
    long = study.training_routing(runs.results)
    assert set(long["metric"]) >= {"softmax_frac_L1", "entropy_L2", "balance_loss", "tau"}
    assert not long["run"].str.startswith("static").any()


def test_inference_speed(tiny):
    cfg, _, runs = tiny
    speed = study.inference_speed(runs.models["static-lr0.002-a0-s0-n3"], runs.models["dynamic-lr0.002-a0.5-s0-n3"], cfg, rounds=1)
    assert len(speed) == 8 and set(speed["seq_len"]) == {16, 32}
    assert (speed["tokens_per_s"] > 0).all()
    forced = speed.set_index(["model", "seq_len"])["softmax_frac"]
    assert forced[("dynamic (all GDN)", 16)] == 0.0 and forced[("dynamic (all softmax)", 32)] == 1.0
    comp = study.compare_experiments(runs.table, cfg, speed)
    assert comp["dynamic_prefill_tok_s"].iloc[0] == speed.query("model == 'dynamic' and seq_len == 32")["tokens_per_s"].iloc[0]


@pytest.mark.parametrize("text, kind", [(" the", "word"), ("ing", "word piece"), (" Paris", "capitalised word"),
                                        (" 12", "number"), ("):", "punctuation/symbol"), ("\n   ", "newline"),
                                        (" ", "space"), ("x2", "mixed")])
def test_token_type(text, kind):
    assert study.token_type(text) == kind


def test_token_analysis_and_html(tiny):
    cfg, eval_data, runs = tiny
    model = runs.models["dynamic-lr0.002-a0.5-s0-n3"]
    tok = study.route_tokens(model, eval_data, load_tokenizer(cfg.tokenizer))
    n_tokens = sum(x.numel() for batches in eval_data.values() for x, _ in batches)
    assert len(tok) == n_tokens and set(tok["domain"]) == set(eval_data)
    summary = study.routing_summary(model, eval_data)
    assert math.isclose(tok["softmax_L1"].mean(), summary["softmax_frac_L1"], rel_tol=1e-6)
    by_type = study.softmax_share(tok, "type")
    assert by_type["tokens"].sum() == n_tokens
    assert math.isclose((by_type["softmax share L2"] * by_type["tokens"]).sum() / n_tokens, tok["softmax_L2"].mean())
    assert len(study.softmax_share(tok, "position", bins=4)) == 4
    top = study.top_tokens(tok, min_count=2, n=3)
    assert set(top["end"]) == {"most", "least"} and (top["count"] >= 2).all()
    window = tok[(tok["domain"] == "code") & (tok["window"] == 0)]
    page = views.routing_html(window, "code")
    assert page.count("<span title=") == cfg.seq_len and "p_softmax=" in page and "<b>code</b>" in page
    one = window.head(1).assign(token="<a&b>", softmax_L1=True, softmax_L2=True)
    assert "&lt;a&amp;b&gt;" in views.routing_html(one) and views.ROUTE_COLOURS[2] in views.routing_html(one)


def test_figures(tiny):
    cfg, _, runs = tiny
    assert views.plot_training(runs, cfg).axes
    assert views.plot_alpha_sweep(study.alpha_sweep_table(runs.table, cfg)).axes
    speed = pd.DataFrame(dict(model=["static", "dynamic"] * 2, seq_len=[16, 16, 32, 32], tokens_per_s=[1.0, 2.0, 3.0, 4.0]))
    assert views.plot_speed(speed).axes
