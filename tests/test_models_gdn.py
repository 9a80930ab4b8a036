"""Gated DeltaNet: the chunked rule against the token-by-token reference (outputs, states, gradients),
state carry-over, write masks, the fla kernel on a GPU; the GatedDeltaNet layer (causality, caching,
write_mask modes) and the softmax-attention layer; config validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from routelib.errors import ConfigError
from routelib.models.attention import AttentionConfig, SoftmaxAttention
from routelib.models.gdn import (
    GDNConfig,
    GatedDeltaNet,
    fla_available,
    gated_delta_rule,
    gated_delta_rule_chunked,
    l2norm,
    resolve_backend,
)
from routelib.models.gdn_naive import gated_delta_rule_recurrent
from routelib.models.lm import apply_rope, rope_cos_sin

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOL = 1e-5  # relative error ||out - ref|| / ||ref|| in fp32

# (B, T, H, Dk, Dv)
SHAPES = [
    pytest.param((1, 1, 1, 8, 8), id="B1-T1"),
    pytest.param((2, 10, 2, 16, 16), id="B2-T10-shorter-than-chunk"),
    pytest.param((2, 37, 2, 16, 8), id="B2-T37-Dk16-Dv8"),
    pytest.param((1, 64, 3, 8, 24), id="B1-T64-H3-Dk8-Dv24"),
    pytest.param((2, 100, 4, 32, 32), id="B2-T100-H4-D32"),
    pytest.param((1, 130, 1, 64, 32), id="B1-T130-Dk64-Dv32"),
]
CHUNKS = [pytest.param(c, id=f"C{c}") for c in (16, 32, 64)]
GATES = ["mixed", "no-decay", "strong-decay", "beta-extremes"]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def inputs(shape, gates="mixed", seed=0, dtype=torch.float32, device="cpu", with_state=True):
    """Random rule inputs in the layer's regime: L2-normalised q/k, g <= 0, beta in [0, 1]."""
    b, t, h, dk, dv = shape
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = l2norm(rnd(b, t, h, dk)), l2norm(rnd(b, t, h, dk)), rnd(b, t, h, dv)
    g = -F.softplus(2 * rnd(b, t, h))  # alpha from ~0.0 to ~1
    beta = torch.rand(b, t, h, generator=gen)
    if gates == "no-decay":  # the plain delta rule, full-strength writes: the hardest case for the solve
        g, beta = torch.zeros_like(g), torch.ones_like(beta)
    elif gates == "strong-decay":  # cumulative decays underflow exp() inside a chunk
        g = -5.0 - 15.0 * torch.rand(b, t, h, generator=gen)
    elif gates == "beta-extremes":
        beta = (torch.rand(b, t, h, generator=gen) > 0.5).float()
    s0 = rnd(b, h, dk, dv) if with_state else None
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return tuple(cast(x) for x in (q, k, v)) + (g.to(device), beta.to(device), cast(s0))


# ----------------------------------------------------------------------------------------------
# the rule: chunked = recurrent


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_matches_recurrent(shape, chunk):
    q, k, v, g, beta, s0 = inputs(shape)
    ref, ref_s = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    out, out_s = gated_delta_rule_chunked(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                          chunk_size=chunk)
    assert out.shape == shape[:3] + (shape[4],) and out_s.shape == s0.shape
    assert rel(out, ref) < TOL
    assert rel(out_s, ref_s) < TOL


@pytest.mark.parametrize("chunk", [pytest.param(16, id="C16"), pytest.param(64, id="C64")])
@pytest.mark.parametrize("gates", GATES)
def test_chunked_matches_recurrent_gate_regimes(gates, chunk):
    q, k, v, g, beta, s0 = inputs((2, 90, 2, 16, 16), gates=gates, seed=1)
    ref, ref_s = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    out, out_s = gated_delta_rule_chunked(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                          chunk_size=chunk)
    assert rel(out, ref) < TOL and rel(out_s, ref_s) < TOL


def test_defaults_scale_and_zero_state():
    q, k, v, g, beta, _ = inputs((2, 20, 2, 16, 8), with_state=False)
    zeros = torch.zeros(2, 2, 16, 8)
    out, none = gated_delta_rule_chunked(q, k, v, g, beta)
    assert none is None
    ref, _ = gated_delta_rule_recurrent(q, k, v, g, beta, scale=16 ** -0.5, initial_state=zeros)
    assert rel(out, ref) < TOL
    scaled, _ = gated_delta_rule_chunked(q, k, v, g, beta, scale=1.0)  # the readout is linear in scale
    assert rel(scaled, out * 4.0) < TOL


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_initial_state_carry_over(impl):
    """Two halves, the second starting from the first's final state, = one pass."""
    fn = {"recurrent": gated_delta_rule_recurrent,
          "chunked": lambda *a, **kw: gated_delta_rule_chunked(*a, chunk_size=16, **kw)}[impl]
    q, k, v, g, beta, s0 = inputs((2, 75, 2, 16, 12), seed=2)
    full, full_s = fn(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    cut = 45  # not a chunk boundary
    first, mid = fn(*(x[:, :cut] for x in (q, k, v, g, beta)), initial_state=s0, output_final_state=True)
    second, last = fn(*(x[:, cut:] for x in (q, k, v, g, beta)), initial_state=mid, output_final_state=True)
    assert rel(torch.cat((first, second), 1), full) < TOL
    assert rel(last, full_s) < TOL


@pytest.mark.parametrize("chunk", [pytest.param(8, id="C8"), pytest.param(32, id="C32")])
def test_gradients_chunked_vs_recurrent(chunk):
    base = inputs((2, 40, 2, 8, 12), seed=3)
    weights = torch.randn(2, 40, 2, 12), torch.randn(2, 2, 8, 12)  # a generic scalar loss of o and state

    def grads(fn):
        leaves = [x.clone().requires_grad_(True) for x in base]
        o, s = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True)
        ((o * weights[0]).sum() + (s * weights[1]).sum()).backward()
        return [x.grad for x in leaves]

    ref = grads(gated_delta_rule_recurrent)
    out = grads(lambda *a, **kw: gated_delta_rule_chunked(*a, chunk_size=chunk, **kw))
    for name, o, r in zip(("q", "k", "v", "g", "beta", "initial_state"), out, ref):
        assert rel(o, r) < 1e-4, name


def test_bf16_inputs():
    q, k, v, g, beta, s0 = inputs((2, 50, 2, 16, 16), seed=4)
    ref, ref_s = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    out, out_s = gated_delta_rule_chunked(*(x.bfloat16() for x in (q, k, v)), g, beta.bfloat16(),
                                          initial_state=s0, output_final_state=True, chunk_size=16)
    assert out.dtype == torch.bfloat16 and out_s.dtype == torch.float32
    assert rel(out, ref) < 2e-2 and rel(out_s, ref_s) < 2e-2


def test_masked_steps_leave_state_unchanged():
    """beta = 0 and g = 0 on masked tokens = running only the unmasked tokens' updates."""
    q, k, v, g, beta, s0 = inputs((3, 50, 2, 16, 8), seed=5)
    write = torch.rand(3, 50, generator=torch.Generator().manual_seed(0)) < 0.5
    write[2] = False  # a row where nothing writes
    gm, bm = g.masked_fill(~write[..., None], 0.0), beta.masked_fill(~write[..., None], 0.0)
    out, state = gated_delta_rule_chunked(q, k, v, gm, bm, initial_state=s0, output_final_state=True,
                                          chunk_size=16)
    for i in range(3):
        sel = lambda x: x[i:i + 1, write[i]]  # noqa: E731  (1, T_i, ...)
        ref, ref_s = gated_delta_rule_recurrent(*(sel(x) for x in (q, k, v, g, beta)),
                                                initial_state=s0[i:i + 1], output_final_state=True)
        assert rel(state[i:i + 1], ref_s) < TOL
        if write[i].any():
            assert rel(out[i:i + 1, write[i]], ref) < TOL
    assert torch.equal(state[2], s0[2])


def test_dispatcher():
    q, k, v, g, beta, s0 = inputs((1, 30, 2, 8, 8), seed=6)
    assert resolve_backend("auto", "cpu") == "torch"
    chunked = gated_delta_rule_chunked(q, k, v, g, beta, initial_state=s0, chunk_size=16)[0]
    assert torch.equal(gated_delta_rule(q, k, v, g, beta, initial_state=s0, chunk_size=16, backend="torch")[0],
                       chunked)
    assert torch.equal(gated_delta_rule(q, k, v, g, beta, initial_state=s0, chunk_size=16)[0], chunked)
    naive = gated_delta_rule(q, k, v, g, beta, initial_state=s0, backend="naive")[0]
    assert torch.equal(naive, gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=s0)[0])
    with pytest.raises(ConfigError, match="backend"):
        gated_delta_rule(q, k, v, g, beta, backend="triton")
    with pytest.raises(ConfigError, match="flash-linear-attention|CUDA"):
        gated_delta_rule(q, k, v, g, beta, backend="fla")  # missing here, or not on CUDA


def test_bad_rule_inputs():
    q, k, v, g, beta, s0 = inputs((1, 12, 2, 8, 4), seed=7)
    for fn in (gated_delta_rule_recurrent, gated_delta_rule_chunked):
        with pytest.raises(ConfigError, match="v must be"):
            fn(q, k, v[:, :5], g, beta)
        with pytest.raises(ConfigError, match="beta must be"):
            fn(q, k, v, g, beta[..., :1])
        with pytest.raises(ConfigError, match="initial_state"):
            fn(q, k, v, g, beta, initial_state=s0.transpose(-1, -2))
    with pytest.raises(ConfigError, match="chunk_size"):
        gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=0)


needs_fla = pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()),
                               reason="needs CUDA and flash-linear-attention (fla)")


@needs_fla
@pytest.mark.parametrize("dtype,tol", [pytest.param(torch.float32, 5e-3, id="fp32"),
                                       pytest.param(torch.bfloat16, 2e-2, id="bf16")])
@pytest.mark.parametrize("shape", [pytest.param((2, 300, 4, 64, 64), id="B2-T300-H4-D64"),
                                   pytest.param((1, 1000, 2, 128, 64), id="B1-T1000-Dk128-Dv64")])
def test_fla_matches_reference(shape, dtype, tol):
    q, k, v, g, beta, s0 = inputs(shape, seed=8)
    ref, ref_s = gated_delta_rule_chunked(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    cuda = lambda x: x.cuda()  # noqa: E731
    leaves = [cuda(x.to(dtype)).requires_grad_(True) for x in (q, k, v)]
    gb = [cuda(g).requires_grad_(True), cuda(beta.to(dtype)).requires_grad_(True)]
    out, out_s = gated_delta_rule(*leaves, *gb, initial_state=cuda(s0), output_final_state=True, backend="fla")
    assert out.dtype == dtype
    assert rel(out.cpu(), ref) < tol and rel(out_s.cpu(), ref_s) < tol
    # gradients against the chunked PyTorch rule on the same GPU
    w = torch.randn_like(out, dtype=torch.float32)
    (out.float() * w).sum().backward()
    leaves_ref = [x.detach().float().clone().requires_grad_(True) for x in leaves + gb]
    o2, _ = gated_delta_rule(*leaves_ref, initial_state=cuda(s0), backend="torch")
    (o2 * w).sum().backward()
    for name, a, b in zip(("q", "k", "v", "g", "beta"), leaves + gb, leaves_ref):
        assert rel(a.grad.float().cpu(), b.grad.cpu()) < 5 * tol, name


# ----------------------------------------------------------------------------------------------
# the layer

CFG = dict(hidden_size=32, num_heads=2, head_dim=8, head_dim_v=12, chunk_size=16, init_std=0.2)


def layer(seed=0, **kw) -> GatedDeltaNet:
    torch.manual_seed(seed)
    return GatedDeltaNet(GDNConfig(**{**CFG, **kw})).eval()


def xs(b=3, t=29, seed=1):
    return torch.randn(b, t, CFG["hidden_size"], generator=torch.Generator().manual_seed(seed))


def mask(b=3, t=29, seed=2, p=0.6):
    m = torch.rand(b, t, generator=torch.Generator().manual_seed(seed)) < p
    m[0, :] = True  # a row where everything writes
    m[-1, :3] = False  # one that starts with skipped tokens
    return m


MODES = [pytest.param(None, id="no-mask"), pytest.param("skip", id="skip"),
         pytest.param("passthrough", id="passthrough")]


def test_layer_shapes_and_gradients():
    lay = layer().train()
    x = xs().requires_grad_(True)
    y = lay(x)
    assert y.shape == x.shape
    y.pow(2).sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in lay.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_layer_backends_agree():
    x, m = xs(), mask()
    for mode in ("skip", "passthrough"):
        fast, slow = layer(mask_mode=mode), layer(mask_mode=mode, backend="naive")
        slow.load_state_dict(fast.state_dict())
        assert rel(fast(x), slow(x)) < TOL
        assert rel(fast(x, write_mask=m), slow(x, write_mask=m)) < TOL


def test_layer_decay_init():
    """Mamba2 init: alpha = exp(-A dt) with A in [1, 16], dt in [1e-3, 0.1] when a_proj x = 0."""
    lay = layer(init_std=0.0)
    g = lay.features(xs())[3]  # (B, T, H)
    alpha = g.exp()
    assert (alpha > math.exp(-16 * 0.1) - 1e-6).all() and (alpha < math.exp(-1e-3) + 1e-6).all()


@pytest.mark.parametrize("mode", MODES)
def test_layer_causal(mode):
    """Outputs at positions <= t do not change when the tokens (and write flags) after t change."""
    lay = layer(mask_mode=mode or "skip")
    x, m = xs(), mask()
    t0 = 13
    x2 = x.clone()
    x2[:, t0 + 1:] = torch.randn_like(x2[:, t0 + 1:])
    m2 = m.clone()
    m2[:, t0 + 1:] = ~m2[:, t0 + 1:]
    y = lay(x, write_mask=None if mode is None else m)
    y2 = lay(x2, write_mask=None if mode is None else m2)
    torch.testing.assert_close(y[:, :t0 + 1], y2[:, :t0 + 1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y[:, t0 + 1:], y2[:, t0 + 1:])


@pytest.mark.parametrize("mode", MODES)
def test_layer_cache_continues_the_sequence(mode):
    """A pass over T = a pass over the first part, then the rest from its cache; and token by token."""
    lay = layer(mask_mode=mode or "skip")
    x, m = xs(), mask()
    m = None if mode is None else m
    part = lambda sl: None if m is None else m[:, sl]  # noqa: E731
    y, cache = lay(x, write_mask=m, use_cache=True)
    y1, c1 = lay(x[:, :11], write_mask=part(slice(0, 11)), use_cache=True)
    y2, c2 = lay(x[:, 11:], write_mask=part(slice(11, None)), cache=c1, use_cache=True)
    assert rel(torch.cat((y1, y2), 1), y) < TOL
    assert rel(c2.state, cache.state) < TOL and rel(c2.conv, cache.conv) < TOL
    c, steps = None, []
    for i in range(8):
        yi, c = lay(x[:, i:i + 1], write_mask=part(slice(i, i + 1)), cache=c, use_cache=True)
        steps.append(yi)
    assert rel(torch.cat(steps, 1), lay(x[:, :8], write_mask=part(slice(0, 8)))) < TOL


def test_layer_skip_mask_is_running_the_written_tokens_alone():
    lay = layer(mask_mode="skip")
    x, m = xs(), mask()
    y, cache = lay(x, write_mask=m, use_cache=True)
    assert torch.equal(y[~m], torch.zeros_like(y[~m]))  # skipped tokens output exactly 0
    for i in range(x.shape[0]):
        alone, c = lay(x[i:i + 1, m[i]], use_cache=True)  # (1, T_i, hidden)
        assert rel(y[i:i + 1, m[i]], alone) < TOL
        assert rel(cache.state[i:i + 1], c.state) < TOL and rel(cache.conv[i:i + 1], c.conv) < TOL


@pytest.mark.parametrize("mode", ["skip", "passthrough"])
def test_layer_runs_under_bf16_autocast_with_a_mask(mode):
    lay = layer(mask_mode=mode)
    x, m = xs(), mask()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lay(x, write_mask=m)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()
    assert rel(y.float(), lay(x, write_mask=m)) < 0.05  # bf16 rounding only


def test_layer_passthrough_mask_leaves_state_unchanged():
    """Masked tokens do not update the state: the final state = the rule over the written tokens only."""
    lay = layer(mask_mode="passthrough")
    x, m = xs(), mask()
    y, cache = lay(x, write_mask=m, use_cache=True)
    q, k, v, g, beta, _ = lay.features(x)
    for i in range(x.shape[0]):
        sel = lambda z: z[i:i + 1, m[i]]  # noqa: E731
        _, ref_s = gated_delta_rule_recurrent(*(sel(z) for z in (q, k, v, g, beta)), output_final_state=True)
        assert rel(cache.state[i:i + 1], ref_s) < TOL
    # nothing written after t0: the state is the prefix's, whatever the later tokens are
    t0 = 17
    tail_off = torch.ones_like(m)
    tail_off[:, t0:] = False
    _, c_prefix = lay(x[:, :t0], use_cache=True)
    _, c_full = lay(x, write_mask=tail_off, use_cache=True)
    assert rel(c_full.state, c_prefix.state) < TOL


@pytest.mark.parametrize("mode", ["skip", "passthrough"])
def test_layer_nothing_written(mode):
    lay = layer(mask_mode=mode)
    x = xs()
    y, cache = lay(x, write_mask=torch.zeros(3, 29, dtype=torch.bool), use_cache=True)
    assert torch.equal(cache.state, torch.zeros_like(cache.state))
    if mode == "skip":
        assert torch.equal(y, torch.zeros_like(y)) and torch.equal(cache.conv, torch.zeros_like(cache.conv))


def test_layer_bad_inputs():
    lay = layer()
    x = xs()
    with pytest.raises(ConfigError, match="write_mask"):
        lay(x, write_mask=torch.ones(3, 29))  # float, not bool
    with pytest.raises(ConfigError, match="write_mask"):
        lay(x, write_mask=torch.ones(3, 28, dtype=torch.bool))
    _, cache = lay(x, use_cache=True)
    with pytest.raises(ConfigError, match="batch"):
        lay(x[:2], cache=cache)


@pytest.mark.parametrize("bad", [
    pytest.param(dict(hidden_size=30, num_heads=4), id="hidden-not-divisible"),
    pytest.param(dict(num_heads=0), id="zero-heads"),
    pytest.param(dict(head_dim=0), id="zero-head-dim"),
    pytest.param(dict(head_dim_v=2.5), id="float-head-dim-v"),
    pytest.param(dict(conv_size=0), id="zero-conv"),
    pytest.param(dict(chunk_size=True), id="bool-chunk"),
    pytest.param(dict(backend="triton"), id="backend"),
    pytest.param(dict(mask_mode="drop"), id="mask-mode"),
    pytest.param(dict(A_init_range=(0.0, 16.0)), id="A-range"),
    pytest.param(dict(dt_min=0.2, dt_max=0.1), id="dt-range"),
    pytest.param(dict(norm_eps=0.0), id="eps"),
    pytest.param(dict(init_std=-1.0), id="init-std"),
])
def test_gdn_config_errors(bad):
    with pytest.raises(ConfigError):
        GDNConfig(**bad)


def test_gdn_config_dims():
    cfg = GDNConfig(hidden_size=64, num_heads=4)
    assert (cfg.key_dim, cfg.value_dim) == (16, 16)
    assert GDNConfig(hidden_size=64, num_heads=4, head_dim=32, head_dim_v=64).value_dim == 64
    lay = GatedDeltaNet(GDNConfig(hidden_size=16, num_heads=2, conv_size=1))  # no token mixing in the conv
    assert lay(xs(1, 5)[..., :16]).shape == (1, 5, 16)


# ----------------------------------------------------------------------------------------------
# softmax attention

ATT = dict(hidden_size=32, num_heads=4, num_kv_heads=2, init_std=0.2)


def attention(**kw) -> SoftmaxAttention:
    torch.manual_seed(0)
    return SoftmaxAttention(AttentionConfig(**{**ATT, **kw})).eval()


def test_softmax_attention_matches_explicit_softmax():
    att = attention()
    x = xs(2, 19)
    b, t, _ = x.shape
    nh, nkv, d = 4, 2, 8
    q = att.q_proj(x).view(b, t, nh, d).transpose(1, 2)  # (B, nh, T, D)
    k = att.k_proj(x).view(b, t, nkv, d).transpose(1, 2).repeat_interleave(nh // nkv, 1)  # (B, nh, T, D)
    v = att.v_proj(x).view(b, t, nkv, d).transpose(1, 2).repeat_interleave(nh // nkv, 1)
    cos, sin = rope_cos_sin(torch.arange(t), d, 10000.0, x.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # (B, nh, T, T)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    ref = att.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, nh * d))
    assert rel(att(x), ref) < TOL


def test_softmax_attention_causal_and_cache():
    att = attention(num_kv_heads=None)
    x = xs(2, 23)
    y, cache = att(x, use_cache=True)
    x2 = x.clone()
    x2[:, 10:] = 0.0
    torch.testing.assert_close(att(x2)[:, :10], y[:, :10])
    y1, c1 = att(x[:, :9], use_cache=True)
    y2, c2 = att(x[:, 9:], cache=c1, use_cache=True)
    assert rel(torch.cat((y1, y2), 1), y) < TOL
    assert c2[0].shape == cache[0].shape == (2, 4, 23, 8)


@pytest.mark.parametrize("bad", [
    pytest.param(dict(hidden_size=30, num_heads=4), id="hidden-not-divisible"),
    pytest.param(dict(head_dim=7), id="odd-head-dim"),
    pytest.param(dict(num_kv_heads=3), id="kv-not-dividing"),
    pytest.param(dict(num_heads=0), id="zero-heads"),
    pytest.param(dict(rope_theta=0.0), id="theta"),
])
def test_attention_config_errors(bad):
    with pytest.raises(ConfigError):
        AttentionConfig(**{**ATT, **bad})
