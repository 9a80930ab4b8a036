"""routelib.routing.record.columns: memory-mapped columns equal what load_traces + trace_arrays give (the
shipped traces and synthetic ones), are validated as load_traces validates, are built once and
re-used; predictors fitted on memory-mapped traces score as on in-memory ones."""

import json
import os

import numpy as np
import pytest

from routelib import paths
from routelib.routing.record import columns as C
from routelib.routing import predict as P
from routelib.routing.record import traces as T
from routelib.routing.predict.dataset import RoutingData, load_routing

from test_routing_predict_dataset import problem_list, synthetic_arrays, write_traces

pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED = paths.TRACES_DIR / "moe-subject"


def test_columns_equal_load_traces_on_the_shipped_traces(tmp_path):
    cols = C.open_columns(SHIPPED, cache_dir=tmp_path)
    df = T.load_traces(SHIPPED)
    arrays = T.trace_arrays(df)
    assert isinstance(cols.experts, np.memmap) and cols.experts.dtype == np.int16
    np.testing.assert_array_equal(cols.experts, arrays.experts)
    np.testing.assert_array_equal(cols.weights, arrays.weights)
    np.testing.assert_array_equal(cols.token_id, df["token_id"])
    np.testing.assert_array_equal(cols.position, df["position"])
    np.testing.assert_array_equal(cols.generated, df["phase"] == "generated")
    in_memory = RoutingData.from_frame(df)
    assert cols.problems == in_memory.problems
    np.testing.assert_array_equal(cols.problem, in_memory.problem)


def test_cache_is_built_once_and_checked(tmp_path):
    problems = problem_list(3, 20)
    experts, weights = synthetic_arrays("independent", 120)
    out = write_traces(tmp_path / "t", experts, weights, problems)
    first = C.open_columns(out, cache_dir=tmp_path / "cache")
    stamp = os.stat(first.cache_dir / "experts.npy").st_mtime_ns
    again = C.open_columns(out, cache_dir=tmp_path / "cache")
    assert again.cache_dir == first.cache_dir and os.stat(again.cache_dir / "experts.npy").st_mtime_ns == stamp
    np.testing.assert_array_equal(again.experts, experts)
    unchecked = C.open_columns(out, cache_dir=tmp_path / "unchecked", validate=False)
    assert json.loads((unchecked.cache_dir / "problems.json").read_text())["validated"] is False
    checked = C.open_columns(out, cache_dir=tmp_path / "unchecked")  # rebuilt with the checks
    assert json.loads((checked.cache_dir / "problems.json").read_text())["validated"] is True
    shard = next(out.glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated after the cache was built: still refused
    with pytest.raises(T.TraceError, match="is truncated"):
        C.open_columns(out, cache_dir=tmp_path / "cache")


def test_bad_traces_are_refused_while_building(tmp_path):
    experts, weights = synthetic_arrays("independent", 40)
    out = write_traces(tmp_path / "dup", experts, weights, [("d", "p", 20), ("d", "p", 20)])  # the same problem twice
    with pytest.raises(T.TraceError, match=r"token \(d, p, position 0\) breaks positions 0..n-1"):
        C.open_columns(out, cache_dir=tmp_path / "cache")
    experts[3, 1, 0] = 8  # out of range for E = 8
    out = write_traces(tmp_path / "range", experts, weights, problem_list(2, 20, datasets=("d",)))
    with pytest.raises(T.TraceError, match=r"expert ids outside \[0, 8\)"):
        C.open_columns(out, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache" / "trace-columns").iterdir())  # no cache, finished or half-built


def test_predictors_on_memory_mapped_traces_score_as_in_memory(tmp_path, monkeypatch):
    problems = problem_list(8, 50)
    experts, weights = synthetic_arrays("deterministic", 800)
    out = write_traces(tmp_path / "t", experts, weights, problems)
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path / "cache")
    mapped = load_routing(out, memory_map=True)
    plain = load_routing(out)
    pairs = P.layer_pairs(plain.num_layers, [1, 2])
    cfg = P.EvalConfig(mlp_steps=20, mlp_hidden=16)
    names = ("prior", "lookup", "ngram", "mlp")
    whole = {name: P.make_predictor(name, cfg).fit(plain.take(np.arange(600)), pairs) for name in names}  # one chunk
    monkeypatch.setattr(P, "CHUNK_ROWS", 128)  # memory-mapped and read in 5 chunks
    for name in names:
        chunked = P.make_predictor(name, cfg).fit(mapped.take(slice(0, 600)), pairs)
        for layer, hop in pairs:
            np.testing.assert_allclose(chunked.predict_scores(mapped.take(slice(600, 800)), layer, hop),
                                       whole[name].predict_scores(plain.take(np.arange(600, 800)), layer, hop),
                                       rtol=1e-5, atol=1e-6, err_msg=f"{name} {layer} {hop}")  # float32 sums
