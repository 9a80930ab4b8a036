"""routelib.routing.record.traces: schema round trip, and a clear TraceError for every kind of damage
(truncated, altered, missing, mismatched layout, duplicated tokens, bad manifest); the shipped traces."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from routelib.io import sha256_file

from routelib import paths
from routelib.paths import TRACES_DIR
from routelib.routing.record import traces as T
from routelib.routing.record.traces import TraceError, load_traces, trace_arrays

pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED = TRACES_DIR / "moe-subject"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A small valid trace directory: 3 prompts x 6 new tokens from a tiny random Mixtral, 2 shards."""
    from test_routing_record_collect import run, tiny_model

    from routelib.data.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("traces") / "toy"
    prompts = {"a": "def f(x):", "b": "Question: 2 + 2?\nAnswer:", "c": "Once upon a time"}
    run(tiny_model("mixtral"), load_tokenizer("bpe8k"), out, prompts=prompts, max_new_tokens=6, batch_size=2)
    return out


@pytest.fixture
def traces(clean, tmp_path):
    out = tmp_path / "toy"
    shutil.copytree(clean, out)
    return out


def first_shard(trace_dir):
    return trace_dir / T.read_manifest(trace_dir)["shards"][0]["file"]


def rewrite(trace_dir, table):
    """Replace the first shard by ``table`` and fix its manifest entry (bytes, sha256): a file that is
    intact but does not fit the manifest's layout."""
    path = first_shard(trace_dir)
    pq.write_table(table, path)
    manifest = T.read_manifest(trace_dir)
    manifest["shards"][0].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    T.write_trace_manifest(trace_dir, manifest)


def test_round_trip(traces):
    df = load_traces(traces)
    m = df.attrs["manifest"]
    assert list(df.columns) == [*T.SCALAR_COLUMNS, "experts", "weights"]
    assert len(df) == m["totals"]["rows"]
    assert (df["phase"] == "generated").sum() == m["totals"]["generated_tokens"] == 3 * 6
    assert df["problem_id"].unique().tolist() == ["a", "b", "c"]
    a = trace_arrays(df)
    assert a.experts.shape == a.weights.shape == (len(df), 3, 2) and a.probs is None
    assert a.experts.dtype == np.int16 and a.weights.dtype == np.float32
    np.testing.assert_allclose(a.weights.sum(-1), 1.0, atol=1e-5)  # Mixtral renormalises the top-2
    schema = pq.read_schema(first_shard(traces))
    assert schema.field("experts").type == pa.list_(pa.int16(), 6)
    assert json.loads(schema.metadata[b"routelib.layout"]) == {"num_moe_layers": 3, "top_k": 2, "num_experts": 4}
    only_b = load_traces(traces, datasets=["toy"], columns=["problem_id", "token_id"])
    assert list(only_b.columns) == ["problem_id", "token_id"]


def test_truncated_shard(traces):
    path = first_shard(traces)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match=r"is truncated: \d+ bytes, the manifest says"):
        load_traces(traces)
    with pytest.raises(TraceError, match="not a readable Parquet file"):
        load_traces(traces, validate=False)


def test_altered_bytes(traces):
    path = first_shard(traces)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TraceError, match="was altered: sha256"):
        load_traces(traces)


def test_missing_shard(traces):
    first_shard(traces).unlink()
    with pytest.raises(TraceError, match="listed in the manifest but missing"):
        load_traces(traces)


def test_missing_column(traces):
    table = pq.read_table(first_shard(traces))
    rewrite(traces, table.drop_columns(["weights"]))
    with pytest.raises(TraceError, match=r"lacks column\(s\) \['weights'\]"):
        load_traces(traces)


def test_mismatched_shapes(traces):
    table = pq.read_table(first_shard(traces))
    flat = table.column("experts").combine_chunks().flatten()
    narrower = pa.FixedSizeListArray.from_arrays(flat.slice(0, table.num_rows * 4), 4)  # 2 layers, not 3
    rewrite(traces, table.set_column(table.schema.get_field_index("experts"), "experts", narrower))
    with pytest.raises(TraceError, match=r"'experts' has type fixed_size_list<int16>\[4\], expected [^ ]+\[6\]"):
        load_traces(traces)


def test_layout_of_another_model(traces):
    manifest = T.read_manifest(traces)
    manifest["layout"]["top_k"] = 1
    T.write_trace_manifest(traces, manifest)
    with pytest.raises(TraceError, match="expected fixed_size_list"):
        load_traces(traces)


def test_expert_ids_out_of_range(traces):
    table = pq.read_table(first_shard(traces))
    experts = table.column("experts").combine_chunks()
    values = experts.flatten().to_numpy().copy()
    values[0] = 99
    bad = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.int16()), 6)
    rewrite(traces, table.set_column(table.schema.get_field_index("experts"), "experts", bad))
    with pytest.raises(TraceError, match=r"expert ids outside \[0, 4\)"):
        load_traces(traces)


def test_row_count_mismatch(traces):
    manifest = T.read_manifest(traces)
    manifest["shards"][0]["rows"] += 1
    T.write_trace_manifest(traces, manifest)
    with pytest.raises(TraceError, match="rows, the manifest says"):
        load_traces(traces)


def test_duplicated_tokens(traces):
    manifest = T.read_manifest(traces)
    copy = dict(manifest["shards"][0], file="toy-copy.parquet")
    shutil.copy(traces / manifest["shards"][0]["file"], traces / "toy-copy.parquet")
    manifest["shards"].append(copy)
    T.write_trace_manifest(traces, manifest)
    with pytest.raises(TraceError, match=r"token \(toy, a, position 0\) appears more than once"):
        load_traces(traces)


def test_bad_manifest(traces, tmp_path):
    with pytest.raises(TraceError, match="not a routing-trace directory"):
        load_traces(tmp_path / "nowhere")
    text = (traces / "manifest.json").read_text()
    (traces / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(TraceError, match="not valid JSON"):
        load_traces(traces)
    (traces / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(TraceError, match="not a routelib routing-trace manifest"):
        load_traces(traces)


SAMPLED = TRACES_DIR / "moe-subject-sampled"


@pytest.mark.parametrize("trace_dir", [SHIPPED, SAMPLED], ids=["greedy", "sampled"])
def test_shipped_traces_validate(trace_dir):
    """Both shipped trace sets of the subject (greedy and sampled decoding of the same prompts): every
    shard's checksum and schema valid, HumanEval complete and >= 300 GSM8K problems, at least as many
    generated-token journeys as the original Mixtral routing analysis (29,463 HumanEval, 14,820 GSM8K), no token beyond the
    subject's trained context, the decoding the folder's name says."""
    df = load_traces(trace_dir, columns=["dataset", "problem_id", "phase", "position"])
    m = df.attrs["manifest"]
    counts = df[df["phase"] == "generated"].groupby("dataset").size()
    assert counts["humaneval"] >= 29_463 and counts["gsm8k"] >= 14_820
    problems = df.groupby("dataset")["problem_id"].nunique()
    assert problems["humaneval"] == 164 and problems["gsm8k"] >= 300
    assert m["model"]["name_or_path"] == "data/moe-subject"
    # the command as it was run (the collector has since moved to routelib.routing.record.collect)
    assert m["command"].startswith("python -m routelib.routing.collect --model data/moe-subject")
    card = json.loads((paths.in_repo("data/moe-subject") / "model_card.json").read_text())
    assert m["model"]["router_weights_sha256"] and df["position"].max() < card["study_config"]["seq_len"]
    for dataset in ("humaneval", "gsm8k"):
        gen = m["datasets"][dataset]["generation"]
        assert gen["greedy"] is (trace_dir == SHIPPED)
        if trace_dir == SAMPLED:
            assert gen["seed"] is not None and gen["temperature"] and gen["top_p"]


def test_shipped_trace_sets_fit_25_mb_and_decode_the_same_prompts():
    a, b = (T.read_manifest(d) for d in (SHIPPED, SAMPLED))
    assert a["model"] == b["model"]
    assert {d: v["prompts_sha256"] for d, v in a["datasets"].items()} == \
        {d: v["prompts_sha256"] for d, v in b["datasets"].items()}
    size = sum(p.stat().st_size for d in (SHIPPED, SAMPLED) for p in d.iterdir())
    assert size <= 25e6


V3_SETS = {"greedy": TRACES_DIR / "moe-subject-v3", "sampled": TRACES_DIR / "moe-subject-v3-sampled"}


@pytest.mark.parametrize("decoding", sorted(V3_SETS))
def test_subject_v3_traces_validate(decoding):
    """Subject v3's trace sets (30 MoE layers, gate weights in half precision): every shard valid,
    HumanEval complete and >= 300 GSM8K problems, up to 192 new tokens each (a GSM8K answer mostly
    ends earlier, at its end-of-sequence token), the decoding the folder's name says, each set within
    the trace format's 25 MB; the greedy set records the collection's overhead against plain generate."""
    trace_dir = V3_SETS[decoding]
    df = load_traces(trace_dir, columns=["dataset", "problem_id", "phase"])
    m = df.attrs["manifest"]
    assert m["model"]["name_or_path"] == "data/moe-subject-v3" and m["model"]["architecture"] == "Qwen2MoeForCausalLM"
    assert m["command"].startswith("python -m routelib.routing.record.collect --model data/moe-subject-v3")
    assert m["layout"]["num_moe_layers"] == 30 and m["layout"]["weights_dtype"] == "float16"
    problems = df.groupby("dataset")["problem_id"].nunique()
    assert problems["humaneval"] == 164 and problems["gsm8k"] >= 300
    generated = df[df["phase"] == "generated"].groupby(["dataset", "problem_id"]).size()
    assert generated.max() == 192 and (generated.loc["humaneval"] == 192).mean() > 0.5
    for dataset in ("humaneval", "gsm8k"):
        gen = m["datasets"][dataset]["generation"]
        assert gen["greedy"] is (decoding == "greedy") and gen["max_new_tokens"] == 192
        if decoding == "sampled":
            assert gen["seed"] is not None and gen["temperature"] and gen["top_p"]
    assert ("overhead" in m) is (decoding == "greedy")
    assert sum(p.stat().st_size for p in trace_dir.iterdir()) <= 25e6


def test_subject_v3_sets_decode_the_same_prompts_with_the_same_model():
    a, b = (T.read_manifest(d) for d in V3_SETS.values())
    assert a["model"] == b["model"]
    assert {d: v["prompts_sha256"] for d, v in a["datasets"].items()} == \
        {d: v["prompts_sha256"] for d, v in b["datasets"].items()}


def test_old_layouts_read_as_softmax_without_zero_computation_experts():
    from routelib import paths

    manifest = T.read_manifest(paths.in_repo("routing_data_collected/moe-subject"))
    assert T.router_scores(manifest) == ["softmax"] * manifest["layout"]["num_moe_layers"]
    assert T.zero_computation_experts(manifest) == []
    assert T.router_scores({"layout": {"num_moe_layers": 2, "top_k": 2, "num_experts": 4,
                                       "router_scores": ["sigmoid", "softmax"]}}) == ["sigmoid", "softmax"]


def test_trace_info_defaults_what_an_import_may_lack():
    """One reader for every manifest: a minimal imported manifest (format and layout only) reads with
    defaults; the shipped collection's with its recorded fields; a malformed field is one line."""
    minimal = {"format": T.FORMAT, "format_version": T.FORMAT_VERSION, "source": {"kind": "jsonl"},
               "layout": {"num_moe_layers": 3, "top_k": 2, "num_experts": 4}}
    info = T.trace_info(minimal)
    assert (info.num_layers, info.top_k, info.num_experts, info.moe_layers) == (3, 2, 4, (0, 1, 2))
    assert info.router_scores == ("softmax",) * 3 and info.zero_computation_experts == () and not info.full_distribution
    assert (info.model, info.architecture, info.router_weights_sha256, info.vocab_size, info.command) == (None,) * 5
    assert info.imported and info.generation_of("gsm8k") == {} and info.overhead is None and info.datasets == ()
    assert info.describe() == ("model not recorded (architecture not recorded; imported from jsonl): 3 MoE layers, "
                               "top-2 of 4 experts")
    shipped = T.trace_info(SHIPPED)
    assert not shipped.imported and shipped.architecture == "MixtralForCausalLM" and shipped.vocab_size == 8192
    assert shipped.generation_of("humaneval")["greedy"] is True and shipped.command.startswith("python -m")
    assert shipped.describe() == "model data/moe-subject (MixtralForCausalLM): 6 MoE layers, top-2 of 8 experts"
    vllm = T.trace_info({**minimal, "source": {"kind": "vllm", "generation": {"gsm8k": {"greedy": False}}},
                         "tokenizer": {"vocab_size": 1, "token_ids_recorded": False}})
    assert vllm.generation_of("gsm8k") == {"greedy": False} and vllm.vocab_size is None
    for broken, message in [({k: v for k, v in minimal.items() if k != "layout"}, "no valid 'layout'"),
                            ({**minimal, "model": "mixtral"}, "'model' must be an object"),
                            ({**minimal, "layout": {**minimal["layout"], "router_scores": ["softmax"]}},
                             "router_scores lists 1 kinds for 3 MoE layers")]:
        with pytest.raises(T.TraceError, match=message):
            T.trace_info(broken)
