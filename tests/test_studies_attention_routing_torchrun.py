"""Notebook 02's reference run under torchrun (routelib.studies.attention_routing.reference): a tiny
configuration made by 2 gloo processes and by 1 gives the same recorded losses on the same global
batch; rank 0 alone writes; the checkpoints the 2 processes wrote resume under 1 process."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from torchrun_helper import run_module

# Two runs (static and dynamic, 4 steps each): the sweep, the comparison, the original project's rates and the
# alpha sweep all name the same two runs, so the whole reference run, measurements and manifest
# included, takes seconds.
TINY = ["--hidden_size", "16", "--num_heads", "2", "--intermediate_size", "32", "--seq_len", "16",
        "--batch_size", "4", "--steps", "4", "--warmup_steps", "1", "--lr_same", "2e-3", "--lr_static", "2e-3",
        "--lr_dynamic", "2e-3", "--seeds", "0", "--alpha_sweep", "0.5", "--alpha_sweep_steps", "0",
        "--balance_coef", "0.5", "--eval_every", "2", "--eval_windows", "2", "--speed_seq_lens", "16",
        "--speed_batch", "2", "--bench_min_time_s", "0.01", "--device", "cpu", "--sweep_steps", "4",
        "--log_every", "1", "--ckpt_every", "2", "--prefill_seq_lens", "16", "--speed_rounds", "1",
        "--position_bins", "2", "--threads", "1"]
STATIC, DYNAMIC = "static-lr0.002-a0-s0-n4", "dynamic-lr0.002-a0.5-s0-n4"
# Tolerances. The static arm draws no random numbers: data parallelism changes only the order of float
# sums. The dynamic arm's Gumbel noise is drawn by each rank from its own stream (seed + rank), so its
# routing decisions differ between 1 and 2 processes; at this size they move the loss by < 2e-4.
EXACT = {"rel": 1e-4, "abs": 1e-5}
NOISY = {"rel": 2e-3}


def launch(tmp_path, name: str, nproc: int, runs: str | None = None) -> str:
    """The reference command with ``nproc`` processes (torchrun for more than one); its stdout."""
    args = ["-m", "routelib.studies.attention_routing", "reference", "--out", str(tmp_path / name),
            "--out_dir", str(tmp_path / (runs or f"{name}-runs")), *TINY]
    return run_module(args, nproc)


def history(tmp_path, name: str, run: str) -> pd.DataFrame:
    return pd.read_csv(tmp_path / name / "history" / f"{run}.csv")


def final(tmp_path, name: str, run: str) -> dict:
    return json.loads((tmp_path / name / "final" / f"{run}.json").read_text())


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny reference run by 1 process and by 2 (stdout of the latter)."""
    tmp = tmp_path_factory.mktemp("ref02_torchrun")
    launch(tmp, "one", 1)
    return tmp, launch(tmp, "two", 2)


def test_two_processes_record_the_one_process_losses(made):
    tmp, _ = made
    for run, tol in ((STATIC, EXACT), (DYNAMIC, NOISY)):
        a, b = history(tmp, "one", run), history(tmp, "two", run)
        assert a["step"].tolist() == b["step"].tolist() == [1, 2, 3, 4]
        for key in ("loss", "lm_loss", "eval_loss"):
            assert b[key].dropna().to_numpy() == pytest.approx(a[key].dropna().to_numpy(), **tol), (run, key)
        assert final(tmp, "two", run)["val_loss"] == pytest.approx(final(tmp, "one", run)["val_loss"], **tol)
        assert final(tmp, "two", run)["tokens"] == 4 * 4 * 16  # the global batch: 4 windows a step, not 4 per rank


def test_rank_zero_alone_writes(made):
    tmp, printed = made
    assert printed.count(f"{STATIC}: validation loss") == 1 and printed.count("no clear winner") == 1
    logs = json.loads((tmp / "two" / "invocations.json").read_text())
    assert len(logs) == 1 and logs[0]["finished"]
    manifest = json.loads((tmp / "two" / "manifest.json").read_text())
    assert manifest["invocations"] == 1 and {"runs.csv", "train_speed.csv", "routing.csv"} <= set(manifest["files"])
    for run in (STATIC, DYNAMIC):  # checkpoints written once (rank 0), at steps 2 and 4
        (folder,) = (tmp / "two-runs" / "checkpoints").glob(f"{run}-*")
        assert sorted(p.name for p in folder.glob("step_*")) == ["step_000002", "step_000004"]


def test_checkpoints_of_two_processes_resume_under_one(made):
    """Step 4 of the 2-process checkpoints deleted: one process resumes at step 2, so the history's first
    two records are the 2-process run's (bit for bit) and the rest match the 1-process run."""
    tmp, _ = made
    shutil.copytree(tmp / "two-runs", tmp / "resumed-runs")
    for folder in (tmp / "resumed-runs" / "checkpoints").iterdir():
        shutil.rmtree(folder / "step_000004")
        (folder / "latest").unlink()
    launch(tmp, "resumed", 1, runs="resumed-runs")
    got, two, one = (history(tmp, name, STATIC) for name in ("resumed", "two", "one"))
    pd.testing.assert_frame_equal(got.iloc[:2], two.iloc[:2])  # resumed (tokens_per_s too), not retrained
    assert got["loss"].to_numpy() == pytest.approx(one["loss"].to_numpy(), **EXACT)
    assert final(tmp, "resumed", STATIC)["val_loss"] == pytest.approx(final(tmp, "one", STATIC)["val_loss"], **EXACT)
