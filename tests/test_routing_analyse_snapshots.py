"""routelib.routing.analyse.snapshots and the subject's training snapshots (routelib.studies.moe_vs_dense)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from routelib.models import LM
from routelib.routing.analyse import snapshots as S
from routelib.routing.analyse.weights import checkpoint_steps, hf_from_checkpoint, hf_from_lm, moe_weights
from routelib.studies import moe_vs_dense as study
from routelib.studies.moe_vs_dense import subject

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = study.MoEStudyConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=32,
                               num_experts=4, top_k=2, seq_len=32, batch_size=4, steps=4, warmup_steps=1,
                               ckpt_every=2, eval_windows=2, card_seq_len=16, snapshot_seq_len=16, snapshot_windows=2,
                               device="cpu", out_dir=str(tmp_path_factory.mktemp("subject")))
    model, result = study.train_arm("moe", cfg.moe_config(), cfg, study.training_batches(cfg))
    snaps = subject.subject_snapshots(cfg, cfg.moe_config(), Path(result.checkpoint).parent)
    return cfg, model, result, snaps


def test_subject_snapshots_cover_the_initialisation_and_every_checkpoint(run):
    cfg, model, result, snaps = run
    assert snaps.steps.tolist() == [0, 2, 4]
    n = 5 * cfg.snapshot_windows * cfg.snapshot_seq_len  # five corpus domains
    assert snaps.routers.shape == (3, 2, 4, 32) and snaps.experts.shape == (3, n, 2, 2)
    assert snaps.experts.dtype == np.int8 and len(snaps.domains) == len(snaps.token_ids) == n
    final = moe_weights(hf_from_lm(model)).routers().numpy()
    np.testing.assert_array_equal(snaps.routers[-1], final)  # the last checkpoint is the trained model
    torch.manual_seed(cfg.seed)
    init = moe_weights(hf_from_lm(LM(cfg.moe_config()))).routers().numpy()
    np.testing.assert_array_equal(snaps.routers[0], init)  # step 0 is the run's own initialisation
    assert not np.array_equal(snaps.routers[0], snaps.routers[-1])


def test_snapshot_routing_is_what_the_checkpoint_routes(run):
    cfg, _, result, snaps = run
    step, folder = checkpoint_steps(Path(result.checkpoint).parent)[0]
    batches = study.domain_eval_data(study.dataclasses.replace(cfg, seq_len=cfg.snapshot_seq_len,
                                                               eval_windows=cfg.snapshot_windows))
    routers, experts, domains, tokens = S.snapshot(hf_from_checkpoint(folder), batches)
    i = snaps.steps.tolist().index(step)
    np.testing.assert_array_equal(experts, snaps.experts[i])
    np.testing.assert_array_equal(tokens, snaps.token_ids)
    assert list(dict.fromkeys(domains)) == list(batches)


def test_save_and_load_round_trip(run, tmp_path):
    snaps = run[3]
    back = S.load_snapshots(S.save_snapshots(snaps, tmp_path / "s.npz"))
    for name in ("steps", "routers", "experts", "domains", "token_ids"):
        np.testing.assert_array_equal(getattr(back, name), getattr(snaps, name))
    assert set(back.experts_by_step()) == {0, 2, 4} and back.routers_by_step()[4].shape == (2, 4, 32)


def test_bad_snapshot_files_name_the_problem(run, tmp_path):
    snaps = run[3]
    with pytest.raises(S.SnapshotError, match="no such snapshot file"):
        S.load_snapshots(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(S.SnapshotError, match="junk.npz: not a readable"):
        S.load_snapshots(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(S.SnapshotError, match="not a routelib-training-snapshots file"):
        S.load_snapshots(tmp_path / "other.npz")
    bad = S.Snapshots.__new__(S.Snapshots)
    bad.__dict__.update(vars(snaps), experts=snaps.experts.copy())
    bad.experts[0, 0, 0, 0] = 9  # only 4 experts
    path = S.save_snapshots(bad, tmp_path / "bad.npz")
    with pytest.raises(S.SnapshotError, match="bad.npz: invalid snapshots: expert ids outside 0..3"):
        S.load_snapshots(path)


@pytest.mark.parametrize("change, match", [
    (dict(steps=np.array([0, 4, 2])), "not strictly ascending"),
    (dict(routers=np.zeros((2, 2, 4, 32), np.float32)), "routers of shape"),
    (dict(domains=np.array(["code"])), "domains and"),
])
def test_inconsistent_snapshots_are_rejected(run, change, match):
    snaps = run[3]
    fields = {k: getattr(snaps, k) for k in ("steps", "routers", "experts", "domains", "token_ids")}
    with pytest.raises(S.SnapshotError, match=match):
        S.Snapshots(**{**fields, **change})


def test_subject_export_writes_snapshots_and_both_perplexities(run, tmp_path):
    cfg, model, result, snaps = run
    headline, at_context = subject.card_eval_sets(cfg)
    card = subject.export_subject(model, cfg, result, headline, tmp_path / "subject", "test", snaps, at_context)
    assert card["eval"] == "validation split, up to 2 windows of 16 tokens per domain"
    assert card["eval_at_context"] == "validation split, up to 1 windows of 32 tokens per domain"
    ours = study.perplexity_by_domain(model, at_context)
    assert card["validation_perplexity_at_context"]["overall"] == pytest.approx(ours["overall"], rel=1e-4)
    assert card["training_snapshots"]["steps"] == [0, 2, 4]
    assert S.load_snapshots(tmp_path / "subject" / subject.SNAPSHOTS_FILE).steps.tolist() == [0, 2, 4]
    assert json.loads((tmp_path / "subject" / "model_card.json").read_text())["train_wall_s"] == card["train_wall_s"]
    readme = (tmp_path / "subject" / "README.md").read_text()
    assert "at context (32)" in readme and "training_snapshots.npz" in readme


def test_history_train_s_sums_every_logged_window():
    result = study.TrainResult(history=[{"step": 2, "tokens_per_s": 100.0}, {"step": 4, "tokens_per_s": 50.0},
                                        {"step": 4, "eval_loss": 1.0}], step=4, checkpoint=None, wall_s=0.1)
    assert subject.history_train_s(result, tokens_per_step=100) == pytest.approx(2 * 100 / 100 + 2 * 100 / 50)


def test_notebook_06_evolution_reads_the_snapshots(run, tmp_path):
    from routelib.studies.router_weights import RouterStudyConfig, evolution, load_training_snapshots

    path = S.save_snapshots(run[3], tmp_path / "snaps.npz")
    evo = evolution(load_training_snapshots(RouterStudyConfig(snapshots=str(path))))
    sat = evo["saturation"].pivot(index="step", columns="layer", values="saturation")
    assert sat.index.tolist() == [0, 2, 4] and (sat.loc[4] == 1.0).all() and (sat.to_numpy() <= 1).all()
    drift = evo["drift"].set_index(["step", "layer"])
    assert drift.loc[4, "cosine_to_final"].to_numpy() == pytest.approx(1.0)
    assert set(evo["specialisation"]["step"]) == set(evo["balance"]["step"]) == {0, 2, 4}
    with pytest.raises(S.SnapshotError, match="no such snapshot file"):
        load_training_snapshots(RouterStudyConfig(snapshots=str(tmp_path / "none.npz")))
