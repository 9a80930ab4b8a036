"""Mixtral-architecture LM: equivalence with transformers' Mixtral through export, KV-cache decoding,
causality, router losses in training, parameter counts, config validation."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

from routelib.errors import ConfigError
from routelib.models import LM, LMConfig, export_hf, load_hf
from routelib.models.moe import param_counts

transformers = pytest.importorskip("transformers")

TINY = LMConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=16, num_experts=4, top_k=2, init_std=0.1, z_loss_coef=1e-3)
VARIANTS = {
    "moe": TINY,
    "moe-tied": replace(TINY, tie_embeddings=True, rope_theta=1e6),
    "dense": TINY.dense_matching("active"),  # num_experts=0, FFN width k*I
    "dense-tied": replace(TINY.dense_matching("total"), tie_embeddings=True),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make(cfg: LMConfig, seed: int = 0) -> LM:
    torch.manual_seed(seed)
    return LM(cfg).eval()


def ids(batch=3, length=13, vocab=TINY.vocab_size, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{variant: (routelib model, export dir)}."""
    out = {}
    for name, cfg in VARIANTS.items():
        model = make(cfg)
        out[name] = (model, export_hf(model, None, tmp_path_factory.mktemp(name)))
    return out


def hf_model(path, attn="eager"):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------
# equivalence with transformers


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_mixtral_same_logits_and_routing(exported, variant, attn):
    model, path = exported[variant]
    hf = hf_model(path, attn)
    x = ids()
    with torch.no_grad():
        ours = model(x, output_router_logits=True)
        theirs = hf(x, output_router_logits=True)
    torch.testing.assert_close(theirs.logits, ours.logits, atol=1e-5, rtol=1e-5)
    cfg = model.config
    # transformers 5.x: router_logits is a tuple, one (B*T, E) tensor of pre-softmax logits per layer
    assert isinstance(theirs.router_logits, tuple) and len(theirs.router_logits) == cfg.num_layers
    if cfg.is_moe:
        assert len(ours.router) == cfg.num_layers
        for layer, (r, hl) in enumerate(zip(ours.router, theirs.router_logits)):
            assert hl.shape == (x.numel(), cfg.num_experts)
            torch.testing.assert_close(hl, r.logits, atol=1e-5, rtol=1e-5)
            top = torch.topk(F.softmax(hl.float(), -1), cfg.top_k, dim=-1).indices  # (B*T, k)
            assert torch.equal(top, r.indices), f"layer {layer} routes differently"
            assert r.indices.unique().numel() > 1  # routing is not trivially one expert
        assert [t.shape for t in ours.router_logits] == [t.shape for t in theirs.router_logits]
    else:  # the dense export is a 1-expert top-1 Mixtral: every token "chooses" expert 0
        assert ours.router is None and ours.aux_loss is None
        assert all(hl.shape == (x.numel(), 1) for hl in theirs.router_logits)


def test_hf_router_logits_only_on_request(exported):
    _, path = exported["moe"]
    with torch.no_grad():
        out = hf_model(path)(ids(), output_router_logits=False)
    assert out.router_logits is None and out.aux_loss is None


def test_export_folder_loads_offline_with_tokenizer(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from routelib.data.tokenizer import load_tokenizer

    tok = load_tokenizer("bpe8k")
    cfg = replace(TINY, vocab_size=len(tok), max_seq_len=512)
    model = make(cfg)
    export_hf(model, tok, tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    expected = dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=8192, hidden_size=32,
                    intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=8, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e4,
                    max_position_embeddings=512, tie_word_embeddings=False, output_router_logits=False,
                    sliding_window=None, dtype="float32", torch_dtype="float32", bos_token_id=0,
                    eos_token_id=0, pad_token_id=1, router_aux_loss_coef=0.01 * 2 / 2)
    assert {k: hf_cfg[k] for k in expected} == expected
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.rope_parameters["rope_theta"] == 1e4 and config.num_local_experts == 4
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    text = "def f(x):\n    return x + 1<|endoftext|>"
    assert tok2(text).input_ids == tok(text).input_ids
    x = torch.tensor([tok(text).input_ids, tok("The cat sat on the mat." * 2).input_ids[: len(tok(text).input_ids)]])
    x[0, 2] = tok.pad_token_id  # the pad row of the embedding must survive HF's padding_idx
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_tied_export_has_no_lm_head_tensor(exported):
    from safetensors import safe_open

    for variant, tied in [("moe", False), ("moe-tied", True), ("dense-tied", True)]:
        model, path = exported[variant]
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert ("lm_head.weight" in keys) is (not tied)
        assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is tied
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in keys  # per-expert layout
        hf = hf_model(path)
        assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) is tied


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_load_hf(exported, variant):
    model, path = exported[variant]
    back = load_hf(path)
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    if model.config.tie_embeddings:
        assert back.lm_head.weight is back.embed.weight
    assert not back.training


def test_export_bf16(tmp_path):
    model = make(TINY)
    export_hf(model, None, tmp_path, dtype=torch.bfloat16)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["dtype"] == hf_cfg["torch_dtype"] == "bfloat16"
    back = load_hf(tmp_path)
    assert back.embed.weight.dtype == torch.bfloat16
    assert torch.equal(back.embed.weight, model.embed.weight.to(torch.bfloat16))
    assert load_hf(tmp_path, dtype=torch.float32).embed.weight.dtype == torch.float32


@pytest.mark.parametrize("layout", ["per-expert (transformers save_pretrained)", "fused (v5 module names)"])
def test_load_hf_reads_transformers_checkpoints(tmp_path, layout):
    """A Mixtral made and saved by transformers (no routelib.json) loads into routelib."""
    from safetensors.torch import save_file
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, num_local_experts=3,
                           num_experts_per_tok=2, rope_theta=5000.0, initializer_range=0.1,
                           router_aux_loss_coef=0.02)
    hf = MixtralForCausalLM(config).eval()
    if layout.startswith("per-expert"):
        hf.save_pretrained(tmp_path)
    else:
        config.save_pretrained(tmp_path)
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"),
                  metadata={"format": "pt"})
    model = load_hf(tmp_path)
    cfg = model.config
    assert (cfg.head_size, cfg.num_kv_heads, cfg.num_experts, cfg.top_k, cfg.rope_theta) == (16, 1, 3, 2, 5000.0)
    assert math.isclose(cfg.aux_loss_coef, 0.02 * 2 / 2)
    x = ids(2, 9, vocab=96)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("variant", ["moe", "dense"])
def test_kv_cache_matches_full_forward(variant):
    model = make(VARIANTS[variant])
    x = ids(2, 12)
    with torch.no_grad():
        full = model(x).logits  # (B, T, V)
        out = model(x[:, :5], use_cache=True)  # prefill
        steps = [out.logits]
        out = model(x[:, 5:8], past_key_values=out.past_key_values, use_cache=True)  # a chunk after a cache
        steps.append(out.logits)
        for t in range(8, 12):  # single tokens
            assert out.past_key_values[0][0].shape == (2, 2, t, 8)  # (B, nkv, T_past, D)
            out = model(x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["moe", "dense-tied"])
def test_generate_greedy_matches_hf(exported, variant):
    model, path = exported[variant]
    hf = hf_model(path, "sdpa")
    x = ids(2, 6, seed=5)
    ours = model.generate(x, max_new_tokens=8, greedy=True)
    theirs = hf.generate(x, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(x),
                         eos_token_id=None, pad_token_id=0)
    assert ours.shape == (2, 14)
    assert torch.equal(ours[:, :6], x)
    assert torch.equal(ours, theirs)


def test_generate_sampling_and_eos():
    model = make(TINY)
    x = ids(2, 4)
    a = model.generate(x, 5, greedy=False, temperature=0.8, sample_top_k=10, generator=torch.Generator().manual_seed(0))
    b = model.generate(x, 5, greedy=False, temperature=0.8, sample_top_k=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 9)
    greedy = model.generate(x, 6)
    eos = int(greedy[0, 5])  # row 0's second new token
    out = model.generate(x, 6, eos_token_id=eos, pad_token_id=1)
    assert out[0, 5] == eos and (out[0, 6:] == 1).all()
    assert model.generate(x, 0).equal(x)


def test_causal():
    model = make(TINY)
    x = ids(2, 10)
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


# ---------------------------------------------------------------------------------------------
# losses and training


def test_aux_loss_is_weighted_sum_over_layers():
    model = make(TINY)
    x = ids()
    out = model(x, output_router_logits=True)
    assert out.aux_loss.shape == () and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    expected = sum(r.aux_loss + r.z_loss for r in out.router)
    torch.testing.assert_close(out.aux_loss, expected)
    # balanced routing would give aux_loss_coef * 1.0 per layer
    assert out.aux_loss.item() == pytest.approx(TINY.num_layers * TINY.aux_loss_coef, rel=0.5)
    assert model(x).router is None and model(x).aux_loss is not None  # computed even when not returned
    dense = make(VARIANTS["dense"])
    assert dense(x).aux_loss is None and dense(x, output_router_logits=True).router is None


def test_lm_loss_adds_aux_once():
    from routelib.train import lm_loss

    model = make(TINY)
    assert not hasattr(model, "router_aux_loss_coef")  # so train() weights aux_loss by exactly 1.0
    x, y = ids(), ids(seed=2)
    torch.manual_seed(0)
    loss, metrics = lm_loss(model, x, y)
    out = model(x)
    ce = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    torch.testing.assert_close(loss, ce + out.aux_loss)
    torch.testing.assert_close(metrics["aux_loss"], out.aux_loss)


def test_train_three_steps_and_gradients_reach_every_parameter():
    from routelib.data.batching import TokenWindows
    from routelib.train import TrainConfig, train

    model = make(replace(TINY, router_jitter=0.01)).train()
    out = model(ids(4, 16))
    (out.logits.float().pow(2).mean() + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    model.zero_grad(set_to_none=True)

    tokens = torch.randint(0, 64, (5000,), generator=torch.Generator().manual_seed(0))  # 64 of 256 used
    batches = TokenWindows(tokens, seq_len=16, batch_size=8, seed=0)
    cfg = TrainConfig(max_steps=3, warmup_steps=0, lr=3e-3, log_every=1, device="cpu", progress=False)
    result = train(model, batches, cfg)
    assert len(result.history) == 3
    for r in result.history:
        assert all(math.isfinite(r[k]) for k in ("loss", "lm_loss", "aux_loss"))
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["aux_loss"], rel=1e-5)  # aux added once
        assert 0 < r["aux_loss"] < 1.0
    assert result.losses[-1] < result.losses[0]


# ---------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_counts_and_flops(variant):
    cfg = VARIANTS[variant]
    model = make(cfg)
    h, v, d = cfg.hidden_size, cfg.vocab_size, cfg.head_size
    attn = h * cfg.num_heads * d * 2 + h * cfg.num_kv_heads * d * 2  # q, o; k, v
    if cfg.is_moe:
        ffn_total, ffn_active = param_counts(cfg.moe_config())
    else:
        ffn_total = ffn_active = 3 * h * cfg.intermediate_size
    embeddings = v * h * (1 if cfg.tie_embeddings else 2)
    body_total = cfg.num_layers * (attn + 2 * h + ffn_total) + h  # + final norm
    body_active = cfg.num_layers * (attn + 2 * h + ffn_active) + h
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) == body_total + embeddings
    assert model.num_parameters(active=True) == body_active + embeddings
    assert model.num_parameters(exclude_embeddings=True) == body_total
    assert model.num_parameters(active=True, exclude_embeddings=True) == body_active
    t = 64
    assert model.flops_per_token(t) == 2 * body_active + 2 * cfg.num_layers * t * cfg.num_heads * d + 2 * v * h
    assert model.flops_per_token(t, include_lm_head=False) == 2 * body_active + 2 * cfg.num_layers * t * cfg.num_heads * d


def test_dense_matching_widths():
    assert TINY.dense_matching("total").intermediate_size == TINY.num_experts * TINY.intermediate_size
    assert TINY.dense_matching("active").intermediate_size == TINY.top_k * TINY.intermediate_size
    total = LM(TINY.dense_matching("total")).num_parameters()
    assert total == LM(TINY).num_parameters() - TINY.num_layers * TINY.hidden_size * TINY.num_experts  # no routers
    with pytest.raises(ConfigError):
        TINY.dense_matching("total").dense_matching()


def test_residual_projections_get_scaled_init():
    cfg = replace(TINY, hidden_size=64, intermediate_size=64, num_layers=8, init_std=0.02)
    model = make(cfg)
    blk = model.blocks[0]
    assert blk.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert blk.attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert blk.ffn.w2.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert blk.ffn.w13.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(blk.attn_norm.weight, torch.ones(64))


# ---------------------------------------------------------------------------------------------
# bad configs


@pytest.mark.parametrize("kwargs, names", [
    pytest.param(dict(hidden_size=30, num_heads=4), ["hidden_size", "num_heads"], id="hidden-not-divisible"),
    pytest.param(dict(num_heads=4, num_kv_heads=3), ["num_kv_heads", "num_heads"], id="kv-not-dividing-q"),
    pytest.param(dict(num_experts=2, top_k=3), ["top_k", "num_experts"], id="topk-gt-experts"),
    pytest.param(dict(head_dim=7), ["head_dim"], id="odd-head-dim"),
    pytest.param(dict(num_layers=0), ["num_layers"], id="no-layers"),
    pytest.param(dict(num_experts=-1), ["num_experts"], id="negative-experts"),
    pytest.param(dict(capacity_factor=0.0), ["capacity_factor"], id="capacity-zero"),
    pytest.param(dict(moe_impl="fast"), ["moe_impl"], id="unknown-impl"),
    pytest.param(dict(rope_theta=0.0), ["rope_theta"], id="rope-theta"),
    pytest.param(dict(vocab_size=True), ["vocab_size"], id="bool-vocab"),
])
def test_bad_config_names_the_fields(kwargs, names):
    with pytest.raises(ConfigError) as err:
        LMConfig(**{**asdict(TINY), **kwargs})
    for name in names:
        assert name in str(err.value)


def test_dense_ignores_top_k():
    cfg = LMConfig(num_experts=0, top_k=5, hidden_size=32, num_heads=4)  # top_k only matters for MoE
    assert not cfg.is_moe


def test_export_rejects_what_mixtral_cannot_express(tmp_path):
    with pytest.raises(ConfigError, match="normalize_topk"):
        export_hf(make(replace(TINY, normalize_topk=False)), None, tmp_path)
    with pytest.warns(UserWarning, match="capacity_factor"):
        export_hf(make(replace(TINY, capacity_factor=1.25)), None, tmp_path)
    with pytest.raises(ConfigError, match="vocab_size"):
        from routelib.data.tokenizer import load_tokenizer

        export_hf(make(TINY), load_tokenizer("bpe8k"), tmp_path)


def test_load_hf_rejects_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type"):
        load_hf(tmp_path)
