"""Notebook 01's reference run (routelib.studies.pathways.reference) on a tiny Llama: the plan, the
stop rule, training until it stops with one checkpoint kept and an interrupted run resumed to the same
weights, the bootstrap purity intervals, a run made by two parts side by side and a measuring invocation
(every file hashed, load_reference, the explorer's sample, the first steps reproduced bit for bit), claim
(d) measured on the first main run trained again (control_reference), and the command line's one-line errors."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from routelib import cli, metrics
from routelib.errors import ConfigError
from routelib.reference import ReferenceError
from routelib.studies import pathways as ps
from routelib.studies.pathways import control_content as cc
from routelib.studies.pathways import control_reference as cr
from routelib.studies.pathways import reference as pr

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SETTINGS = dict(seeds=[0, 1], eval_every=3, curve_windows=2, min_steps=6, log_every=1, bootstrap=30)


def tiny_cfg(model_dir, tmp_path, **kw) -> ps.PathwayStudyConfig:
    base = dict(model_name=str(model_dir), num_pathways=8, top_k_pathways=2, routed_layers="1,3",
                domains="news,encyclopedic", seq_len=16, batch_size=4, steps=9, lr=1e-2, warmup_steps=1,
                eval_windows=4, eval_batch_size=4, probe_windows=2, grouping="coactivation", grouping_windows=2, top_tokens=3,
                device="cpu", out_dir=str(tmp_path / "checkpoints"))
    return ps.PathwayStudyConfig(**{**base, **kw})


def settings(**kw) -> pr.ReferenceSettings:
    return pr.ReferenceSettings(**{**SETTINGS, **kw})


# ------------------------------------------------------------------------------------------ plan
def test_plan_main_arm_seeds_then_switch_then_other_grouping():
    cfg = ps.PathwayStudyConfig(grouping="coactivation")
    names = [s.name for s in pr.reference_plan(cfg, settings(seeds=[0, 1, 2]))]
    assert names == ["glbl-coactivation-s0", "glbl-coactivation-s1", "glbl-coactivation-s2",
                     "switch-coactivation-s0", "glbl-contiguous-s0"]
    assert [s.name for s in pr.reference_plan(cfg, settings(switch_arm=False, other_grouping=""))] == \
        ["glbl-coactivation-s0", "glbl-coactivation-s1"]
    switch = pr.run_config(dataclasses.replace(cfg, glbl_weight=0.1), pr.RunSpec("switch", "weights", 3))
    assert (switch.glbl_weight, switch.switch_weight, switch.grouping, switch.seed) == (0.0, 0.1, "weights", 3)


def test_reference_defaults_route_at_least_eight_layers_of_smollm2():
    cfg = ps.PathwayStudyConfig(**pr.REFERENCE_DEFAULTS)
    layers = cfg.layers(30)
    assert len(layers) >= 8 and (cfg.num_pathways, cfg.top_k_pathways) == (16, 4)
    assert cfg.train_scope == "router+mlp" and cfg.glbl_weight > 0 and cfg.momentum > 0


# ------------------------------------------------------------------------------------- stop rule
S = pr.ReferenceSettings(recover_target=0.8, recovery_scale="linear", plateau_tol=0.01, plateau_fraction=0.2,
                         min_steps=100)


@pytest.mark.parametrize("steps, ppls, expected", [
    pytest.param([25, 50], [50.0, 40.0], "recovered", id="recovered"),  # (56 - 40) / (56 - 37) = 0.84
    pytest.param([25, 50], [50.0, 45.0], None, id="still-going"),
    pytest.param([25, 50, 75, 100, 125], [50, 46, 45.2, 45.0, 44.9], "plateau", id="plateau"),  # 45.2 -> 44.9
    pytest.param([25, 50, 75], [50, 45.0, 44.9], None, id="flat-before-min-steps"),
    pytest.param([25, 50, 75, 100, 125], [50, 46, 46, 44, 42], None, id="still-falling"),
    pytest.param([125], [44.9], None, id="no-earlier-evaluation"),
    pytest.param([25, 50, 75, 100, 125, 150, 175, 200], [50, 48, 46, 44, 42, 40.5, 45, 50], "max_steps", id="cap"),
])
def test_stop_rule(steps, ppls, expected):
    reason, facts = pr.stop_rule(steps, ppls, base=37.0, untrained=56.0, max_steps=200, settings=S)
    assert reason == expected
    assert facts["step"] == steps[-1] and facts["recovery"] == pytest.approx((56 - ppls[-1]) / 19)


def test_recovery_scales():
    assert pr.recovery(40.0, 37.0, 56.0, "linear") == pytest.approx(16 / 19)
    assert pr.recovery(40.0, 37.0, 56.0, "log") == pytest.approx(math.log(56 / 40) / math.log(56 / 37))
    # 14 routed layers: untrained 1418, base 21 -- perplexity 293 is 81 % of the gap, but only 38 % in loss
    assert pr.recovery(293.0, 21.0, 1418.0, "linear") > 0.8 > 0.4 > pr.recovery(293.0, 21.0, 1418.0, "log")
    assert math.isnan(pr.recovery(5.0, 6.0, 6.0)) and math.isnan(pr.recovery(5.0, 0.0, 6.0, "log"))
    with pytest.raises(ConfigError, match="recovery scale"):
        pr.recovery(1.0, 1.0, 2.0, "sqrt")
    log = dataclasses.replace(S, recovery_scale="log")
    assert pr.stop_rule([25], [293.0], 21.0, 1418.0, 500, S)[0] == "recovered"
    assert pr.stop_rule([25], [293.0], 21.0, 1418.0, 500, log)[0] is None
    assert pr.stop_rule([25], [45.0], 21.0, 1418.0, 500, log)[0] == "recovered"


def test_stop_rule_plateau_compares_with_the_last_fifth():
    # at step 125 the reference point is the newest evaluation at or before 100 (not 25)
    reason, facts = pr.stop_rule([25, 100, 125], [50.0, 45.0, 44.7], 37.0, 56.0, 500, S)
    assert reason == "plateau" and facts["change"] == pytest.approx(0.3 / 45)
    assert pr.stop_rule([50], [60.0], 37.0, 36.0, 500, S)[0] == "no_gap"


@pytest.mark.parametrize("steps, ppls, match", [
    pytest.param([10, 10], [1.0, 1.0], "increase", id="repeat"),
    pytest.param([10], [1.0, 2.0], "as many", id="lengths"),
    pytest.param([], [], "as many", id="empty"),
])
def test_stop_rule_rejects_bad_curves(steps, ppls, match):
    with pytest.raises(ConfigError, match=match):
        pr.stop_rule(steps, ppls, 1.0, 2.0, 10, S)


# --------------------------------------------------------------------------- training until stop
def test_train_until_keeps_one_checkpoint_and_resumes_after_an_interrupt(tiny_llama_dir, tmp_path, monkeypatch):
    cfg = tiny_cfg(tiny_llama_dir, tmp_path)
    never = settings(plateau_tol=1e-12)  # no plateau; and no recovery against the gap below: runs to the cap

    def start(c):
        model, tok = ps.load_base(c)
        routed = ps.build_routed(model, c, tokenizer=tok)
        curve, _ = pr.reference_data(c, never, tok)
        return routed, ps.training_batches(c, tok), curve

    routed, batch_fn, curve = start(cfg)
    untrained = ps.evaluate(routed, curve).perplexity["overall"]  # base 0: recovery = the relative drop, < 0.8
    result, reason, facts = pr.train_until(routed, cfg, never, batch_fn, curve, 0.0, untrained, "glbl")
    assert (reason, facts["step"], result.step) == ("max_steps", 9, 9)
    folder = next((cfg.run_dir() / "checkpoints").glob("glbl-*"))
    assert sorted(p.name for p in folder.glob("step_*")) == ["step_000009"]  # older chunks' checkpoints pruned
    evals = [r for r in result.history if "eval_ppl" in r]
    assert [r["step"] for r in evals] == [3, 6, 9]
    assert {"eval_utilisation", "eval_load_balance", "eval_max_load", "eval_load_balance_L1", "eval_ppl_news"} <= set(evals[0])
    assert 0 < evals[0]["eval_load_balance"] <= 1 and evals[0]["eval_max_load"] >= 1 / cfg.num_pathways

    # the same run, interrupted after its second chunk and started again, ends with the same weights
    cfg2 = dataclasses.replace(cfg, out_dir=str(tmp_path / "interrupted"))
    calls, real = [], ps.fine_tune

    def interrupted(*args, **kw):
        calls.append(kw["stop_step"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(pr, "fine_tune", interrupted)
    routed2, batch_fn2, _ = start(cfg2)
    with pytest.raises(KeyboardInterrupt):
        pr.train_until(routed2, cfg2, never, batch_fn2, curve, 0.0, untrained, "glbl")
    monkeypatch.setattr(pr, "fine_tune", real)
    routed2, batch_fn2, _ = start(cfg2)  # a new process: fresh model, resumes from step 6
    again, reason2, _ = pr.train_until(routed2, cfg2, never, batch_fn2, curve, 0.0, untrained, "glbl")
    assert reason2 == "max_steps" and [r["step"] for r in again.history if "eval_ppl" in r] == [3, 6, 9]
    for (k, a), b in zip(routed.state_dict().items(), routed2.state_dict().values()):
        assert torch.equal(a, b), k


def test_train_until_stops_when_recovered(tiny_llama_dir, tmp_path):
    cfg = tiny_cfg(tiny_llama_dir, tmp_path, routed_layers="1")
    model, tok = ps.load_base(cfg)
    routed = ps.build_routed(model, cfg, tokenizer=tok)
    curve, _ = pr.reference_data(cfg, settings(), tok)
    ppl = ps.evaluate(routed, curve).perplexity["overall"]
    # any perplexity below 10x the untrained one counts as recovered against this made-up gap
    result, reason, facts = pr.train_until(routed, cfg, settings(recovery_scale="linear"), ps.training_batches(cfg, tok), curve,
                                           base_ppl=0.0, untrained_ppl=10 * ppl, name="glbl")
    assert reason == "recovered" and facts["step"] == result.step == 3 and facts["recovery"] >= 0.8


# ------------------------------------------------------------------------------ purity intervals
def planted_sample(n_windows=20, length=30, num_pathways=4, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 40, size=n_windows * length)
    sample = ps.RoutingSample(tokens, np.where(np.arange(tokens.size) < tokens.size // 2, "a", "b"),
                              np.repeat(np.arange(n_windows), length))
    return sample, (tokens % num_pathways)[:, None]  # a router choosing by token id: pure pathways


def test_bootstrap_mean_purity_matches_the_plain_metric():
    sample, idx = planted_sample()
    rand = metrics.random_topk(len(sample), 4, 2, seed=1)
    for sel in (idx, rand):
        draws = np.vstack([np.ones(20, dtype=np.int64), np.full(20, 2)])  # every window once; twice
        got = pr.bootstrap_mean_purity(sample.tokens, sample.seq_ids, sel, draws, 4, 64)
        want = metrics.pathway_metrics(sample.tokens, sel, 4, 64).mean_purity
        assert got == pytest.approx([want, want], rel=1e-9)
    one = np.zeros((1, 20), dtype=np.int64)
    one[0, 3] = 1  # a resample of window 3 alone
    got = pr.bootstrap_mean_purity(sample.tokens, sample.seq_ids, idx, one, 4, 64)
    w = sample.seq_ids == 3
    assert got[0] == pytest.approx(metrics.pathway_metrics(sample.tokens[w], idx[w], 4, 64).mean_purity)


def test_purity_intervals_separate_a_planted_router_from_controls():
    sample, idx = planted_sample()
    routers = {"fine-tuned": {5: idx}, "random top-k": {5: metrics.random_topk(len(sample), 4, 1, seed=2)}}
    table = pr.purity_intervals(sample, routers, 4, 64, resamples=200, seed=0)
    assert set(table["domain"]) == {"all", "a", "b"} and set(table["layer"]) == {"5", "all"}
    assert set(table.loc[table["domain"] == "a", "windows"]) == {10}
    row = table[(table["router"] == "fine-tuned") & (table["layer"] == "all") & (table["domain"] == "all")].iloc[0]
    rnd = table[(table["router"] == "random top-k") & (table["layer"] == "all") & (table["domain"] == "all")].iloc[0]
    assert row["purity_low"] <= row["purity"] <= row["purity_high"]
    assert row["excess_low"] > 0 and row["trained_minus"] == 0.0  # pure beyond its load pattern
    assert rnd["excess_low"] < 0.02 and rnd["trained_minus_low"] > 0  # the interval excludes the control
    with pytest.raises(ConfigError, match="no router"):
        pr.purity_intervals(sample, routers, 4, 64, trained="nope")
    with pytest.raises(ConfigError, match="resamples"):
        pr.purity_intervals(sample, routers, 4, 64, resamples=0)


# --------------------------------------------------------------------------- the run, end to end
@pytest.fixture(scope="module")
def made(tiny_llama_dir, tmp_path_factory):
    """The tiny reference run made as the lead would: two parts (here one after the other), then the
    measuring invocation. Counts how often each run is trained."""
    tmp = tmp_path_factory.mktemp("ref01")
    cfg, s, out = tiny_cfg(tiny_llama_dir, tmp), settings(), tmp / "reference"
    trained, record = [], pr.train_and_record

    def counting(spec, *args):
        trained.append(spec.name)
        return record(spec, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pr, "train_and_record", counting)
        for part in [(1, 2), (2, 2)]:
            assert pr.reference_run(cfg, s, out, part=part, command=f"test part {part}") is None
        manifest = pr.reference_run(cfg, s, out, command="test final")
    return cfg, s, out, trained, manifest


def test_every_run_once_with_its_files(made):
    cfg, s, out, trained, manifest = made
    names = [sp.name for sp in pr.reference_plan(cfg, s)]
    assert sorted(trained) == sorted(names)  # every run once, none by the measuring invocation
    ref = pr.load_reference(out)
    assert list(ref["runs"].index) == names and set(ref["histories"]) == set(names)
    for name, row in ref["runs"].iterrows():
        h = ref["histories"][name]
        assert row["stop_reason"] in pr.STOP_REASONS and h["step"].iloc[0] == 0
        assert h["eval_ppl"].iloc[0] == pytest.approx(row["curve_untrained_ppl"])
        assert row["stop_tokens"] == row["stop_step"] * cfg.batch_size * cfg.seq_len
        assert {"ppl_base_overall", "ppl_trained_news", "ppl_untrained_encyclopedic"} <= set(row.index)
        orders = ref["orders"](name)
        if row["grouping"] == "contiguous":
            assert orders == {}
        else:  # the grouping each run trained with, stored when it started
            assert sorted(orders) == [1, 3] and all(sorted(o.tolist()) == list(range(64)) for o in orders.values())
        err = ref["selection_error"][name]
        assert set(err.index.get_level_values("router_state")) == {"untrained", "trained"}
        assert set(err.index.get_level_values("layer")) == {1, 3} and {"router", "random", "best_k"} <= set(err.columns)
    invocations = json.loads((out / "invocations.json").read_text())
    assert [i["command"] for i in invocations] == ["test part (1, 2)", "test part (2, 2)", "test final"]
    assert manifest["invocations"] == 3 and manifest["params"]["settings"]["seeds"] == [0, 1]


def test_measurements(made):
    cfg, s, out, _, _ = made
    ref = pr.load_reference(out)
    ge = ref["grouping_error"]
    assert list(ge.index) == [1, 3] and {g for g, _ in ge.columns} == {"coactivation", "contiguous"}
    purity = ref["purity"]
    assert set(purity["router"]) == set(ps.ROUTERS) and set(purity["run"]) == set(ref["runs"].index)
    first = ref["summary"]["main_runs"][0]
    assert set(purity.loc[purity["run"] == first, "domain"]) == {"all", "news", "encyclopedic"}  # per domain: main run
    assert set(purity.loc[purity["run"] != first, "domain"]) == {"all"}
    assert set(purity["layer"]) == {"1", "3", "all"}
    assert (purity["purity_low"] <= purity["purity_high"]).all()
    paths_table = ref["pathways"]
    assert len(paths_table) == 2 * cfg.num_pathways and set(paths_table["rank"]) == set(range(1, cfg.num_pathways + 1))
    # the explorer browses the stored sample
    from routelib.studies.pathways.views import pathway_explorer

    sample = ref["sample"](first)
    assert set(sample.selections) == {1, 3} and len(sample) == 2 * cfg.eval_windows * cfg.seq_len
    per = ps.layer_metrics(sample, sample.selections, cfg.num_pathways, 8192)
    from routelib.data import load_tokenizer

    tok = load_tokenizer("bpe8k")
    assert pathway_explorer(sample, per, tok.decode) is not None
    untrained = ref["sample"](first, "untrained")
    assert np.array_equal(untrained.tokens, sample.tokens)


def test_views_of_the_reference(made):
    cfg, _, out, _, _ = made
    ref = pr.load_reference(out)
    sample, per_router = pr.reference_routers(ref)
    assert list(per_router) == list(ps.ROUTERS) and set(per_router["fine-tuned"]) == {1, 3}
    summary = ps.summary_table(per_router)
    first = ref["summary"]["main_runs"][0]
    stored = ref["purity"].query("run == @first and domain == 'all' and layer == '1'").set_index("router")["purity"]
    assert summary.query("layer == 1").set_index("router")["mean_purity"].to_dict() == pytest.approx(stored.to_dict())
    curves = pr.recovery_curves(ref)
    assert set(curves["run"]) == set(ref["runs"].index) and (curves.groupby("run")["step"].min() == 0).all()
    start = curves[curves["step"] == 0]
    assert np.allclose(start["recovery_log"], 0.0) or start["recovery_log"].isna().all()  # untrained: no recovery


def test_reading_tables(made):
    cfg, s, out, _, _ = made
    ref = pr.load_reference(out)
    header = pr.reference_header(ref)
    assert "test final" in header and "2 routed layers (1..3" in header and f"top-{cfg.top_k_pathways} of 8" in header
    assert pr.reference_header(None) == f"reference run not yet made: {pr.REFERENCE_LAUNCH}"
    runs = pr.runs_table(ref)
    assert list(runs.index) == list(ref["runs"].index)
    assert (runs["ppl_base"] == ref["runs"]["ppl_base_overall"]).all() and set(runs["stop"]) <= set(pr.STOP_REASONS)
    table = pr.purity_summary(ref)
    assert list(table.columns) == ["purity", "excess", "trained_minus"] and len(table) == 4 * len(runs)
    first = ref["summary"]["main_runs"][0]
    row = ref["purity"].query("run == @first and router == 'untrained' and layer == 'all' and domain == 'all'").iloc[0]
    assert table.loc[(first, "untrained"), "purity"] == (f"{row['purity']:.4f} [{row['purity_low']:.4f}, "
                                                         f"{row['purity_high']:.4f}]")
    assert len(pr.purity_summary(ref, layer=3, domain="news")) == 4  # per domain: the first main run only
    with pytest.raises(ConfigError, match="no purity rows for layer='7'"):
        pr.purity_summary(ref, layer="7")
    one_run = pr.interval_table(ref["purity"].query("run == @first").drop(columns="run"))  # a live run's frame
    assert list(one_run.index) == list(ps.ROUTERS) and one_run.loc["untrained"].equals(table.loc[(first, "untrained")])
    errors = pr.selection_error_summary(ref)
    assert list(errors.columns) == ["router", "random", "best_k"]
    assert set(errors.index) == {(r, st) for r in runs.index for st in ("trained", "untrained")}
    assert errors.loc[(first, "trained"), "best_k"] == pytest.approx(ref["selection_error"][first].loc["trained", "best_k"].mean())


def test_verdict_follows_the_paired_intervals(made):
    _, _, out, _, _ = made
    ref = pr.load_reference(out)
    v = pr.reference_numbers(ref)
    main = ref["summary"]["main_runs"]
    overall = ref["purity"].query("layer == 'all' and domain == 'all'").set_index(["run", "router"])
    for c in ("untrained", "random top-k", "permuted"):  # above: every main run's paired interval is > 0
        assert v["above"][c] == all(overall.loc[(r, c), "trained_minus_low"] > 0 for r in main)
    assert v["cells"]["layer"][1] == 2 * len(main) and v["cells"]["domain"][1] == 2  # 2 layers; 2 domains, first run
    assert 0 <= v["purest"]["token_share"] <= v["max_token_share"] <= 1
    lows, highs = zip(*[(t[1], t[2]) for t in v["trained"].values()])
    assert v["arms_overlap"] == (max(lows) <= min(highs))
    assert ("these intervals all overlap" in pr.reference_verdict(ref)) == v["arms_overlap"]

    def with_gap(low, high):  # the same reference, every paired difference's interval set to [low, high]
        purity = ref["purity"].copy()
        trained = purity["router"] == "fine-tuned"
        purity.loc[~trained, ["trained_minus", "trained_minus_low", "trained_minus_high"]] = [(low + high) / 2, low, high]
        return pr.reference_verdict({**ref, "purity": purity})

    assert "more token-specific than every control**, by intervals that exclude them" in with_gap(0.01, 0.02)
    assert "not distinguishable from the controls**" in with_gap(-0.01, 0.02)
    assert "less token-specific than a control**" in with_gap(-0.02, -0.01)
    assert all(name in with_gap(0.01, 0.02) for name in ref["runs"].index)


@pytest.mark.parametrize("token", [".", " of", "it's", "a:b", "\\", '"', "' '"])
def test_first_top_token_reads_any_token_repr(token):
    assert pr.first_top_token(f"{token!r}:12 ' x':3") == (repr(token), 12)
    with pytest.raises(ConfigError, match="expected repr"):
        pr.first_top_token("of:12")


def test_reference_figures(made):
    import matplotlib.pyplot as plt

    from routelib.studies.pathways import views

    _, s, out, _, _ = made
    ref = pr.load_reference(out)
    first = ref["summary"]["main_runs"][0]
    fig = views.plot_recovery_curves(pr.recovery_curves(ref), ref["summary"]["base_ppl"], s.recover_target)
    assert len(fig.axes[0].lines) == len(ref["runs"]) + 1  # one line per run and the base model
    for by, n in (("layer", 2), ("domain", 2)):
        fig = views.plot_purity_intervals(ref["purity"], first, by=by)
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()][:n] and len(fig.axes) == 2
    assert len(views.plot_balance_over_training(ref["histories"], ref["runs"]).axes[1].lines) == len(ref["runs"])
    with pytest.raises(ConfigError, match="by='seed'"):
        views.plot_purity_intervals(ref["purity"], first, by="seed")
    with pytest.raises(ConfigError, match="no rows for run 'nope'"):
        views.plot_purity_intervals(ref["purity"], "nope")
    plt.close("all")


def test_manifest_hashes_every_file_and_refuses_changes(made, tmp_path):
    import shutil

    _, _, out, _, manifest = made
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 5e6
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "summary.json").write_text((copy / "summary.json").read_text().replace("{", "{ ", 1))
    with pytest.raises(ReferenceError, match="summary.json: sha256 differs"):
        pr.load_reference(copy)


def test_first_steps_reproduce(made, tmp_path):
    _, _, out, _, _ = made
    ref = pr.load_reference(out)
    run = ref["summary"]["main_runs"][0]
    got, recorded = pr.reproduce_first_steps(ref, run, tmp_path / "a")  # the grouping recomputed equals the stored one
    assert got["step"] == recorded["step"] == ref["settings"].log_every
    for key in ("loss", "lm_loss", "glbl"):
        assert got[key] == recorded[key], key  # bit-exact on CPU
    flipped = {i: o.flip(0) for i, o in ref["orders"](run).items()}
    with pytest.raises(ReferenceError, match="grouping differs from the stored one"):
        pr.reproduce_first_steps({**ref, "orders": lambda _: flipped}, run, tmp_path / "b")


def test_a_finished_run_is_not_retrained(made, monkeypatch):
    cfg, s, out, _, _ = made
    monkeypatch.setattr(pr, "train_and_record", lambda *a: pytest.fail("retrained a finished run"))
    assert pr.reference_run(cfg, s, out, part=(1, 2), command="again") is None


def test_not_made_yet(tmp_path):
    assert pr.load_reference_if_made(tmp_path) is None
    with pytest.raises(ReferenceError, match="no manifest"):
        pr.load_reference(tmp_path)


# ------------------------------------------------------------------- claim (d) on the reference model
def test_control_reference_retrains_the_first_main_run_bit_for_bit_and_measures_it(made, tmp_path):
    cfg, s, made_out, _, _ = made
    out = tmp_path / "reference"  # a copy, its manifest written again: other tests add invocations to the original
    shutil.copytree(made_out, out)
    pr.reference_run(cfg, s, out, command="test copy")
    assert cr.load_control_reference_if_made(tmp_path / "cc") is None
    assert cr.control_reference_header(None) == ("claim (d) on the reference model not yet measured: python -m "
                                                 "routelib.studies.pathways control-reference --threads 1")
    small = cc.ControlContentConfig(tokens_per_domain=64, top_tokens=5, permutations=1, probe_steps=5)
    manifest = cr.control_reference(tmp_path / "cc", tmp_path / "work", command="test control", reference_dir=out,
                                    control_cfg=small)
    assert set(manifest["files"]) == {f"{name}.csv" for name in cr.TABLES} | {"summary.json", "invocations.json"}
    cref = cr.load_control_reference(tmp_path / "cc")  # every file checked against the manifest
    summary = cref["summary"]
    assert summary["run"] == "glbl-coactivation-s0" and summary["record_equal"], summary["record_differences"]
    assert manifest["params"]["control_config"]["tokens_per_domain"] == 64 and manifest["command"] == "test control"
    lines = cc.verdicts(cref)  # the tables read back are what the notebook's sentences take
    assert lines[-1].startswith("router W (paper, E): claim (d) ") and "(no interval)" in lines[-1]  # 2 routed layers
    assert len(cc.random_control_lines(cref)) == 2 and set(cref["variance_shares"]["layer"]) == {1, 3}
    header = cr.control_reference_header(cref).splitlines()
    assert header[0] == "command: test control" and "equals the committed one in every field but train_tokens_per_s" in header[2]
    assert header[3] == summary["data"] and "routed layers 1, 3" in header[3]
    (tmp_path / "cc" / "probes.csv").write_text("changed")
    with pytest.raises(ReferenceError, match="sha256"):
        cr.load_control_reference(tmp_path / "cc")


def test_compare_records_names_every_differing_field_but_the_speed():
    committed = {"run": "a", "stop_step": 10, "ppl": {"x": 1.5}, "change": math.nan, "train_tokens_per_s": 100.0}
    assert cr.compare_records({**committed, "train_tokens_per_s": 90.0}, committed) == {}  # NaN equals NaN
    got = {**committed, "ppl": {"x": 1.5000000000000002}, "extra": 1}
    assert cr.compare_records(got, committed) == {"ppl": {"got": {"x": 1.5000000000000002}, "committed": {"x": 1.5}},
                                                  "extra": {"got": 1, "committed": None}}


def test_control_reference_command_line(capsys, tmp_path):
    from routelib.studies.pathways.__main__ import main

    assert cli.run(main, ["control-reference", "--threads", "-1", "--out", str(tmp_path / "cc")]) == 2
    assert capsys.readouterr().err.strip() == "error: --threads -1: need >= 0" and not (tmp_path / "cc").exists()
    assert cli.run(main, ["control-reference", "--nope"]) == 2
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


# -------------------------------------------------------------------------------- command line
@pytest.mark.parametrize("argv, needle", [
    (["reference", "--seeds", "0,x"], "--seeds 'x': expected an integer"),
    (["reference", "--seeds", "1,1"], "distinct"),
    (["reference", "--steps", "0"], "steps must be >= 1"),
    (["reference", "--grouping", "random"], "grouping='random'"),
    (["reference", "--other_grouping", "blocks"], "other_grouping='blocks'"),
    (["reference", "--recover_target", "1.5"], "recover_target=1.5"),
    (["reference", "--plateau_fraction", "1"], "plateau_fraction"),
    (["reference", "--recovery_scale", "sqrt"], "recovery_scale='sqrt'"),
    (["reference", "--eval_every", "0"], "eval_every=0"),
    (["reference", "--switch_arm", "maybe"], "expected true or false"),
    (["reference", "--no_such_option", "1"], "unrecognized arguments"),
    (["reference", "--only_runs", "glbl-x-s0"], "only_runs: glbl-x-s0 not in the plan"),
])
def test_bad_command_lines_are_one_line_errors(argv, needle, capsys, tmp_path):
    assert cli.run(pr.main, [*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written
