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


# --------------------------------------------------------------------------- section 9: against real MoEs
def _constructed_traces():
    """Two domains of 4 experts, top-2, 2 layers: domain a uses experts 0/1, domain b 2/3; layer 1's first
    choice repeats layer 0's; each token id always gets the same pair."""
    token_ids = np.array([1, 2, 1, 2, 3, 4, 3, 4])
    pair = {1: (0, 1), 2: (1, 0), 3: (2, 3), 4: (3, 2)}
    experts = np.array([[pair[t], pair[t]] for t in token_ids])  # (8, 2 layers, 2)
    return experts, np.array(["a"] * 4 + ["b"] * 4), token_ids


def test_depth_names_and_layers():
    from routelib.studies.routing_traces import depth_layers, depth_name

    # the published aggregates' layers 0, 7, 15: of Mixtral-8x7B's 32, of OLMoE-1B-7B's 16
    assert [depth_name(layer, 32) for layer in (0, 7, 15, 31)] == ["first", "quarter", "half", "last"]
    assert [depth_name(layer, 16) for layer in (0, 7, 15)] == ["first", "half", "last"]
    assert depth_layers(6) == {"first": 0, "quarter": 1, "half": 2, "last": 5}
    assert depth_layers(2) == {"first": 0, "last": 1}
    with pytest.raises(ConfigError, match="outside"):
        depth_name(6, 6)


def test_mixtral_table5_as_quoted():
    from routelib.studies.routing_traces import mixtral_table5, paper_statistics

    table = mixtral_table5()
    assert table.shape == (8, 6) and table.loc["ArXiv", ("first choice", 0)] == 14.0
    assert table.loc["DM Mathematics", ("first or second choice", 15)] == 67.0
    rows = paper_statistics().set_index(["statistic", "layer"])
    first = rows.loc[("repeat_top1", "0")]
    assert first["value"] == pytest.approx(table[("first choice", 0)].mean() / 100)
    assert (first["low"], first["high"], first["depth"]) == (pytest.approx(0.136), pytest.approx(0.149), "first")
    assert rows.loc[("repeat_top2", "15"), "depth"] == "half"


def test_statistics_of_constructed_counts():
    from routelib.studies.routing_traces import routing_statistics, trace_counts

    experts, domains, token_ids = _constructed_traces()
    counts = trace_counts(experts, 4, "toy", [0, 1], [(0, 1)], domains=domains, token_ids=token_ids)
    stats = routing_statistics(counts, min_occurrences=2).set_index(["statistic", "layer"])["value"]
    assert stats[("usage_entropy", "0")] == pytest.approx(1.0) and stats[("max_share", "1")] == pytest.approx(0.25)
    assert stats[("domain_tv", "0")] == pytest.approx(0.5)  # each domain half of the experts, pooled all four
    assert stats[("transition_u", "0→1")] == pytest.approx(1.0) and stats[("lookup_accuracy", "0→1")] == 1.0
    assert stats[("vocabulary", "1")] == pytest.approx(1.0)  # a token's top expert in every occurrence
    assert stats[("repeat_chance", "0")] == pytest.approx(0.5)  # each domain: two first choices, half each
    without = routing_statistics(trace_counts(experts, 4, "toy", [0], []))
    assert set(without["statistic"]) == {"usage_entropy", "max_share", "repeat_chance"}


def _write_aggregates(root, model="mistral", domains=("arxiv", "book"), eid2token=("arxiv",)):
    """A routing_output folder of constructed pickles in the published layout (layers 0, 7, 15)."""
    import collections
    import pickle

    layer = collections.Counter({np.int64(e): 10 * (e + 1) for e in range(8)})
    objects = {"expert_counts": [layer] * 3, "expert_counts_top1": [layer] * 3,
               "expert_counts_crosslayer_top1": [collections.Counter({(np.int64(e), np.int64(e)): 5 for e in range(8)})] * 2,
               "eid2token": [{np.int64(e): collections.Counter({np.int64(e): 20, np.int64((e - 1) % 8): 20})
                              for e in range(8)}] * 3}  # token t always to experts t and t + 1
    for kind, obj in objects.items():
        (root / model / kind).mkdir(parents=True)
        for domain in (eid2token if kind == "eid2token" else domains):
            (root / model / kind / f"{domain}.pkl").write_bytes(pickle.dumps(obj))
    return root


def test_aggregate_counts_of_constructed_files(tmp_path):
    from routelib.routing.record.olmoe_analysis import AnalysisDataMissing
    from routelib.studies.routing_traces import aggregate_counts, routing_statistics

    counts = aggregate_counts(_write_aggregates(tmp_path), "mistral")
    assert (counts.model, counts.num_layers, counts.top_k) == ("Mixtral-8x7B", 32, 2)
    assert counts.usage[7].tolist() == [2 * 10 * (e + 1) for e in range(8)]  # two domains pooled
    assert counts.transitions[(0, 7)].trace() == 2 * 8 * 5
    assert any("vocabulary pooled without book" in note for note in counts.notes)
    stats = routing_statistics(counts, min_occurrences=1).set_index(["statistic", "depth"])["value"]
    assert stats[("domain_tv", "quarter")] == pytest.approx(0) and stats[("transition_u", "quarter→half")] == pytest.approx(1)
    assert stats[("vocabulary", "half")] == pytest.approx(1)  # top-2: half a token's routings, every occurrence
    with pytest.raises(AnalysisDataMissing, match="no expert_counts"):
        aggregate_counts(tmp_path, "olmoe")
    with pytest.raises(ConfigError, match="choose from"):
        aggregate_counts(tmp_path, "gpt")


def test_real_moe_comparison_with_and_without_the_data(tmp_path, shipped, monkeypatch):
    import matplotlib.pyplot as plt

    from routelib.routing.record.olmoe_analysis import ENV
    from routelib.studies.routing_traces import (STATISTICS, compared_layers, comparison_view, real_moe_comparison,
                                                 subject_statistics)
    from routelib.studies.routing_traces.views import plot_real_moe_comparison

    df, arrays = shipped
    subject = subject_statistics(df, "subject", phase="generated", by_domain=False)
    assert set(subject["layer"]) >= {"0", "1", "2", "5", "0→2", "2→5"} and "domain_tv" not in set(subject["statistic"])
    gen = (df["phase"] == "generated").to_numpy()  # the top-1 repeat rate at layer 5, counted directly
    hits = pairs = 0
    for _, part in df[gen].groupby("problem_id"):
        top = arrays.experts[part.index.to_numpy(), 5, 0]
        hits, pairs = hits + int((top[1:] == top[:-1]).sum()), pairs + len(top) - 1
    got = subject.set_index(["statistic", "layer"]).loc[("repeat_top1", "5"), "value"]
    assert got == pytest.approx(hits / pairs)

    monkeypatch.delenv(ENV, raising=False)
    table, missing = real_moe_comparison([subject])
    assert "allenai/OLMoE" in missing and ENV in missing and "\n" not in missing
    assert list(dict.fromkeys(table["model_name"])) == ["subject", "Mixtral paper, Table 5"]
    table, missing = real_moe_comparison([subject], root=_write_aggregates(tmp_path / "out", "mistral"),
                                         models=("mistral",), min_occurrences=1)
    assert missing is None and list(dict.fromkeys(table["model_name"])) == ["Mixtral-8x7B", "subject", "Mixtral paper, Table 5"]
    view = comparison_view(table)
    assert list(view.columns) == ["Mixtral-8x7B", "subject", "Mixtral paper, Table 5"]
    assert view.index.get_level_values(0)[0] == STATISTICS["usage_entropy"]
    assert view.loc[(STATISTICS["repeat_top1"], "half"), "Mixtral-8x7B"] == ""  # counts have no token order
    assert "[" in view.loc[(STATISTICS["repeat_top1"], "half"), "Mixtral paper, Table 5"]  # a range over domains
    assert compared_layers(table).loc["quarter", "Mixtral-8x7B"] == "7"
    fig = plot_real_moe_comparison(table)
    assert len(fig.axes) == 6
    plt.close(fig)


def test_subject_columns_name_another_models_traces_and_skip_a_thin_vocabulary(shipped):
    from routelib.studies.routing_traces import routing_statistics, subject_columns, trace_counts

    df, _ = shipped
    text, generated = subject_columns(TraceStudyConfig(), df)
    assert set(text["model_name"]) == {"subject text"} and set(generated["model_name"]) == {"subject generated"}
    assert "domain_tv" in set(text["statistic"]) and "vocabulary" in set(generated["statistic"])
    other = df.copy()
    other.attrs = {"manifest": {**df.attrs["manifest"], "model": {"name_or_path": "org/other-moe"}}}
    assert set(subject_columns(TraceStudyConfig(), other)[1]["model_name"]) == {"trace_dir generated"}
    experts, _, token_ids = _constructed_traces()
    thin = routing_statistics(trace_counts(experts, 4, "toy", [0], [], token_ids=token_ids), min_occurrences=100)
    assert "vocabulary" not in set(thin["statistic"])


def test_path_verdicts_on_planted_paths():
    """Token identity planted in the combination of two layers' first choices (each alone carries half of
    it): the path explains more than the best single layer, and the layers-independent control explains
    nothing; the bias-corrected interval brackets the corrected estimate."""
    import numpy as np
    import pandas as pd

    from routelib.data.tokenizer import load_tokenizer
    from routelib.routing.analyse.expert_path_verdicts import basic_bootstrap, path_verdicts

    rng = np.random.default_rng(0)
    n, seqs = 3000, 60
    token = rng.integers(0, 16, n)  # 16 token ids = 4 x 4
    experts = rng.integers(0, 8, (n, 3, 2))
    experts[:, 0, 0], experts[:, 1, 0] = token // 4, token % 4  # the path over layers 0-1 names the token
    df = pd.DataFrame({"problem_id": np.repeat(np.arange(seqs), n // seqs).astype(str), "dataset": "code",
                       "token_id": token + 300})
    table = path_verdicts(df, experts, load_tokenizer("bpe8k"), draws=5, permutations=3).set_index("measure")
    path = table.loc["token identity: path"]
    best = table.loc["token identity: single expert (best layer)"]
    control = table.loc["token identity: path, layers independent"]
    assert path["estimate"] > best["estimate"] + 0.2 and abs(control["estimate"]) < 0.05
    assert path["low"] <= path["estimate"] <= path["high"]
    b = basic_bootstrap(1.0, pd.Series([1.1, 1.2, 1.3]))
    assert b["bias"] == pytest.approx(0.2) and b["estimate"] == pytest.approx(0.8) and b["low"] < 0.8 < b["high"]
