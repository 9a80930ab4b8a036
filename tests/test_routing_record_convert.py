"""routelib.routing.record.convert: constructed routing -> JSON lines / vLLM request files -> traces gives back
the same experts and weights; gaps, incomplete tokens and identical duplicates are counted and
skipped; malformed lines, conflicting duplicates and out-of-range ids stop with one line naming the
file and line; the CLI turns them into exit status 2."""

import json

import numpy as np
import pytest

from routelib.io import sha256_file

from routelib.routing.record import convert as C
from routelib.routing.record import traces as T
from routelib.routing.predict.dataset import load_routing

L, K, E = 3, 2, 8


def constructed(n, seed=0):
    """experts (n, L, k) distinct ids and weights (n, L, k) in descending order."""
    rng = np.random.default_rng(seed)
    experts = np.argsort(rng.random((n, L, E)), axis=2)[..., :K]
    weights = np.sort(rng.dirichlet(np.ones(K), (n, L)), axis=2)[..., ::-1].astype(np.float32)
    return experts, np.ascontiguousarray(weights)


def records(dataset, pid, experts, weights, positions=None, **extra):
    positions = range(len(experts)) if positions is None else positions
    return [{"dataset": dataset, "problem_id": pid, "token_idx": int(t), "layer": layer,
             "experts": experts[i, layer].tolist(), "gating_probs": weights[i, layer].tolist(), **extra}
            for i, t in enumerate(positions) for layer in range(L)]


def write_jsonl(path, recs):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


def test_jsonl_round_trip(tmp_path):
    e1, w1 = constructed(7, 0)
    e2, w2 = constructed(5, 1)
    e3, w3 = constructed(4, 2)
    recs = records("gsm8k", "g/0", e1, w1) + records("gsm8k", 1, e2, w2) + records("humaneval", "h/0", e3, w3)
    rng = np.random.default_rng(0)
    recs = [recs[i] for i in rng.permutation(len(recs))]  # any order of lines
    src = write_jsonl(tmp_path / "routing.jsonl", recs)
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"dataset": "gsm8k", "problem_id": "g/0", "prompt": "Q?",
                                                     "generated_text": "A.", "prompt_tokens": 3}])
    manifest, report = C.import_jsonl(src, tmp_path / "out", texts=texts, num_experts=E)
    assert report.tokens == 16 and report.problems == 3 and report.gaps == 0 and report.incomplete_tokens == 0
    df = T.load_traces(tmp_path / "out")
    arrays = T.trace_arrays(df)
    expected = {("gsm8k", "g/0"): (e1, w1), ("gsm8k", "1"): (e2, w2), ("humaneval", "h/0"): (e3, w3)}
    for (ds, pid), (e, w) in expected.items():
        rows = ((df["dataset"] == ds) & (df["problem_id"] == pid)).to_numpy()
        np.testing.assert_array_equal(arrays.experts[rows], e)
        np.testing.assert_array_equal(arrays.weights[rows], w)
    g0 = df[df["problem_id"] == "g/0"]
    assert g0["phase"].tolist() == ["prompt"] * 3 + ["generated"] * 4  # from the companion's prompt_tokens
    assert manifest["source"]["kind"] == "jsonl" and manifest["source"]["files"][0]["sha256"] == sha256_file(src)
    assert manifest["source"]["report"]["tokens"] == 16
    assert T.read_manifest(tmp_path / "out")["layout"] | {} == manifest["layout"]
    assert (tmp_path / "out" / C.TEXTS_FILE).read_text() == texts.read_text()
    data = load_routing(tmp_path / "out")  # the predictors read it
    assert len(data) == 16 and data.num_experts == E and (data.token_id == -1).all()


def test_jsonl_gaps_incomplete_tokens_and_duplicates_are_counted(tmp_path):
    e, w = constructed(6)
    recs = records("d", "p", e, w, positions=[0, 1, 2, 5, 6, 9])  # dropped tokens 3, 4, 7, 8
    recs = [r for r in recs if not (r["token_idx"] == 5 and r["layer"] == 1)]  # token 5 lacks layer 1
    recs.append(dict(recs[0]))  # an identical duplicate
    manifest, report = C.import_jsonl(write_jsonl(tmp_path / "r.jsonl", recs), tmp_path / "out", num_experts=E)
    assert (report.incomplete_tokens, report.incomplete_records, report.duplicate_records, report.gaps) == (1, 2, 1, 4)
    df = T.load_traces(tmp_path / "out")
    assert df["position"].tolist() == [0, 1, 2, 3, 4] and df["source_position"].tolist() == [0, 1, 2, 6, 9]
    keep = [0, 1, 2, 4, 5]  # never invented: token 5 is gone, not filled in
    np.testing.assert_array_equal(T.trace_arrays(df).experts, e[keep])


def test_jsonl_reorders_slots_by_weight(tmp_path):
    rec = {"dataset": "d", "problem_id": "p", "token_idx": 0, "layer": 0, "experts": [1, 6], "gating_probs": [0.2, 0.8]}
    _, report = C.import_jsonl(write_jsonl(tmp_path / "r.jsonl", [rec]), tmp_path / "out", num_experts=E)
    arrays = T.trace_arrays(T.load_traces(tmp_path / "out"))
    assert report.reordered_records == 1 and arrays.experts[0, 0].tolist() == [6, 1]
    np.testing.assert_allclose(arrays.weights[0, 0], [0.8, 0.2])


GOOD = {"dataset": "d", "problem_id": "p", "token_idx": 0, "layer": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]}


@pytest.mark.parametrize("bad, message", [
    pytest.param('{"dataset": "d", "problem_id"', "r.jsonl:2: not valid JSON", id="malformed-json"),
    pytest.param([1, 2], "r.jsonl:2: expected a JSON object", id="not-an-object"),
    pytest.param({**GOOD, "layer": 1, "gating_probs": None}, "r.jsonl:2: field 'gating_probs' has type NoneType",
                 id="mistyped-field"),
    pytest.param({k: v for k, v in GOOD.items() if k != "layer"}, "r.jsonl:2: missing field 'layer'",
                 id="missing-field"),
    pytest.param({**GOOD, "layer": 1, "experts": [1, 2, 3]}, "r.jsonl:2: 'experts' has 3 ids, 'gating_probs' 2",
                 id="length-mismatch"),
    pytest.param({**GOOD, "layer": 1, "experts": [1, 8]}, "r.jsonl:2: expert id(s) [8] outside [0, 8)",
                 id="out-of-range"),
    pytest.param({**GOOD, "layer": 1, "experts": [-1, 2]}, "r.jsonl:2: expert id(s) [-1] outside", id="negative-id"),
    pytest.param({**GOOD, "layer": 1, "experts": [3, 3]}, "r.jsonl:2: expert id repeated", id="repeated-id"),
    pytest.param({**GOOD, "layer": 1, "experts": [1, 2, 3], "gating_probs": [0.5, 0.3, 0.2]},
                 "r.jsonl:2: top-3 record; the first record has top-2", id="other-top-k"),
    pytest.param({**GOOD, "experts": [1, 3]}, "r.jsonl:2: (d, p, token 0, layer 0) was recorded on line 1 with other",
                 id="conflicting-duplicate"),
    pytest.param({**GOOD, "layer": 1, "gating_probs": [float("nan"), 0.4]}, "r.jsonl:2: 'gating_probs' must be finite",
                 id="nan-weight"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad, message):
    src = write_jsonl(tmp_path / "r.jsonl", [GOOD, bad if isinstance(bad, (str, dict)) else json.dumps(bad)])
    with pytest.raises(C.ConvertError) as err:
        C.import_jsonl(src, tmp_path / "out", num_experts=E)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written before the input is known good


def test_jsonl_layers_and_empty_input(tmp_path):
    gap = write_jsonl(tmp_path / "g.jsonl", [GOOD, {**GOOD, "layer": 2}])
    with pytest.raises(C.ConvertError, match=r"layers \[0, 2\] are not 0..L-1"):
        C.import_jsonl(gap, tmp_path / "o1")
    with pytest.raises(C.ConvertError, match="r.jsonl:1: layer 1 outside the 1 MoE layers given"):
        C.import_jsonl(write_jsonl(tmp_path / "r.jsonl", [{**GOOD, "layer": 1}]), tmp_path / "o3", num_layers=1)
    with pytest.raises(C.ConvertError, match="no records"):
        C.import_jsonl(write_jsonl(tmp_path / "e.jsonl", []), tmp_path / "o4")


def test_jsonl_without_a_complete_token_writes_nothing(tmp_path):
    gap = write_jsonl(tmp_path / "g.jsonl", [GOOD, {**GOOD, "layer": 2}])
    with pytest.raises(C.ConvertError, match="no complete token"):  # layer 1 never logged
        C.import_jsonl(gap, tmp_path / "out", num_layers=3)
    assert not (tmp_path / "out").exists()


# ---- vLLM ------------------------------------------------------------------------------------------


def vllm_request(path, prompt_len, new_tokens, seed=0, routed_tokens=None, **extra):
    """A request file as a user saves it: routed_experts [T, L, k] for T = prompt + output tokens."""
    n = prompt_len + new_tokens if routed_tokens is None else routed_tokens
    experts, _ = constructed(n, seed)
    rng = np.random.default_rng(seed)
    np.savez(path, routed_experts=experts.astype(np.int32), prompt_token_ids=rng.integers(0, 100, prompt_len),
             output_token_ids=rng.integers(0, 100, new_tokens), **extra)
    return path, experts


def test_vllm_round_trip(tmp_path):
    (tmp_path / "req").mkdir()
    a, ea = vllm_request(tmp_path / "req" / "a.npz", 4, 3, seed=0, dataset=np.array("gsm8k"),
                         problem_id=np.array("g/7"))
    b, eb = vllm_request(tmp_path / "req" / "b.npz", 2, 5, seed=1, routed_tokens=6)  # last output token unrouted
    manifest, report = C.import_vllm([tmp_path / "req"], tmp_path / "out", dataset="mine", num_experts=E)
    assert report.unrouted_tokens == 1 and report.tokens == 13
    df = T.load_traces(tmp_path / "out")
    arrays = T.trace_arrays(df)
    g = (df["problem_id"] == "g/7").to_numpy()
    np.testing.assert_array_equal(arrays.experts[g], ea)
    np.testing.assert_array_equal(arrays.experts[(df["problem_id"] == "b").to_numpy()], eb)
    assert set(df.loc[g, "dataset"]) == {"gsm8k"} and set(df.loc[~g, "dataset"]) == {"mine"}
    assert df.loc[g, "phase"].tolist() == ["prompt"] * 4 + ["generated"] * 3
    with np.load(a) as z:
        np.testing.assert_array_equal(df.loc[g, "token_id"], np.r_[z["prompt_token_ids"], z["output_token_ids"]])
    np.testing.assert_allclose(arrays.weights, 1 / K)
    assert manifest["layout"]["weights_source"] == "not recorded: uniform 1/k" and manifest["source"]["kind"] == "vllm"


def test_vllm_weights_and_npy(tmp_path):
    experts, weights = constructed(5)
    path, _ = vllm_request(tmp_path / "w.npz", 2, 3, routed_weights=weights[..., ::-1])  # ascending: reordered
    manifest, report = C.import_vllm([path], tmp_path / "out", dataset="d", num_experts=E)
    arrays = T.trace_arrays(T.load_traces(tmp_path / "out"))
    np.testing.assert_allclose(arrays.weights, weights)
    assert report.reordered_records == 15 and manifest["layout"]["weights_source"] == "imported: routed_weights"
    np.save(tmp_path / "x.npy", experts)
    C.import_vllm([tmp_path / "x.npy"], tmp_path / "out2", dataset="d", num_experts=E)
    df = T.load_traces(tmp_path / "out2")
    assert (df["token_id"] == -1).all() and (df["phase"] == "generated").all()
    np.testing.assert_array_equal(T.trace_arrays(df).experts, experts)


@pytest.mark.parametrize("arrays, message", [
    pytest.param({"routed_experts": np.zeros((4, L))}, "routed_experts has shape (4, 3)", id="wrong-rank"),
    pytest.param({"routed_experts": np.full((3, L, K), 9)}, "expert id [9, 9] at token 0, layer 0 outside [0, 8)",
                 id="out-of-range"),
    pytest.param({"routed_experts": np.ones((3, L, K), int)}, "an expert id repeats", id="repeated"),
    pytest.param({"routed_experts": np.arange(3 * L * K).reshape(3, L, K) % 8, "prompt_token_ids": np.arange(2),
                  "output_token_ids": np.arange(5)}, "covers 3 tokens; prompt + output hold 2 + 5 = 7", id="length"),
    pytest.param({"routed_experts": np.arange(3 * L * K).reshape(3, L, K) % 8, "logits": np.zeros(2)},
                 "keys ['logits', 'routed_experts']", id="unknown-key"),
])
def test_vllm_errors_name_the_file(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(C.ConvertError) as err:
        C.import_vllm([tmp_path / "bad.npz"], tmp_path / "out", dataset="d", num_experts=E)
    assert "bad.npz" in str(err.value) and message in str(err.value)
    assert not (tmp_path / "out").exists()  # a failed import leaves no half-written folder


def test_save_vllm_output_from_a_request_output(tmp_path):
    from types import SimpleNamespace as NS

    experts, _ = constructed(6)
    out = NS(prompt_token_ids=[5, 6, 7], outputs=[NS(token_ids=[8, 9, 10], routed_experts=experts)])
    path = C.save_vllm_output(tmp_path / "r.npz", out, dataset="d", problem_id="p/1")
    problem = C.read_vllm_file(path)
    assert (problem.dataset, problem.problem_id) == ("d", "p/1") and problem.token_id.tolist() == [5, 6, 7, 8, 9, 10]
    with pytest.raises(C.ConvertError, match="enable_return_routed_experts=True"):
        C.save_vllm_output(tmp_path / "s.npz",
                           NS(prompt_token_ids=[1], outputs=[NS(token_ids=[2], routed_experts=None)]))


def test_cli(tmp_path, capsys):
    e, w = constructed(3)
    src = write_jsonl(tmp_path / "r.jsonl", records("d", "p", e, w))
    assert C.main(["jsonl", str(src), "--out", str(tmp_path / "out"), "--num_experts", "8"]) == 0
    assert "wrote 3 tokens of 1 problems" in capsys.readouterr().out
    assert "convert jsonl" in T.read_manifest(tmp_path / "out")["source"]["command"]
    from routelib import cli

    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "{oops"])
    assert cli.run(C.main, ["jsonl", str(bad), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl:2: not valid JSON" in err and err.count("\n") == 1
    assert cli.run(C.main, ["jsonl", str(src), "--out", str(tmp_path / "out")]) == 2  # not a new folder
    assert "is not empty" in capsys.readouterr().err
