"""routelib.routing.record.shards and ``collect --shard``: parts collected by separate processes merge
into the one-process result row for row; two processes never write the same file; a bad or incomplete
set of parts is refused."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from routelib import paths
from routelib.errors import ConfigError
from routelib.routing.record import shards as S
from routelib.routing.record.traces import load_traces

from test_routing_record_collect import PROMPTS, mixtral, run, tokenizer  # noqa: F401 -- module fixtures, shared

PROMPTS6 = {**PROMPTS, "p5": "Once upon a time"}


def same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


@pytest.mark.parametrize("sample", [False, True])
def test_two_parts_merge_into_the_one_process_collection(mixtral, tokenizer, tmp_path, sample):
    kw = dict(greedy=not sample, seed=3 if sample else None,
              generation_kwargs={"temperature": 0.9} if sample else None)
    whole = run(mixtral, tokenizer, tmp_path / "one", prompts=PROMPTS6, **kw)
    for i in (1, 2):
        run(mixtral, tokenizer, S.shard_dir(tmp_path / "split", i, 2), prompts=PROMPTS6, shard=(i, 2), **kw)
    manifest = S.merge(tmp_path / "split")
    merged = load_traces(tmp_path / "split")
    same_rows(whole, merged)
    assert [m["folder"] for m in manifest["merged_from"]] == ["split.shard-1-of-2", "split.shard-2-of-2"]
    assert manifest["datasets"]["toy"]["counts"]["complete"]


WORKER = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_routing_record_collect import tiny_model, run
from routelib.data.tokenizer import load_tokenizer
from routelib.routing.record import shards as S
torch.set_num_threads(1)
i = int(sys.argv[1])
prompts = {{f"p{{j}}": "def f(x):" + " x" * j for j in range(8)}}
run(tiny_model("mixtral"), load_tokenizer("bpe8k"), S.shard_dir({out!r}, i, 2), prompts=prompts, shard=(i, 2))
"""


def test_two_processes_at_once_write_disjoint_files_and_merge(tmp_path, mixtral, tokenizer):
    out = tmp_path / "traces"
    code = WORKER.format(tests=str(paths.REPO_ROOT / "tests"), out=str(out))
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, stderr=subprocess.PIPE) for i in (1, 2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    files = [{p.name for p in S.shard_dir(out, i, 2).iterdir()} - {"manifest.json"} for i in (1, 2)]
    assert files[0] and files[1] and not files[0] & files[1]
    S.merge(out)
    prompts = {f"p{j}": "def f(x):" + " x" * j for j in range(8)}
    same_rows(run(mixtral, tokenizer, tmp_path / "one", prompts=prompts), load_traces(out))


def test_a_missing_part_is_refused(mixtral, tokenizer, tmp_path):
    run(mixtral, tokenizer, S.shard_dir(tmp_path / "t", 1, 3), prompts=PROMPTS6, shard=(1, 3))
    with pytest.raises(ConfigError, match=r"part\(s\) \[2, 3\] of 3 are missing"):
        S.merge(tmp_path / "t")
    with pytest.raises(ConfigError, match="no part folders"):
        S.merge(tmp_path / "none")


def test_parts_of_different_runs_are_refused(mixtral, tokenizer, tmp_path):
    run(mixtral, tokenizer, S.shard_dir(tmp_path / "t", 1, 2), prompts=PROMPTS6, shard=(1, 2))
    run(mixtral, tokenizer, S.shard_dir(tmp_path / "t", 2, 2), prompts=PROMPTS6, shard=(2, 2), max_new_tokens=3)
    with pytest.raises(ConfigError, match="prompts or settings differ"):
        S.merge(tmp_path / "t")


def test_shard_from_the_environment_and_bad_specs():
    assert S.shard_from_env({"RANK": "1", "WORLD_SIZE": "4"}) == (2, 4)
    with pytest.raises(ConfigError, match="RANK and WORLD_SIZE"):
        S.shard_from_env({})
    from routelib.routing.record.collect import _shard_option

    assert _shard_option("2/3") == (2, 3)
    with pytest.raises(ConfigError, match="--shard"):
        _shard_option("4/3")
    assert Path(S.shard_dir("a/traces", 2, 3)).name == "traces.shard-2-of-3"
