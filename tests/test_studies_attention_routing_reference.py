"""Notebook 02's reference run (routelib.studies.attention_routing.reference) and its views on a tiny
configuration: the plan, the LR sweep's choice, a run trained
by two parts side by side and finished by a measuring invocation (each run trained once, every planned
run on disk, manifest hashes, load_reference, first steps reproduced), the verdict, figures, the CLI."""

import json
import shutil

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from routelib import cli  # noqa: E402
from routelib.errors import ConfigError  # noqa: E402
from routelib.reference import ReferenceError, t_interval  # noqa: E402
from routelib.studies.attention_routing import reference as ref_run  # noqa: E402
from routelib.studies.attention_routing import HybridStudyConfig  # noqa: E402
from routelib.studies.attention_routing import views  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=16, num_heads=2, intermediate_size=32, seq_len=16, batch_size=2, steps=4, warmup_steps=1,
            lr_static=1e-3, lr_dynamic=2e-3, lr_same=[1e-3, 3e-3], seeds=[0, 1, 2], alpha_sweep=[0.0, 0.5],
            balance_coef=0.5, alpha_sweep_steps=2, eval_every=2, eval_windows=2, speed_seq_lens=[16], speed_batch=2,
            bench_min_time_s=0.01, device="cpu")
SETTINGS = dict(sweep_steps=2, log_every=1, ckpt_every=2, prefill_seq_lens=[16, 32], speed_rounds=1, position_bins=2,
                wait_s=0.0)


def tiny_cfg(tmp_path, **kw) -> HybridStudyConfig:
    return HybridStudyConfig(**{**TINY, "out_dir": str(tmp_path / "checkpoints"), **kw})


def test_plan_groups_and_shared_runs():
    cfg, settings = HybridStudyConfig(**TINY), ref_run.ReferenceSettings(**SETTINGS)
    assert list(ref_run.reference_plan(cfg, settings)) == ["lr_sweep"]  # the rest waits for the shared rate
    plan = ref_run.reference_plan(cfg, settings, shared_lr=1e-3)
    assert [(s.arm, s.lr, s.steps) for s in plan["lr_sweep"]] == [
        ("static", 1e-3, 2), ("dynamic", 1e-3, 2), ("static", 3e-3, 2), ("dynamic", 3e-3, 2)]
    assert [(s.arm, s.seed) for s in plan["shared"]] == [(a, s) for s in (0, 1, 2) for a in ("static", "dynamic")]
    assert {(s.arm, s.lr) for s in plan["seed_lrs"]} == {("static", 1e-3), ("dynamic", 2e-3)}
    assert [(s.alpha, s.lr, s.steps) for s in plan["alpha"]] == [(0.0, 1e-3, 2), (0.5, 1e-3, 2)]
    # static at the original project's 1e-3 is the shared run of seed 0; dynamic alpha 0.5 at 2 steps is its sweep run
    assert len(ref_run.unique_runs(plan)) == 4 + 6 + 1 + 1


def test_sweep_picks_the_lowest_mean_over_both_arms():
    cfg, settings = HybridStudyConfig(**{**TINY, "lr_same": [1e-3, 2e-3, 4e-3]}), ref_run.ReferenceSettings(**SETTINGS)
    losses = {(1e-3, "static"): 5.0, (1e-3, "dynamic"): 6.0,  # best static, worst mean
              (2e-3, "static"): 5.2, (2e-3, "dynamic"): 5.3,  # best mean (5.25)
              (4e-3, "static"): 5.6, (4e-3, "dynamic"): 5.0}  # best dynamic
    finals = {s.name: {"val_loss": losses[(s.lr, s.arm)]} for s in ref_run.reference_plan(cfg, settings)["lr_sweep"]}
    table = ref_run.sweep_table(cfg, settings, finals)
    assert table["chosen"].tolist() == [False, True, False]
    assert table.loc[2e-3, "mean_val_loss"] == pytest.approx(5.25)
    del finals[next(iter(finals))]
    assert ref_run.sweep_table(cfg, settings, finals) is None  # a sweep run unfinished: no choice yet


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny reference run made as the lead would: two parts side by side (here one after the
    other: part 1 stops while part 2's sweep runs are missing, and is resumed), then the measuring
    invocation. Counts how often each run is trained."""
    tmp = tmp_path_factory.mktemp("ref02")
    cfg, settings, out = tiny_cfg(tmp), ref_run.ReferenceSettings(**SETTINGS), tmp / "reference"
    trained, record = [], ref_run._train_and_record

    def counting(spec, *args):
        trained.append(spec.name)
        return record(spec, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ref_run, "_train_and_record", counting)
        for part in [(1, 2), (2, 2), (1, 2)]:
            assert ref_run.reference_run(cfg, settings, out, part=part, command=f"test part {part}") is None
        manifest = ref_run.reference_run(cfg, settings, out, command="test final")
    return cfg, settings, out, trained, manifest


def test_parts_train_each_run_once_and_the_plan_is_on_disk(made):
    cfg, settings, out, trained, manifest = made
    ref = ref_run.load_reference(out)
    plan = ref_run.reference_plan(cfg, settings, ref["summary"]["shared_lr"])
    names = {s.name for s in ref_run.unique_runs(plan)}
    assert sorted(trained) == sorted(names)  # every run once, none by the measuring invocation
    assert set(ref["runs"].index) == names == set(ref["histories"])
    assert {p.stem for p in (out / "final").glob("*.json")} == names
    for name in names:
        h = ref["histories"][name]
        assert h["step"].iloc[-1] == ref["runs"].loc[name, "steps"] and h["tokens"].iloc[-1] == ref["runs"].loc[name, "tokens"]
        assert h["eval_loss"].notna().any()
    shared = ref_run.shared_run(ref, "dynamic")  # 4 steps, a checkpoint every 2
    assert sorted(p.name for p in (cfg.run_dir() / "checkpoints").glob(f"{shared}-*/step_*")) == ["step_000002", "step_000004"]
    dynamic = next(n for n in names if n.startswith("dynamic"))
    assert {"softmax_frac_L1", "entropy_L2", "balance_loss"} <= set(ref["histories"][dynamic].columns)
    invocations = json.loads((out / "invocations.json").read_text())
    assert [i["command"] for i in invocations] == ["test part (1, 2)", "test part (2, 2)", "test part (1, 2)", "test final"]
    assert all(i["finished"] and i["wall_s"] >= 0 for i in invocations)
    assert manifest["invocations"] == 4 and manifest["wall_s"] == pytest.approx(sum(i["wall_s"] for i in invocations), abs=0.1)


def test_sweep_delta_and_summary_agree_with_the_runs(made):
    cfg, _, out, _, _ = made
    ref = ref_run.load_reference(out)
    runs, sweep, summary = ref["runs"], ref["lr_sweep"], ref["summary"]
    assert summary["shared_lr"] == sweep.index[sweep["chosen"]][0] == sweep["mean_val_loss"].idxmin()
    for lr in cfg.lr_same:
        sweep_runs = runs[runs["groups"].str.contains("lr_sweep") & np.isclose(runs["lr"], lr)]
        assert sweep.loc[lr, "mean_val_loss"] == pytest.approx(sweep_runs["val_loss"].mean())
    shared = runs[runs["groups"].str.contains("shared")]
    assert set(shared["lr"]) == {summary["shared_lr"]} and sorted(shared["seed"]) == [0, 0, 1, 1, 2, 2]
    by_seed = shared.pivot_table(index="seed", columns="arm", values="val_loss")
    deltas = (by_seed["dynamic"] - by_seed["static"]).to_numpy()
    assert ref["delta"]["delta"].to_numpy() == pytest.approx(deltas)
    assert summary["delta"] == pytest.approx(t_interval(deltas))
    assert summary["unigram_val_loss"] > 7  # a unigram model on bpe8k
    domains = [c for c in runs.columns if c.startswith("val_loss_")]
    assert len(domains) == 5 and runs[domains].notna().all().all()


def test_measurements(made):
    cfg, settings, out, _, _ = made
    ref = ref_run.load_reference(out)
    assert set(ref["train_speed"]["arm"]) == {"static", "dynamic"} and (ref["train_speed"]["tokens_per_s"] > 0).all()
    pre = ref["prefill_speed"]
    assert set(pre.loc[pre["batch"] == cfg.speed_batch, "seq_len"]) == {cfg.seq_len}
    assert set(pre.loc[pre["batch"] == 1, "seq_len"]) == set(settings.prefill_seq_lens)
    routing = ref["routing"]
    dynamic = {n for n in ref["runs"].index if n.startswith("dynamic") and "lr_sweep" != ref["runs"].loc[n, "groups"]}
    assert set(routing["run"]) == dynamic
    one = routing[routing["run"] == next(iter(dynamic))]
    assert set(one["by"]) == {"domain", "type", "position"} and set(one["layer"]) == {"L1", "L2"}
    n_tokens = 5 * cfg.eval_windows * cfg.seq_len
    for by, grp in one[one["layer"] == "L1"].groupby("by"):
        assert grp["tokens"].sum() == n_tokens, by  # every held-out token in one group
    assert len(one[(one["by"] == "position") & (one["layer"] == "L1")]) == settings.position_bins
    alpha = ref_run.alpha_table(ref)
    assert list(alpha.index) == cfg.alpha_sweep and alpha["softmax_frac_L1"].between(0, 1).all()


def test_manifest_hashes_every_file_and_refuses_changes(made, tmp_path):
    _, _, out, _, manifest = made
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "delta.csv").write_text((copy / "delta.csv").read_text().replace("0", "1", 1))
    with pytest.raises(ReferenceError, match="delta.csv: sha256 differs"):
        ref_run.load_reference(copy)


def test_first_steps_reproduce(made, tmp_path):
    _, _, out, _, _ = made
    ref = ref_run.load_reference(out)
    run = ref_run.shared_run(ref, "static")
    assert ref["runs"].loc[run, "groups"].startswith("shared") and ref["runs"].loc[run, "seed"] == 0
    got, recorded = ref_run.reproduce_first_steps(ref, run, tmp_path)
    assert got["step"] == recorded["step"] == 1
    for key in ("loss", "lm_loss"):
        assert got[key] == recorded[key], key  # bit-exact on CPU


def test_verdict_and_figures(made):
    _, _, out, _, _ = made
    ref = ref_run.load_reference(out)
    v = ref_run.reference_numbers(ref)
    d = ref["summary"]["delta"]
    assert v["interval_excludes_zero"] == (d["low"] > 0 or d["high"] < 0)
    assert v["below_unigram_by_1nat"] is False  # 4 steps of a tiny model learn nothing
    text = ref_run.reference_verdict(ref)
    assert f"{d['mean']:+.3f}" in text and f"[{d['low']:+.3f}, {d['high']:+.3f}]" in text and "MISSES" in text
    speed = ref["train_speed"].set_index("arm")["tokens_per_s"]
    assert v["train_speed_ratio"] == pytest.approx(speed["dynamic"] / speed["static"]) and v["longest"] == 32
    assert f"{v['prefill_ratio_longest']:.2f}x at 32 tokens" in text
    assert views.plot_reference_curves(ref).axes and views.plot_reference_delta(ref).axes
    assert len(views.plot_reference_routing(ref, ref_run.shared_run(ref, "dynamic", seed=1)).axes) == 3
    head = ref_run.reference_header(ref)
    assert "command: test final" in head and f"shared learning rate {ref['summary']['shared_lr']:g}" in head
    assert views.plot_alpha_sweep(ref_run.alpha_table(ref)).axes


def test_not_made_yet(tmp_path):
    assert ref_run.load_reference_if_made(tmp_path) is None
    assert ref_run.reference_header(None) == f"reference run not yet made: {ref_run.REFERENCE_LAUNCH}" and "\n" not in ref_run.REFERENCE_LAUNCH
    with pytest.raises(ReferenceError, match="no manifest"):
        ref_run.load_reference(tmp_path)


@pytest.mark.parametrize("argv, needle", [
    (["reference", "--seeds", "0,x"], "--seeds 'x': expected an integer"),
    (["reference", "--steps", "0"], "steps >= 1"),
    (["reference", "--sweep_steps", "0"], "sweep_steps=0"),
    (["reference", "--no_such_option", "1"], "unrecognized arguments"),
])
def test_bad_command_lines_are_one_line_errors(argv, needle, capsys):
    assert cli.run(ref_run.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_only_runs_must_name_planned_runs(made, tmp_path):
    cfg, settings, out, _, _ = made
    shutil.copytree(out, tmp_path / "copy")  # the invocation is logged there, not in the shared folder
    with pytest.raises(ConfigError, match="only_runs: nope not in the plan"):
        ref_run.reference_run(cfg, settings, tmp_path / "copy", only_runs=("nope",), command="test")
