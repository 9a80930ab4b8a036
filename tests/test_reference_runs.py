"""The committed reference runs (data/reference/<notebook>/, docs/design.md §7) came from their manifests'
commands: the files match their recorded sha256, and the first logged training steps, re-run here from
the manifest's parameters on the same number of CPU threads, give the recorded losses. A reference run
not made yet (its folder has no manifest) is skipped with the command that makes it."""

import pytest

from routelib.studies import moe_vs_dense
from routelib.studies.attention_routing import reference as attention_reference
from routelib.studies.moe_vs_dense import reference as moe_reference
from routelib.studies.pathways import reference as pathways_reference


@pytest.fixture(scope="module")
def ref03():
    return moe_reference.load_reference()  # raises if a file differs from the manifest


def test_03_manifest_is_complete(ref03):
    man = ref03["manifest"]
    assert man["command"].startswith("python -m routelib.studies.moe_vs_dense reference")
    assert man["commit"] and man["wall_s"] > 0 and man["environment"]["torch_threads"] >= 1
    params = man["params"]
    seeds = params["seeds"]
    expected = {f"{arm}_seed{seeds[0]}" for arm in moe_vs_dense.ARMS}
    expected |= {f"{arm}_seed{s}" for s in seeds[1:] for arm in params["seed_arms"]}
    matched = set(params.get("matched_runs", []))  # the compute-matched arm, merged in with the later seeds
    assert set(ref03["histories"]) == expected | matched
    cfg = moe_vs_dense.MoEStudyConfig(**params["study_config"])
    recomputed = {arm: moe_vs_dense.flops_split(c, cfg.seq_len) for arm, c in cfg.arm_configs().items()}
    for arm, row in ref03["flops_split"].iterrows():  # the committed split is the formula's at the run's shape
        assert row.to_dict() == pytest.approx({k: recomputed[arm][k] for k in row.index}), arm
    tokens = {name: h["tokens"].iloc[-1] for name, h in ref03["histories"].items()}
    assert {tokens[n] for n in expected} == {params["tokens_per_arm"]}  # every arm trained the same tokens
    flops = {name: h["train_flops"].iloc[-1] for name, h in ref03["histories"].items()}
    for name in matched:  # ... but the compute-matched runs: the MoE's training FLOPs
        moe = flops[name.replace(moe_vs_dense.MATCHED, "moe")]
        assert flops[name] == pytest.approx(moe, rel=0.01), name


# dense_total trained from step 0 to the end in one invocation (the others were resumed after
# interrupts, which restarts the window a logged loss averages over)
@pytest.mark.parametrize("arm", ["dense_total"])
def test_03_first_steps_reproduce(ref03, arm, tmp_path):
    log_every = ref03["manifest"]["params"]["log_every"]
    got, recorded = moe_reference.reproduce_first_steps(ref03, f"{arm}_seed{ref03['manifest']['params']['seeds'][0]}",
                                                        tmp_path)
    assert got["step"] == recorded["step"] == log_every
    for key in ("loss", "lm_loss"):
        assert got[key] == pytest.approx(recorded[key], rel=1e-6, abs=1e-7), key


def made_or_skip(study, notebook: str) -> dict:
    """A study's loaded reference run, or a skip naming the command that makes it."""
    ref = study.load_reference_if_made()  # raises if a file differs from the manifest
    if ref is None:
        pytest.skip(f"notebook {notebook}'s reference run is not made yet ({study.REFERENCE_DIR} has no "
                    f"manifest.json); make it with: {study.REFERENCE_LAUNCH}")
    return ref


@pytest.fixture(scope="module")
def ref02():
    return made_or_skip(attention_reference, "02")


def test_02_manifest_is_complete(ref02):
    man, runs = ref02["manifest"], ref02["runs"]
    assert man["command"].startswith("python -m routelib.studies.attention_routing reference")
    assert man["commit"] and man["wall_s"] > 0 and man["environment"]["torch_threads"] >= 1
    plan = attention_reference.reference_plan(ref02["cfg"], ref02["settings"], ref02["summary"]["shared_lr"])
    names = {s.name for s in attention_reference.unique_runs(plan)}
    assert set(runs.index) == set(ref02["histories"]) == names
    assert len(ref02["cfg"].seeds) >= 3 and ref02["summary"]["delta"]["n"] == len(ref02["cfg"].seeds)
    # the bar: every run but the (shorter) sweep-only ones ends >= 1 nat below the unigram model
    compared = runs[runs["groups"] != "lr_sweep"]
    assert (compared["val_loss"] <= ref02["summary"]["unigram_val_loss"] - 1.0).all()


def test_02_first_steps_reproduce(ref02, tmp_path):
    run = attention_reference.shared_run(ref02, "static")
    got, recorded = attention_reference.reproduce_first_steps(ref02, run, tmp_path)
    assert got["step"] == recorded["step"] == ref02["settings"].log_every
    for key in ("loss", "lm_loss"):
        assert got[key] == pytest.approx(recorded[key], rel=1e-6, abs=1e-7), key


@pytest.fixture(scope="module")
def ref01():
    return made_or_skip(pathways_reference, "01")


def test_01_manifest_is_complete(ref01):
    man, runs, cfg = ref01["manifest"], ref01["runs"], ref01["cfg"]
    assert man["command"].startswith("python -m routelib.studies.pathways reference")
    assert man["commit"] and man["wall_s"] > 0 and man["environment"]["torch_threads"] >= 1
    names = {s.name for s in pathways_reference.reference_plan(cfg, ref01["settings"])}
    assert set(runs.index) == set(ref01["histories"]) == names
    # the bar: >= 8 routed layers, >= 2 seeds of the main arm, every run stopped by the rule or the cap
    assert len(ref01["summary"]["routed_layers"]) >= 8 and len(ref01["summary"]["main_runs"]) >= 2
    assert set(runs["stop_reason"]) <= {"recovered", "plateau", "max_steps"}
    assert (cfg.num_pathways, cfg.top_k_pathways) == (16, 4)


def test_01_first_steps_reproduce(ref01, tmp_path):
    run = ref01["summary"]["main_runs"][0]
    got, recorded = pathways_reference.reproduce_first_steps(ref01, run, tmp_path)
    assert got["step"] == recorded["step"] == ref01["settings"].log_every
    for key in ("loss", "lm_loss", "glbl"):
        assert got[key] == pytest.approx(recorded[key], rel=1e-6, abs=1e-7), key
