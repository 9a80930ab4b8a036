"""Notebook 04's config, live collection check and dashboard views."""

import numpy as np
import pytest

from routelib import paths
from routelib.errors import ConfigError
from routelib.routing import load_traces, trace_arrays
from routelib.studies.routing_traces.views import journey, journey_html, routing_dashboard
from routelib.studies.routing_traces import TraceStudyConfig, live_collection, phase_mask, routing_agreement

SHIPPED = "routing_data_collected/moe-subject"


@pytest.fixture(scope="module")
def shipped():
    from routelib import paths

    df = load_traces(paths.in_repo(SHIPPED), datasets=["gsm8k"])
    return df, trace_arrays(df)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="phase"):
        TraceStudyConfig(phase="decode")
    with pytest.raises(ConfigError, match="sample_size"):
        TraceStudyConfig(sample_size=0)
    with pytest.raises(ConfigError, match="live_problems"):
        TraceStudyConfig(live_problems=0)
    with pytest.raises(ConfigError, match="live_model is None"):
        live_collection(TraceStudyConfig(live_model=None))


def test_phase_mask(shipped):
    df, _ = shipped
    gen, prompt, everything = (phase_mask(df, p) for p in ("generated", "prompt", "all"))
    assert (gen ^ prompt).all() and everything.all()
    # the counts the collection wrote in the manifest, per shard, for this dataset
    shards = [s for s in df.attrs["manifest"]["shards"] if s["dataset"] == "gsm8k"]
    assert gen.sum() == sum(s["generated_tokens"] for s in shards) == 51672
    assert prompt.sum() == sum(s["prompt_tokens"] for s in shards)


def test_routing_agreement_sees_a_changed_expert_and_a_changed_token(shipped):
    df, _ = shipped
    a = df[df["problem_id"].isin(["gsm8k/test/0", "gsm8k/test/1"])].reset_index(drop=True)
    a.attrs = df.attrs
    same = routing_agreement(a, a)
    assert (same[["same_token", "same_top1", "same_set"]] == 1).all().all()
    b = a.copy()
    b.attrs = a.attrs
    first = np.flatnonzero(b["problem_id"] == "gsm8k/test/0")
    ex = b.at[first[3], "experts"].copy()
    ex[0], ex[1] = ex[1], ex[0]  # swap layer 0's slots: same set, other top-1
    b.at[first[3], "experts"] = ex
    b.at[first[4], "token_id"] = b.at[first[4], "token_id"] + 1
    diff = routing_agreement(a, b).set_index("problem_id")
    n = len(first)
    assert diff.loc["gsm8k/test/0", "same_token"] == pytest.approx((n - 1) / n)
    assert diff.loc["gsm8k/test/0", "same_top1"] == pytest.approx((n - 2) / (n - 1))
    assert diff.loc["gsm8k/test/0", "same_set"] == 1
    assert diff.loc["gsm8k/test/1", "same_top1"] == 1


def test_live_collection_reproduces_the_shipped_traces(tmp_path):
    agreement, manifest = live_collection(TraceStudyConfig(live_problems=1, live_new_tokens=3, out_dir=str(tmp_path)))
    assert manifest["totals"]["generated_tokens"] == 3
    assert agreement["tokens"].iloc[0] == manifest["totals"]["rows"]
    assert (agreement[["same_token", "same_top1", "same_set"]] == 1).all().all()


def test_journey_and_its_html(shipped):
    df, arrays = shipped
    table = journey(df, arrays, 7)
    assert len(table) == 6 and table["experts"].iloc[0] == tuple(int(e) for e in arrays.experts[7, 0])
    assert np.allclose(table["confidence"], arrays.weights[7, :, 0])
    html = journey_html(df, arrays, 7, 8)
    assert "gsm8k/test/0" in html and "position 7" in html and html.count("<tr>") == 7
    with pytest.raises(IndexError, match="outside"):
        journey(df, arrays, len(df))


def test_dashboard_follows_dataset_problem_and_token(shipped):
    df, arrays = shipped
    box = routing_dashboard(df, arrays, 8)
    (pick_dataset, pick_problem), pick_token, view = box.children[0].children, box.children[1], box.children[2]
    assert pick_dataset.options == ("gsm8k",) and pick_problem.value == "gsm8k/test/0"
    pick_problem.value = "gsm8k/test/2"
    assert pick_token.max == (df["problem_id"] == "gsm8k/test/2").sum() - 1
    pick_token.value = 11
    assert "gsm8k/test/2 · position 11" in view.value


def test_consecutive_locality_on_the_shipped_traces(shipped):
    """The notebook's locality table on the shipped GSM8K traces agrees with a direct count of one
    layer's top-1 repetitions, and its figures draw."""
    import matplotlib.pyplot as plt

    from routelib.studies.routing_traces import consecutive_locality
    from routelib.studies.routing_traces.views import plot_locality_curves, plot_locality_decay

    df, arrays = shipped
    with pytest.raises(ConfigError, match="max_distance"):
        TraceStudyConfig(max_distance=0)
    table = consecutive_locality(df, arrays, TraceStudyConfig(max_distance=3, bootstrap=50))
    assert set(table["group"]) == {"all", "gsm8k"} and set(table["distance"]) == {1, 2, 3}
    row = table.query("group == 'gsm8k' and phase == 'prompt' and distance == 1 and layer == 2 "
                      "and measure == 'top1_same'").iloc[0]
    hits = pairs = 0
    for _, part in df.groupby("problem_id"):
        top = arrays.experts[part.index.to_numpy(), 2, 0][(part["phase"] == "prompt").to_numpy()]
        hits += int((top[1:] == top[:-1]).sum())
        pairs += len(top) - 1
    assert row["pairs"] == pairs and row["rate"] == pytest.approx(hits / pairs)
    assert row["ci_low"] <= row["rate"] <= row["ci_high"]
    for fig in (plot_locality_curves(table), plot_locality_decay(table)):
        assert len(fig.axes) >= 1
        plt.close(fig)


def test_decoding_comparison_sets_trace_sets_side_by_side():
    from routelib.routing.analyse.repetition import repetition_rate
    from routelib.studies.routing_traces import decoding_comparison

    df = load_traces(paths.in_repo(SHIPPED))
    attrs, first = df.attrs, df.groupby("dataset")["problem_id"].transform(lambda p: p.isin(p.unique()[:6]))
    df = df[first.to_numpy()].reset_index(drop=True)
    df.attrs = attrs
    table = decoding_comparison({"a": df, "b": df}, TraceStudyConfig(permutations=50)).set_index(["decoding", "dataset"])
    assert table.loc["a"].equals(table.loc["b"])  # the same traces measure the same
    assert set(table.loc["a"].index) == {"gsm8k", "humaneval", "both"}
    a = table.loc["a"]
    assert a.loc["both", "tokens"] == a.loc["gsm8k", "tokens"] + a.loc["humaneval", "tokens"]
    assert a.loc["both", "repetition_rate"] == pytest.approx(repetition_rate(df).loc["all", "repetition_rate"])
    assert 0 <= a.loc["both", "layers_p_below_005"] <= 6 and np.isnan(a.loc["gsm8k", "tv_distance_mean"])


def test_token_samples_and_the_example_take_what_the_traces_hold(shipped):
    from routelib.studies.routing_traces import example_token, token_samples

    df, _ = shipped
    cfg = TraceStudyConfig(sample_size=100)
    samples = token_samples(df, cfg)
    assert list(samples) == ["generated", "prompt"] and all(len(rows) == 100 for rows in samples.values())
    assert (df["phase"].to_numpy()[samples["prompt"]] == "prompt").all()
    generated = df[df["phase"] == "generated"].reset_index(drop=True)  # a decode-only log, as many imports are
    assert list(token_samples(generated, cfg)) == ["generated"]
    with pytest.raises(ConfigError, match="no prompt tokens"):
        token_samples(generated, TraceStudyConfig(phase="prompt"))
    gsm8k_generated = np.flatnonzero((df["phase"] == "generated").to_numpy())
    assert example_token(df) == gsm8k_generated[5]
    assert example_token(df, dataset="humaneval") == gsm8k_generated[5]  # absent: the first dataset's
    assert example_token(df.iloc[:3], phase="generated") == 2  # too few: the last


def test_live_check_says_what_is_missing():
    import dataclasses

    from routelib.routing.record.traces import trace_info
    from routelib.studies.routing_traces import live_check_problem

    info = trace_info(paths.in_repo(SHIPPED))
    assert live_check_problem(TraceStudyConfig(), info) is None
    assert live_check_problem(TraceStudyConfig(live_model=str(paths.in_repo("data/moe-subject"))), info) is None
    imported = dataclasses.replace(info, source="vllm", generation={}, model=None)
    reasons = {
        "live_model is None": live_check_problem(TraceStudyConfig(live_model=None), info),
        "imported from vllm": live_check_problem(TraceStudyConfig(), imported),
        "no collection of 'mbpp'": live_check_problem(TraceStudyConfig(live_dataset="mbpp"), info),
        "does not exist": live_check_problem(TraceStudyConfig(live_model="./no-such-model"), info),
        "not the model that collected": live_check_problem(TraceStudyConfig(live_model="org/other-moe"), info),
    }
    for expected, reason in reasons.items():
        assert expected in reason and "\n" not in reason


def test_locality_number_is_none_for_pairs_the_traces_lack(shipped):
    from routelib.studies.routing_traces import consecutive_locality, locality_number

    df, arrays = shipped
    generated = (df["phase"] == "generated").to_numpy()
    part = df[generated].reset_index(drop=True)
    part.attrs = df.attrs
    table = consecutive_locality(part, type(arrays)(arrays.experts[generated], arrays.weights[generated], None),
                                 TraceStudyConfig(max_distance=1, bootstrap=5))
    assert locality_number(table, "top1_same", 0, phase="prompt") is None
    assert 0 <= locality_number(table, "top1_same", 0, phase="generated") <= 1
