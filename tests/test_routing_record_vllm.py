"""routelib.routing.record.vllm and ``collect --backend vllm``, up to the engine boundary: a stand-in
``vllm`` module returns constructed outputs (vLLM returns routed experts only on GPU builds); the
traces hold exactly those experts; a missing vLLM is one line naming ``pip install vllm``."""

import sys
import types

import numpy as np
import pytest

from routelib import cli, paths
from routelib.routing.record import collect as C
from routelib.routing.record import traces as T
from routelib.routing.record import vllm as V

LAYERS, K, E = 6, 2, 8  # data/moe-subject's layout (its config says 8 experts)
SUBJECT = str(paths.DATA_DIR / "moe-subject")


def fake_vllm(calls):
    """A ``vllm`` module whose LLM.generate routes token t of prompt p at layer l to experts
    (p + t + l) % E and (p + t + l + 1) % E, over the prompt's words and 3 new tokens."""
    module = types.ModuleType("vllm")
    module.__version__ = "0.0-fake"

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            calls.append(("LLM", kw))

        def generate(self, prompts, params):
            calls.append(("generate", len(prompts), params.kw))
            outs = []
            for p, text in enumerate(prompts):
                prompt_ids = list(range(len(text.split())))
                new = [7, 8, 9][:params.kw["max_tokens"]]
                t = np.arange(len(prompt_ids) + len(new))[:, None, None]
                routed = (p + t + np.arange(LAYERS)[None, :, None] + np.arange(K)) % E  # (T, L, k)
                completion = types.SimpleNamespace(token_ids=new, routed_experts=routed)
                outs.append(types.SimpleNamespace(prompt_token_ids=prompt_ids, outputs=[completion]))
            return outs

    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module


def test_collect_vllm_backend_writes_the_engines_routing(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    out = tmp_path / "traces"
    argv = ["--model", SUBJECT, "--datasets", "humaneval,gsm8k", "--limit", "2", "--max_new_tokens", "3",
            "--out", str(out), "--backend", "vllm"]
    assert C.main(argv) == 0
    assert calls[0] == ("LLM", {"model": SUBJECT, "dtype": "auto", "enable_return_routed_experts": True})
    assert [c[1:] for c in calls[1:]] == [(2, {"max_tokens": 3, "temperature": 0.0})] * 2
    assert "humaneval: 2 problems" in capsys.readouterr().out
    df = T.load_traces(out)
    manifest = df.attrs["manifest"]
    assert manifest["source"]["backend"] == "vllm" and manifest["layout"]["num_experts"] == E
    assert manifest["layout"]["weights_source"] == "not recorded: uniform 1/k"
    experts = T.trace_arrays(df).experts
    for (dataset, pid), rows in df.groupby(["dataset", "problem_id"], sort=False).groups.items():
        p = int(df.loc[rows[0], "problem_index"])
        t = df.loc[rows, "position"].to_numpy()[:, None, None]
        np.testing.assert_array_equal(experts[rows], (p + t + np.arange(LAYERS)[None, :, None] + np.arange(K)) % E)
        assert df.loc[rows, "phase"].tolist()[-3:] == ["generated"] * 3
    assert sorted(p.name for p in V.requests_dir(out).iterdir())[:2] == ["gsm8k-00000.npz", "gsm8k-00001.npz"]


def test_sampled_vllm_collection_passes_temperature_top_p_and_seed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    out = tmp_path / "traces"
    argv = ["--model", SUBJECT, "--datasets", "gsm8k", "--limit", "2", "--max_new_tokens", "3", "--out", str(out),
            "--backend", "vllm", "--sample", "--temperature", "0.8", "--top_p", "0.95", "--seed", "5"]
    assert C.main(argv) == 0
    assert calls[1][1:] == (2, {"max_tokens": 3, "temperature": 0.8, "top_p": 0.95, "seed": 5})
    generation = T.read_manifest(out)["source"]["generation"]["gsm8k"]
    assert generation["greedy"] is False and generation["seed"] == 5 and generation["temperature"] == 0.8


def test_missing_vllm_is_one_line_naming_pip_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    argv = ["--model", SUBJECT, "--datasets", "gsm8k", "--limit", "1", "--out", str(tmp_path / "t"),
            "--backend", "vllm"]
    assert cli.run(C.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install vllm" in err
    assert cli.run(C.main, argv + ["--full_distribution"]) == 2
    assert "--backend vllm does not support --full_distribution" in capsys.readouterr().err


def test_parallelism_options_reach_the_engine_and_the_manifest(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    monkeypatch.setattr(V, "visible_gpus", lambda: 8)
    out = tmp_path / "traces"
    argv = ["--model", SUBJECT, "--datasets", "gsm8k", "--limit", "1", "--max_new_tokens", "2", "--out", str(out),
            "--backend", "vllm", "--tensor_parallel_size", "4", "--pipeline_parallel_size", "2",
            "--enable_expert_parallel", "true", "--gpu_memory_utilization", "0.85", "--max_model_len", "4096"]
    assert C.main(argv) == 0
    expected = {"tensor_parallel_size": 4, "pipeline_parallel_size": 2, "enable_expert_parallel": True,
                "gpu_memory_utilization": 0.85, "max_model_len": 4096}
    assert calls[0] == ("LLM", {"model": SUBJECT, "dtype": "auto", "enable_return_routed_experts": True, **expected})
    assert T.read_manifest(out)["source"]["engine"] == expected


@pytest.mark.parametrize("extra, needle", [
    (["--tensor_parallel_size", "0"], "--tensor_parallel_size 0: need >= 1"),
    (["--gpu_memory_utilization", "1.5"], "must lie in (0, 1]"),
    (["--distributed_executor_backend", "slurm"], "choose from mp, ray"),
    (["--tensor_parallel_size", "4", "--pipeline_parallel_size", "4"], "16 GPUs per engine, but 8 visible"),
])
def test_bad_engine_options_are_refused_before_the_engine_starts(tmp_path, monkeypatch, capsys, extra, needle):
    calls = []
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    monkeypatch.setattr(V, "visible_gpus", lambda: 8)
    argv = ["--model", SUBJECT, "--datasets", "gsm8k", "--limit", "1", "--out", str(tmp_path / "t"),
            "--backend", "vllm", *extra]
    assert cli.run(C.main, argv) == 2
    assert needle in capsys.readouterr().err and not calls  # no engine was started


def test_engine_options_need_the_vllm_backend(tmp_path, capsys):
    argv = ["--model", SUBJECT, "--datasets", "gsm8k", "--out", str(tmp_path / "t"), "--tensor_parallel_size", "2"]
    assert cli.run(C.main, argv) == 2
    assert "only with --backend vllm" in capsys.readouterr().err
