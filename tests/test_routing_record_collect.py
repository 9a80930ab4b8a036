"""routelib.routing.record.collect: routing recorded during generate equals one full forward pass over the
final sequence, batching/padding changes nothing, EOS handling, resume after a crash, the CLI."""

import json

import numpy as np
import pytest
import torch

from routelib.errors import ConfigError
from routelib.routing.record import collect as C, routers as RT
from routelib.routing.record import traces as T
from routelib.routing.record.collect import collect
from routelib.routing.record.routers import NoMoELayersError
from routelib.routing.record.traces import load_traces, trace_arrays

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = {
    "p0": "def add(a, b):\n    return",
    "p1": "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:",
    "p2": "x",
    "p3": "import os\nimport sys\n\nclass Config:\n    def __init__(self):",
    "p4": "The quick brown fox",
}
NEW = 12  # generated tokens per prompt


@pytest.fixture(scope="module")
def tokenizer():
    from routelib.data.tokenizer import load_tokenizer

    return load_tokenizer("bpe8k")


def tiny_model(kind: str = "mixtral", seed: int = 0):
    """A random MoE causal LM small enough for CI; initializer_range 0.2 keeps greedy choices and
    router top-k well separated, so float noise between batched and unbatched runs cannot flip them."""
    import transformers as tf

    common = dict(vocab_size=8192, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, initializer_range=0.2,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    if kind == "mixtral":
        cfg = tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
        cls = tf.MixtralForCausalLM
    elif kind == "qwen2_moe":  # layer 0 dense: MoE layers are 1 and 2; top-k weights not renormalised
        cfg = tf.Qwen2MoeConfig(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                                shared_expert_intermediate_size=32, mlp_only_layers=[0], **common)
        cls = tf.Qwen2MoeForCausalLM
    elif kind == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=True,
                                **common)
        cls = tf.Qwen3MoeForCausalLM
    elif kind == "olmoe":
        cfg = tf.OlmoeConfig(num_experts=8, num_experts_per_tok=2, **common)
        cls = tf.OlmoeForCausalLM
    elif kind == "llama":
        cfg = tf.LlamaConfig(**common)
        cls = tf.LlamaForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    return cls(cfg).eval()


@pytest.fixture(scope="module")
def mixtral():
    return tiny_model("mixtral")


def run(model, tokenizer, out, prompts=PROMPTS, **kw):
    kw = {"dataset": "toy", "max_new_tokens": NEW, "batch_size": 2, "prepend_bos": True, "progress": False, **kw}
    collect(model, tokenizer, prompts, out, **kw)
    return load_traces(out)


def full_forward_routing(model, token_ids):
    """Top-k ids and weights of one forward pass (no cache) over the whole sequence, from the model's
    public router_logits: softmax, top-k, renormalised where the model does."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(token_ids))[None], output_router_logits=True)
    logits = torch.stack(out.router_logits, dim=1)  # (T, L, E)
    k = model.config.num_experts_per_tok
    weights, ids = RT.topk_from_logits(logits, k, RT._norm_topk(model.config))
    return ids.numpy(), weights.numpy(), out.logits[0]


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_collected_routing_equals_one_full_forward_pass(kind, tokenizer, tmp_path):
    model = tiny_model(kind)
    df = run(model, tokenizer, tmp_path / kind, batch_size=3)
    manifest = df.attrs["manifest"]
    num_layers = manifest["layout"]["num_moe_layers"]
    assert manifest["layout"]["moe_layers"] == ([1, 2] if kind == "qwen2_moe" else [0, 1, 2])
    assert manifest["layout"]["top_k"] == model.config.num_experts_per_tok
    arrays = trace_arrays(df)
    assert arrays.experts.shape == (len(df), num_layers, model.config.num_experts_per_tok)
    for pid, g in df.groupby("problem_id", sort=False):
        rows = g.index.to_numpy()
        ids, weights, logits = full_forward_routing(model, g["token_id"].to_numpy())
        np.testing.assert_array_equal(arrays.experts[rows], ids, err_msg=f"{kind} {pid}")
        np.testing.assert_allclose(arrays.weights[rows], weights, rtol=1e-5, atol=1e-6, err_msg=f"{kind} {pid}")
        # and the generated tokens are the greedy continuation of that same sequence
        gen = (g["phase"] == "generated").to_numpy()
        greedy = logits.argmax(-1).numpy()[np.flatnonzero(gen) - 1]
        np.testing.assert_array_equal(g["token_id"].to_numpy()[gen], greedy)
        assert gen.sum() == NEW


def test_batched_left_padding_equals_batch_size_1_and_never_appears(mixtral, tokenizer, tmp_path):
    one = run(mixtral, tokenizer, tmp_path / "bs1", batch_size=1)
    five = run(mixtral, tokenizer, tmp_path / "bs5", batch_size=5)  # one batch, very different lengths
    for col in ("problem_id", "position", "phase", "token_id", "token_text"):
        assert one[col].tolist() == five[col].tolist(), col
    a1, a5 = trace_arrays(one), trace_arrays(five)
    np.testing.assert_array_equal(a1.experts, a5.experts)
    np.testing.assert_allclose(a1.weights, a5.weights, rtol=1e-5, atol=1e-6)
    # no padding: each problem is exactly [BOS] + its prompt tokens, then NEW generated tokens
    for pid, text in PROMPTS.items():
        g = five[five["problem_id"] == pid]
        prompt = [tokenizer.bos_token_id] + tokenizer(text)["input_ids"]
        assert g.loc[g["phase"] == "prompt", "token_id"].tolist() == prompt
        assert (g["phase"] == "generated").sum() == NEW
        assert g["position"].tolist() == list(range(len(prompt) + NEW))
    assert len(five) == sum(len(tokenizer(t)["input_ids"]) + 1 + NEW for t in PROMPTS.values())


def test_stop_at_eos_keeps_eos_and_drops_what_generate_pads_after_it(tokenizer, tmp_path):
    model = tiny_model("mixtral")
    free = run(model, tokenizer, tmp_path / "free", stop_at_eos=False, batch_size=5)
    # make the 4th generated token of p0 the EOS: p0 stops there, the others run on in the same batch
    eos = int(free.loc[(free["problem_id"] == "p0") & (free["phase"] == "generated"), "token_id"].iloc[3])
    model.generation_config.eos_token_id = eos
    stop = run(model, tokenizer, tmp_path / "stop", stop_at_eos=True, batch_size=5)
    for pid in PROMPTS:
        f, s = free[free["problem_id"] == pid], stop[stop["problem_id"] == pid]
        gen = f.loc[f["phase"] == "generated", "token_id"].tolist()
        n = gen.index(eos) + 1 if eos in gen else len(gen)
        assert (s["phase"] == "generated").sum() == n
        expect = f.iloc[: len(f) - len(gen) + n]
        assert s["token_id"].tolist() == expect["token_id"].tolist()
        np.testing.assert_array_equal(trace_arrays(s, stop.attrs["manifest"]).experts,
                                      trace_arrays(expect, free.attrs["manifest"]).experts)
    assert (stop.loc[stop["problem_id"] == "p0", "phase"] == "generated").sum() == 4
    # stop_at_eos=False ignores the model's EOS: the same tokens as before it was set
    again = run(model, tokenizer, tmp_path / "again", stop_at_eos=False, batch_size=5)
    assert again["token_id"].tolist() == free["token_id"].tolist()


class Crash(RuntimeError):
    pass


def _same_traces(a, b):
    assert a.drop(columns=["experts", "weights"]).equals(b.drop(columns=["experts", "weights"]))
    np.testing.assert_array_equal(trace_arrays(a).experts, trace_arrays(b).experts)
    np.testing.assert_array_equal(trace_arrays(a).weights, trace_arrays(b).weights)


def test_resume_after_a_crash_gives_every_token_exactly_once(mixtral, tokenizer, tmp_path):
    reference = run(mixtral, tokenizer, tmp_path / "ref")

    def crash(entry):
        raise Crash("killed after the first shard")

    with pytest.raises(Crash):
        run(mixtral, tokenizer, tmp_path / "run", on_shard=crash)
    partial = T.read_manifest(tmp_path / "run")
    assert [s["problem_indices"] for s in partial["shards"]] == [[0, 1]]
    assert partial["datasets"]["toy"]["counts"]["complete"] is False
    seen = []
    resumed = run(mixtral, tokenizer, tmp_path / "run", on_shard=seen.append)
    assert [e["problem_indices"] for e in seen] == [[2, 3], [4]]  # only the missing problems were generated
    _same_traces(resumed, reference)
    assert not resumed.duplicated(["problem_id", "position"]).any()
    assert resumed.attrs["manifest"]["datasets"]["toy"]["counts"]["complete"] is True


def test_resume_adopts_a_shard_written_just_before_the_kill(mixtral, tokenizer, tmp_path, monkeypatch):
    reference = run(mixtral, tokenizer, tmp_path / "ref")
    real, calls = T.write_trace_manifest, []

    def killed(trace_dir, manifest):  # 1st call: the initial manifest; 3rd: after the 2nd shard
        calls.append(1)
        if len(calls) == 3:
            raise Crash("killed between the shard's rename and the manifest's")
        real(trace_dir, manifest)

    monkeypatch.setattr(T, "write_trace_manifest", killed)
    with pytest.raises(Crash):
        run(mixtral, tokenizer, tmp_path / "run")
    monkeypatch.setattr(T, "write_trace_manifest", real)
    assert (tmp_path / "run" / "toy-00002.parquet").is_file()
    assert len(T.read_manifest(tmp_path / "run")["shards"]) == 1
    with pytest.warns(UserWarning, match="not in the manifest"):
        load_traces(tmp_path / "run")
    seen = []
    resumed = run(mixtral, tokenizer, tmp_path / "run", on_shard=seen.append)
    assert [e["problem_indices"] for e in seen] == [[4]]  # problems 2, 3 came from the adopted shard
    _same_traces(resumed, reference)


def test_resume_refuses_other_settings_and_resume_false_starts_over(mixtral, tokenizer, tmp_path):
    with pytest.raises(Crash):
        run(mixtral, tokenizer, tmp_path / "run", on_shard=lambda e: (_ for _ in ()).throw(Crash()))
    with pytest.raises(ConfigError, match="different toy run.*max_new_tokens"):
        run(mixtral, tokenizer, tmp_path / "run", max_new_tokens=NEW + 1)
    df = run(mixtral, tokenizer, tmp_path / "run", max_new_tokens=NEW + 1, resume=False)
    assert (df.groupby("problem_id")["phase"].apply(lambda p: (p == "generated").sum()) == NEW + 1).all()
    assert len(df.attrs["manifest"]["shards"]) == 3


def test_a_folder_holds_one_models_traces_and_says_so_when_resume_false_cannot_help(mixtral, tokenizer, tmp_path):
    run(mixtral, tokenizer, tmp_path / "run")  # dataset "toy" from this model
    other = tiny_model("mixtral", seed=1)  # same architecture, other weights
    with pytest.raises(ConfigError, match="different model.*--no_resume"):  # resuming: starting over is a way out
        run(other, tokenizer, tmp_path / "run")
    with pytest.raises(ConfigError, match="different model.*use another out_dir") as err:  # other datasets bind it
        run(other, tokenizer, tmp_path / "run", dataset="more", resume=False)
    assert "--no_resume" not in str(err.value)
    assert len(load_traces(tmp_path / "run")) > 0  # nothing was deleted


def test_sampled_collection_is_seeded_per_batch_and_resumes_exactly(mixtral, tokenizer, tmp_path):
    kw = dict(greedy=False, seed=7, generation_kwargs={"temperature": 1.5, "top_p": 0.95})
    reference = run(mixtral, tokenizer, tmp_path / "ref", **kw)
    gen = reference.attrs["manifest"]["datasets"]["toy"]["generation"]
    assert gen["seed"] == 7 and gen["temperature"] == 1.5 and gen["top_p"] == 0.95 and gen["greedy"] is False
    torch.manual_seed(123)  # the caller's RNG state does not matter
    _same_traces(run(mixtral, tokenizer, tmp_path / "again", **kw), reference)
    with pytest.raises(Crash):
        run(mixtral, tokenizer, tmp_path / "run", on_shard=lambda e: (_ for _ in ()).throw(Crash()), **kw)
    _same_traces(run(mixtral, tokenizer, tmp_path / "run", **kw), reference)  # the resumed batches sample alike
    other = run(mixtral, tokenizer, tmp_path / "other", **{**kw, "seed": 8})
    greedy = run(mixtral, tokenizer, tmp_path / "greedy")
    tokens = lambda df: df.loc[df["phase"] == "generated", "token_id"].tolist()  # noqa: E731
    assert tokens(other) != tokens(reference) != tokens(greedy)
    with pytest.raises(ConfigError, match="different toy run.*seed"):
        run(mixtral, tokenizer, tmp_path / "run", **{**kw, "seed": 8})


@pytest.mark.parametrize("extra, match", [
    (["--temperature", "0.8"], "only apply with --sample"),
    (["--sample", "--temperature", "0"], "must be > 0"),
    (["--sample", "--top_p", "1.5"], r"must lie in \(0, 1\]"),
])
def test_cli_rejects_bad_sampling_settings(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        C.main(["--model", str(tmp_path / "none"), "--out", str(tmp_path / "t"), *extra])


def test_full_distribution(mixtral, tokenizer, tmp_path):
    df = run(mixtral, tokenizer, tmp_path / "full", full_distribution=True, prompts=dict(list(PROMPTS.items())[:2]))
    a = trace_arrays(df)
    assert a.probs.shape == (len(df), 3, 4) and a.probs.dtype == np.float16
    np.testing.assert_allclose(a.probs.astype(np.float32).sum(-1), 1.0, atol=2e-3)
    top = np.argsort(-a.probs.astype(np.float32), axis=-1, kind="stable")[..., :2]
    assert (np.sort(top, -1) == np.sort(a.experts, -1)).mean() > 0.99  # float16 ties aside
    assert df.attrs["manifest"]["layout"]["router_scores"] == "softmax"


def test_half_precision_weights_are_the_float32_weights_rounded_and_a_resume_cannot_mix_them(mixtral, tokenizer,
                                                                                             tmp_path):
    prompts = dict(list(PROMPTS.items())[:3])
    full = run(mixtral, tokenizer, tmp_path / "f32", prompts=prompts)
    half = run(mixtral, tokenizer, tmp_path / "f16", prompts=prompts, weights_dtype="float16")
    assert half.attrs["manifest"]["layout"]["weights_dtype"] == "float16"
    a, b = trace_arrays(full), trace_arrays(half)
    np.testing.assert_array_equal(a.experts, b.experts)
    assert b.weights.dtype == np.float32  # read back as float32 for the analyses
    np.testing.assert_array_equal(b.weights, a.weights.astype(np.float16).astype(np.float32))
    assert not np.array_equal(a.weights, b.weights)  # really stored in half precision
    with pytest.raises(ConfigError, match=r"different layout \(weights_dtype: .float16. -> .float32.\)"):  # into float16
        run(mixtral, tokenizer, tmp_path / "f16", prompts=prompts, dataset="more")
    with pytest.raises(ConfigError, match="weights_dtype 'bfloat16': choose one of float32, float16, uint8"):
        run(mixtral, tokenizer, tmp_path / "bad", prompts=prompts, weights_dtype="bfloat16")
    manifest = json.loads((tmp_path / "f16" / "manifest.json").read_text())
    manifest["layout"]["weights_dtype"] = "float32"
    (tmp_path / "f16" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(T.TraceError, match=r"column 'weights' has type fixed_size_list<halffloat>\[6\], expected fixed_size_list<float>"):
        load_traces(tmp_path / "f16")


def test_uint8_weights_are_the_float32_weights_quantised_in_frames_and_columns(mixtral, tokenizer, tmp_path):
    from routelib.routing.record.columns import open_columns

    prompts = dict(list(PROMPTS.items())[:3])
    a = trace_arrays(run(mixtral, tokenizer, tmp_path / "f32", prompts=prompts))
    frame = run(mixtral, tokenizer, tmp_path / "u8", prompts=prompts, weights_dtype="uint8")
    assert frame.attrs["manifest"]["layout"]["weights_dtype"] == "uint8"
    b = trace_arrays(frame)
    np.testing.assert_array_equal(a.experts, b.experts)
    assert b.weights.dtype == np.float32 and frame["weights"].iloc[0].dtype == np.float32  # read back, not 0..255
    np.testing.assert_array_equal(b.weights, np.rint(a.weights.astype(np.float64) * 255).astype(np.float32) / 255)
    assert 0 < np.abs(a.weights - b.weights).max() <= 1 / 510 + 1e-7
    cols = open_columns(tmp_path / "u8", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(cols.weights), b.weights)


def test_uint8_weights_refuse_values_outside_0_1():
    with pytest.raises(T.TraceError, match=r"uint8 gate weights hold values in \[0, 1\]; these range over \[0, 2.5\]"):
        T.encode_weights(np.array([[0.0, 2.5]]), "uint8")
    np.testing.assert_array_equal(T.encode_weights(np.array([0.0, 0.5, 1.0]), "uint8"), [0, 128, 255])


def test_no_moe_layers_is_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(NoMoELayersError, match=r"LlamaForCausalLM \(model_type 'llama'\) has no mixture-of-experts"):
        run(tiny_model("llama"), tokenizer, tmp_path / "llama")


def test_cli_writes_manifest_with_the_exact_command_and_overhead(tmp_path, tokenizer):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "traces"
    argv = ["--model", str(tmp_path / "model"), "--datasets", "humaneval,gsm8k", "--out", str(out),
            "--max_new_tokens", "humaneval=3,gsm8k=2", "--limit", "3", "--batch_size", "2", "--prepend_bos",
            "--overhead_problems", "2", "--overhead_new_tokens", "2", "--overhead_rounds", "2"]
    assert C.main(argv) == 0
    df = load_traces(out)
    manifest = json.loads((out / "manifest.json").read_text())
    command = "python -m routelib.routing.record.collect " + " ".join(argv)
    assert manifest["command"] == command
    assert manifest["datasets"]["gsm8k"]["command"] == command
    assert manifest["datasets"]["gsm8k"]["template"] == "Question: {question}\nAnswer:"
    assert manifest["datasets"]["humaneval"]["generation"]["max_new_tokens"] == 3
    assert set(df["problem_id"]) == {"HumanEval/0", "HumanEval/1", "HumanEval/2",
                                     "gsm8k/test/0", "gsm8k/test/1", "gsm8k/test/2"}
    assert manifest["totals"]["generated_tokens"] == 3 * 3 + 3 * 2
    assert {"generate_ms", "collection_ms", "overhead"} <= set(manifest["overhead"])
