"""The routing subject's training under torchrun (``python -m routelib.studies.moe_vs_dense subject``): a
tiny subject trained by 2 gloo processes and by 1 on the same global batch records the same losses and
exports a model of the same perplexity; rank 0 alone exports."""

from __future__ import annotations

import json

import pytest
from torchrun_helper import run_module

TINY = ["--hidden_size", "32", "--num_layers", "1", "--num_heads", "2", "--num_kv_heads", "1", "--intermediate_size",
        "32", "--num_experts", "4", "--top_k", "2", "--seq_len", "32", "--batch_size", "4", "--steps", "4",
        "--warmup_steps", "1", "--ckpt_every", "2", "--eval_windows", "2", "--card_seq_len", "32",
        "--snapshot_seq_len", "16", "--snapshot_windows", "1", "--device", "cpu", "--threads", "1"]
# Tolerances. The language-model loss of a step is the same function of the global batch under 1 or 2
# processes (only float sums are reordered); the load-balancing loss is not: each rank computes it on
# its half of the batch (as Switch and Mixtral training do) and the ranks average, so the gradients
# differ slightly. Seen: losses within 1e-5 relative, the exported perplexity within 1e-4.
LOSS = {"rel": 1e-4}
PERPLEXITY = {"rel": 1e-3}


def train(tmp_path, name: str, nproc: int) -> str:
    args = ["-m", "routelib.studies.moe_vs_dense", "subject", "--out", str(tmp_path / name),
            "--out_dir", str(tmp_path / f"{name}-runs"), *TINY]
    return run_module(args, nproc)


def history(tmp_path, name: str) -> list[dict]:
    (state,) = (tmp_path / f"{name}-runs" / "checkpoints").glob("moe-*/step_000004/state.json")
    return json.loads(state.read_text())["history"]


def test_two_processes_train_the_one_process_subject(tmp_path):
    train(tmp_path, "one", 1)
    printed = train(tmp_path, "two", 2)
    assert printed.count('"overall"') == 1  # rank 0 alone reports (and exports)
    one, two = history(tmp_path, "one"), history(tmp_path, "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for key in ("loss", "lm_loss"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], **LOSS), key
    cards = [json.loads((tmp_path / name / "model_card.json").read_text()) for name in ("one", "two")]
    assert cards[1]["validation_perplexity"] == pytest.approx(cards[0]["validation_perplexity"], **PERPLEXITY)
    assert cards[1]["tokens_seen"] == cards[0]["tokens_seen"] == 4 * 4 * 32  # the global batch, not per rank
    assert cards[1]["training_snapshots"]["steps"] == [0, 2, 4]  # rank 0's checkpoints, each written once
