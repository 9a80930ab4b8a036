"""Routing over windows of plain text (routelib.routing.record.text + collect_text + ``collect --text``):
every token's recorded experts are what the experts received, windows are consecutive slices of the
token stream, a killed run resumes to the uninterrupted result, ``--shard`` parts merge to it, the two
file readers, the named errors, and the shipped text trace set of the subject."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from routelib import paths
from routelib.data.batching import token_stream
from routelib.data.corpus import DOMAINS
from routelib.data.tokenizer import load_tokenizer
from routelib.errors import ConfigError
from routelib.io import sha256_file
from routelib.routing.record import collect as C, shards as S, traces as T
from routelib.routing.record.architectures import ExpertInputs, tiny_model
from routelib.routing.record.collect import collect_text
from routelib.routing.record.routers import load_model
from routelib.routing.record.text import (TextInputError, corpus_windows, cut, document_stream, file_windows,
                                          read_texts)
from routelib.routing.record.traces import load_traces, trace_arrays, trace_info

pytestmark = pytest.mark.usefixtures("one_thread")

SUBJECT = paths.in_repo("data/moe-subject")
DOCS = ["The cat sat on the mat. It was warm, and the afternoon was long.",
        "def add(a, b):\n    return a + b\nprint(add(2, 3))",
        "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer: 7",
        "Paris is the capital and most populous city of France, on the Seine.",
        "Officials said on Tuesday that the bridge would reopen next month after repairs."]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bpe8k")


@pytest.fixture(scope="module")
def mixtral():
    return tiny_model("mixtral")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(DOCS) + "\n")
    return path


def _sorted_slots(ids, weights):
    """Slots compared as sets: (ids, weights) sorted by expert id along the last axis."""
    ids, weights = np.asarray(ids), np.asarray(weights)
    order = np.argsort(ids, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


@pytest.mark.parametrize("which", ["mixtral", "qwen2_moe", "subject"])
def test_every_window_token_records_what_the_experts_received(which, tokenizer, text_file, tmp_path):
    """The traces of text windows equal, token by token and MoE layer by layer, the expert ids and gate
    weights the model handed its experts in that same pass; rows are the windows' tokens in order."""
    if which == "subject":
        model, tokenizer = load_model(str(SUBJECT))
    else:
        model = tiny_model(which)
    windows = file_windows(tokenizer, text_file, window=8)
    with ExpertInputs(model) as received:
        collect_text(model, tokenizer, windows, tmp_path / "out", batch_size=3, progress=False)
    df = load_traces(tmp_path / "out")
    traces = trace_arrays(df)
    ids, weights = received.arrays()
    assert traces.experts.shape == tuple(ids.shape) == (windows.tokens.size, traces.experts.shape[1], 2)
    got_ids, got_w = _sorted_slots(traces.experts, traces.weights)
    want_ids, want_w = _sorted_slots(ids.numpy(), weights.numpy())
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(df["token_id"].to_numpy(), windows.tokens.reshape(-1))
    np.testing.assert_array_equal(df["position"].to_numpy(), np.tile(np.arange(8), len(windows.tokens)))
    assert (df["phase"] == "prompt").all() and df["problem_id"].unique().tolist() == windows.problem_ids
    text = trace_info(df.attrs["manifest"]).text_of("docs")
    assert text["window"] == 8 and text["format"] == "plain" and text["documents"] == len(DOCS)


def test_a_window_is_routed_as_if_it_were_alone(tokenizer, text_file, tmp_path):
    """Windows batched together do not see each other: each equals a forward pass over it alone
    (the subject's public router logits: softmax, top-2, renormalised as Mixtral does)."""
    model, tokenizer = load_model(str(SUBJECT))
    windows = file_windows(tokenizer, text_file, window=16)
    collect_text(model, tokenizer, windows, tmp_path / "out", batch_size=4, progress=False)
    traces = trace_arrays(load_traces(tmp_path / "out"))
    with torch.no_grad():
        for w, row in enumerate(windows.tokens):
            logits = model(torch.from_numpy(row)[None], output_router_logits=True).router_logits  # L x (W, E)
            probs = torch.stack([torch.softmax(l.float(), -1) for l in logits], 1)  # (W, L, E)
            top_w, top_i = probs.topk(2, dim=-1)
            got = traces.experts[w * 16:(w + 1) * 16], traces.weights[w * 16:(w + 1) * 16]
            np.testing.assert_array_equal(got[0], top_i.numpy())
            np.testing.assert_allclose(got[1], (top_w / top_w.sum(-1, keepdim=True)).numpy(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# windows


def test_file_windows_are_consecutive_slices_of_the_document_stream(tokenizer, text_file):
    stream = document_stream(tokenizer, DOCS)
    sep = tokenizer.backend_tokenizer.token_to_id("<|endoftext|>")
    assert stream[-1] == sep and (stream == sep).sum() == len(DOCS)  # one separator after each document
    windows = file_windows(tokenizer, text_file, window=10)
    n = len(stream) // 10
    np.testing.assert_array_equal(windows.tokens.reshape(-1), stream[: n * 10])
    assert windows.problem_ids == [f"docs/{k}" for k in range(n)] and windows.info["stream_tokens"] == len(stream)
    capped = file_windows(tokenizer, text_file, window=10, max_tokens=35, name="mine")
    assert capped.tokens.shape == (3, 10) and capped.dataset == "mine" and capped.problem_ids[0] == "mine/0"
    assert cut(np.arange(7), 3, None).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_corpus_windows_read_the_splits_in_order_and_never_mix_them(tokenizer):
    windows = corpus_windows(tokenizer, "news", window=256, max_tokens=2048, splits=("validation", "test"))
    val, test = (np.asarray(token_stream("news", s, tokenizer), dtype=np.int64) for s in ("validation", "test"))
    n_val = len(val) // 256
    assert windows.tokens.shape == (8, 256) and 0 < n_val < 8
    assert windows.problem_ids == ([f"news/validation/{k}" for k in range(n_val)]
                                   + [f"news/test/{k}" for k in range(8 - n_val)])
    np.testing.assert_array_equal(windows.tokens[:n_val].reshape(-1), val[: n_val * 256])
    np.testing.assert_array_equal(windows.tokens[n_val:].reshape(-1), test[: (8 - n_val) * 256])
    assert windows.info["split_windows"] == {"validation": n_val, "test": 8 - n_val}
    default = corpus_windows(tokenizer, "math", window=64, max_tokens=640)
    assert default.info["splits"] == ["validation"] and default.problem_ids[-1] == "math/validation/9"


# ----------------------------------------------------------------------------------------------
# readers


def test_json_lines_reader(tmp_path):
    path = tmp_path / "texts.txt"  # no .jsonl suffix: told by its first line
    path.write_text('\n{"text": "first \\u00e9 doc\\n\\nwith a blank line", "id": 1}\n\n{"text": ""}\n'
                    '  {"text": "second", "meta": {"a": 1}}\n')
    assert read_texts(path) == ("jsonl", ["first \u00e9 doc\n\nwith a blank line", "second"])
    suffixed = tmp_path / "t.jsonl"
    suffixed.write_bytes(b'\xef\xbb\xbf{"text": "bom first"}\n')  # a UTF-8 byte-order mark is dropped
    assert read_texts(suffixed) == ("jsonl", ["bom first"])


def test_plain_text_reader_splits_documents_at_blank_lines(tmp_path):
    path = tmp_path / "plain.md"
    path.write_text("\n\nline one\n  indented two\n\n \t \n\n\nsecond doc\r\nstill second\n\nthird")
    assert read_texts(path) == ("plain", ["line one\n  indented two", "second doc\nstill second", "third"])
    braces = tmp_path / "code.txt"
    braces.write_text("{\n  x\n}\n\nnext")
    assert read_texts(braces, "plain") == ("plain", ["{\n  x\n}", "next"])


@pytest.mark.parametrize("content, fmt, message", [
    (b"", "auto", "is empty: no text to route"),
    (b" \n\n\t\n", "auto", "is empty: no text to route"),
    (b'{"text": ""}\n{"text": ""}\n', "auto", "is empty: its jsonl records hold no text"),
    (b"\xff\xfe\x00binary", "auto", "neither JSON lines nor plain text: not UTF-8"),
    (b"abc\x00def", "auto", "neither JSON lines nor plain text: it holds NUL bytes"),
    (b'{"text": "ok"}\n{"txt": "no"}\n', "auto", r':2: not a JSON object with a string "text" .*--text_format plain'),
    (b'{"text": "ok"}\n{broken\n', "auto", ":2: not JSON"),
    (b'["text"]\n', "jsonl", ':1: not a JSON object with a string "text" field; the file is neither'),
])
def test_bad_files_are_named(tmp_path, content, fmt, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(TextInputError, match=message):
        read_texts(path, fmt)


def test_bad_inputs_give_named_errors(tokenizer, text_file, tmp_path):
    with pytest.raises(TextInputError, match="not found"):
        read_texts(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="text format 'csv'"):
        read_texts(text_file, "csv")
    with pytest.raises(ConfigError, match="window 1: must be >= 2"):
        file_windows(tokenizer, text_file, window=1)
    with pytest.raises(ConfigError, match="max_tokens 5 is less than one window of 8"):
        file_windows(tokenizer, text_file, window=8, max_tokens=5)
    with pytest.raises(TextInputError, match=r"has \d+ tokens, fewer than one window of 4096"):
        file_windows(tokenizer, text_file, window=4096)
    with pytest.raises(ConfigError, match="unknown corpus domain 'poetry'"):
        corpus_windows(tokenizer, "poetry", window=64)
    with pytest.raises(ConfigError, match="splits .*'dev'"):
        corpus_windows(tokenizer, "news", window=64, splits=("dev",))


# ----------------------------------------------------------------------------------------------
# resume and parts


def test_resume_after_interruption_gives_the_uninterrupted_rows(mixtral, tokenizer, text_file, tmp_path):
    windows = file_windows(tokenizer, text_file, window=6)
    assert len(windows.tokens) >= 7
    run = dict(batch_size=2, progress=False)
    collect_text(mixtral, tokenizer, windows, tmp_path / "ref", **run)
    reference = load_traces(tmp_path / "ref")

    def crash(entry):
        if entry["problem_indices"][0] == 2:
            raise RuntimeError("killed after the second shard")

    with pytest.raises(RuntimeError, match="killed"):
        collect_text(mixtral, tokenizer, windows, tmp_path / "run", on_shard=crash, **run)
    assert not T.read_manifest(tmp_path / "run")["datasets"]["docs"]["counts"]["complete"]
    seen = []
    collect_text(mixtral, tokenizer, windows, tmp_path / "run", on_shard=seen.append, **run)
    resumed = load_traces(tmp_path / "run")
    assert seen[0]["problem_indices"] == [4, 5]  # only the missing windows were routed
    pd.testing.assert_frame_equal(resumed, reference)
    with pytest.raises(ConfigError, match="different docs run"):  # other windows: refused, not mixed in
        collect_text(mixtral, tokenizer, file_windows(tokenizer, text_file, window=5), tmp_path / "run", **run)


def test_resume_adopts_a_shard_written_just_before_the_kill(mixtral, tokenizer, text_file, tmp_path, monkeypatch):
    windows = file_windows(tokenizer, text_file, window=6)
    collect_text(mixtral, tokenizer, windows, tmp_path / "ref", batch_size=3, progress=False)
    real, calls = T.write_trace_manifest, []

    def killed(trace_dir, manifest):  # 1st call: the initial manifest, 2nd: after the first shard, 3rd: second
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed between the shard's rename and the manifest's")
        real(trace_dir, manifest)

    monkeypatch.setattr(T, "write_trace_manifest", killed)
    with pytest.raises(RuntimeError, match="killed"):
        collect_text(mixtral, tokenizer, windows, tmp_path / "run", batch_size=3, progress=False)
    monkeypatch.setattr(T, "write_trace_manifest", real)
    seen = []
    collect_text(mixtral, tokenizer, windows, tmp_path / "run", batch_size=3, progress=False, on_shard=seen.append)
    assert seen and seen[0]["problem_indices"][0] == 6  # windows 3-5 came from the adopted shard
    pd.testing.assert_frame_equal(load_traces(tmp_path / "run"), load_traces(tmp_path / "ref"))


def test_shard_parts_merge_into_the_one_process_rows(mixtral, tokenizer, text_file, tmp_path):
    windows = file_windows(tokenizer, text_file, window=6)
    collect_text(mixtral, tokenizer, windows, tmp_path / "one", batch_size=2, progress=False)
    for i in (1, 2):
        collect_text(mixtral, tokenizer, windows, S.shard_dir(tmp_path / "split", i, 2), batch_size=2, shard=(i, 2),
                     progress=False)
    S.merge(tmp_path / "split")
    pd.testing.assert_frame_equal(load_traces(tmp_path / "split").reset_index(drop=True),
                                  load_traces(tmp_path / "one").reset_index(drop=True))


# ----------------------------------------------------------------------------------------------
# the command line


def test_cli_records_a_text_file_with_the_exact_command(text_file, tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    argv = ["--model", str(SUBJECT), "--text_file", str(jsonl), "--window", "12", "--batch_size", "2",
            "--out", str(tmp_path / "out")]
    assert C.main(argv) == 0
    df = load_traces(tmp_path / "out")
    manifest = df.attrs["manifest"]
    assert manifest["command"] == "python -m routelib.routing.record.collect " + " ".join(argv)
    text = manifest["datasets"]["docs"]["text"]
    assert text["format"] == "jsonl" and text["window"] == 12 and text["file_sha256"] == sha256_file(jsonl)
    assert manifest["datasets"]["docs"]["generation"] is None and (df["phase"] == "prompt").all()


@pytest.mark.parametrize("extra, message", [
    (["--text", "poetry"], r"unknown domain\(s\) \['poetry'\]"),
    (["--text", "news", "--window", "1"], "window 1: must be >= 2"),
    (["--text", "news", "--max_new_tokens", "8"], "--max_new_tokens: generation options"),
    (["--text", "news", "--datasets", "gsm8k"], "--datasets: generation options"),
    (["--text", "news", "--text_file", "x.txt"], "give one"),
    (["--text_file", "x.txt", "--split", "train"], "--split applies to corpus domains"),
    (["--text", "news", "--text_name", "n"], "--text_name applies to --text_file"),
    (["--window", "64"], "--window: options of plain-text collection"),
])
def test_cli_refuses_options_that_do_not_fit(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        C.main(["--model", str(SUBJECT), "--out", str(tmp_path / "out"), *extra])


# ----------------------------------------------------------------------------------------------
# the shipped text set


TEXT_SETS = {  # set -> (the model that routed it, its tokenizer, its greedy trace set: the same routers)
    "moe-subject-text": ("data/moe-subject", "bpe8k", "moe-subject"),
    "moe-subject-v3-text": ("data/moe-subject-v3", "smollm2", "moe-subject-v3"),
}


@pytest.mark.parametrize("name", sorted(TEXT_SETS))
def test_shipped_text_set_validates_and_covers_every_domain(name):
    """Every corpus domain, windows of 256 tokens of the subject's own stream, >= 50,000 tokens each
    except news, whose whole corpus (all three splits) holds fewer: every full window of it is there.
    Within the trace format's 25 MB per shipped set, made by the recorded command with the subject."""
    model, tokenizer, generated = TEXT_SETS[name]
    folder = paths.TRACES_DIR / name
    df = load_traces(folder, columns=["dataset", "problem_id", "position", "phase"])
    info = trace_info(df.attrs["manifest"])
    assert set(info.datasets) == set(DOMAINS) and (df["phase"] == "prompt").all() and df["position"].max() == 255
    tokens = df.groupby("dataset").size()
    tok = load_tokenizer(tokenizer)
    for domain in DOMAINS:
        text = info.text_of(domain)
        assert text["window"] == 256 and text["tokens"] == tokens[domain]
        assert text["splits"] == ["validation", "test", "train"] and next(iter(text["split_windows"])) == "validation"
        if domain == "news":
            whole = sum(len(token_stream(domain, s, tok)) // 256 * 256 for s in text["splits"])
            assert tokens[domain] == whole < 50_000
        else:
            assert tokens[domain] >= 50_000
    assert info.model == model and info.command.startswith(
        f"python -m routelib.routing.record.collect --model {model} --text all")
    subject = T.read_manifest(paths.TRACES_DIR / generated)
    assert df.attrs["manifest"]["model"]["router_weights_sha256"] == subject["model"]["router_weights_sha256"]
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 25e6
