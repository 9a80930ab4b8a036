"""routelib.routing.predict.bench_scale at toy size: the synthetic traces are valid traces of the asked layout
with the structure the predictors are meant to find (the lookup beats the prior), and the load and
train steps report what README quotes. Times are not checked (a benchmark, not a timed test)."""

import numpy as np
import pytest

from routelib.routing.predict import bench_scale as B
from routelib.routing.record import traces as T

pytestmark = pytest.mark.usefixtures("one_thread")


def test_synthetic_traces_load_and_train(tmp_path):
    cfg = B.SyntheticConfig(tokens=6000, problem_len=200, problems_per_shard=5, num_layers=4, num_experts=16, top_k=4)
    manifest = B.make_traces(tmp_path / "traces", cfg)
    df = T.load_traces(tmp_path / "traces")  # fully validated
    assert len(df) == 6000 and manifest["layout"]["num_experts"] == 16 and len(manifest["shards"]) == 6
    experts = T.trace_arrays(df).experts
    assert experts.shape == (6000, 4, 4) and (np.diff(np.sort(experts, 2), axis=2) > 0).all()  # distinct ids
    load = B.step_load(tmp_path / "traces", tmp_path / "cache")
    assert load["tokens"] == 6000 and load["peak_anon_gb"] > 0
    train = B.step_train(tmp_path / "traces", tmp_path / "cache", test_problems=5, mlp_steps=5, ngram_min_count=2)
    assert train["test_tokens"] == 1000 and train["lookup_top1"] > train["prior_top1"] + 0.2
    assert {"prior_fit_s", "lookup_fit_s", "ngram_fit_s", "mlp_fit_s", "ngram_table_gb", "peak_rss_gb"} <= set(train)
