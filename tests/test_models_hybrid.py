"""Hybrid GDN / softmax models (routelib.models.hybrid): the routed mixer against a per-row reference,
causality of both models (eval and training), the straight-through gradient, argmax at evaluation, the
temperature schedule, the balance loss, and routing everything to one branch = the pure model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from routelib.errors import ConfigError
from routelib.models.attention import SoftmaxAttention
from routelib.models.gdn import GatedDeltaNet
from routelib.models.hybrid import (
    DYNAMIC_LAYOUT,
    STATIC_LAYOUT,
    HybridConfig,
    HybridLM,
    RouteDecision,
    RoutedMixer,
    gumbel_straight_through,
    routed_softmax_attention,
)
from routelib.models.lm import apply_rope, rope_cos_sin

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL = dict(vocab_size=97, hidden_size=32, num_heads=4, intermediate_size=48, gdn_chunk_size=8, init_std=0.1)
KV = [pytest.param("routed", id="kv-routed"), pytest.param("all", id="kv-all")]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def model(layout=DYNAMIC_LAYOUT, seed=0, **kw) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(HybridConfig(**{**SMALL, "layers": layout, **kw})).eval()


def ids(b=3, t=21, seed=1) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


def selection(b=3, t=21, seed=2) -> torch.Tensor:
    sel = torch.rand(b, t, generator=torch.Generator().manual_seed(seed)) < 0.5
    sel[0] = True  # a row where every token is selected
    sel[1, :4] = False  # one starting with unselected tokens
    return sel


# ----------------------------------------------------------------------------------------------
# the routed mixer against simple references


def naive_attention(attn: SoftmaxAttention, x: torch.Tensor, sel: torch.Tensor, kv: str) -> torch.Tensor:
    """Full T x T causal attention with the keys a selected query may see (selected tokens, or all),
    explicit softmax, outputs zeroed at unselected tokens."""
    b, t, _ = x.shape
    nh, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    heads = lambda lin, n: lin(x).view(b, t, n, d).transpose(1, 2)  # noqa: E731  (B, n, T, D)
    cos, sin = rope_cos_sin(torch.arange(t), d, attn.config.rope_theta, x.dtype)
    q = apply_rope(heads(attn.q_proj, nh), cos, sin)
    k = apply_rope(heads(attn.k_proj, nkv), cos, sin).repeat_interleave(nh // nkv, 1)
    v = heads(attn.v_proj, nkv).repeat_interleave(nh // nkv, 1)
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T)
    if kv == "routed":
        allowed = allowed & sel[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
    y = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, nh * d))
    return torch.where(sel[..., None], y, torch.zeros_like(y))


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("kv_heads", [pytest.param(None, id="mha"), pytest.param(2, id="gqa")])
def test_routed_softmax_matches_naive(kv, kv_heads):
    mixer = model(num_kv_heads=kv_heads).blocks[1].mixer
    x = torch.randn(3, 21, 32, generator=torch.Generator().manual_seed(3))
    sel = selection()
    out = routed_softmax_attention(mixer.attn, x, sel, kv)
    assert torch.equal(out[~sel], torch.zeros_like(out[~sel]))
    assert rel(out, naive_attention(mixer.attn, x, sel, kv)) < 1e-5


def test_softmax_kv_all_is_full_attention_at_selected_tokens():
    attn = model().blocks[1].mixer.attn
    x = torch.randn(3, 21, 32, generator=torch.Generator().manual_seed(4))
    sel = selection()
    out = routed_softmax_attention(attn, x, sel, "all")
    assert rel(out[sel], attn(x)[sel]) < 1e-5


@pytest.mark.parametrize("kv", KV)
def test_routed_mixer_is_each_branch_on_its_own_tokens(kv):
    """Per row: GDN run on the row's GDN tokens alone, softmax on its softmax tokens (reference)."""
    mixer: RoutedMixer = model(softmax_kv=kv).blocks[1].mixer
    x = torch.randn(3, 21, 32, generator=torch.Generator().manual_seed(5))
    to_soft = selection()
    to_soft[2] = False  # a row entirely on GDN
    y = mixer(x, to_soft)
    ref = naive_attention(mixer.attn, x, to_soft, kv)
    for i in range(3):
        gdn_tokens = ~to_soft[i]
        if gdn_tokens.any():
            ref[i, gdn_tokens] = mixer.gdn(x[i:i + 1, gdn_tokens])[0]  # (T_i, H)
    assert rel(y, ref) < 1e-5
    gate = torch.full((3, 21), 0.5)
    assert rel(mixer(x, to_soft, gate), 0.5 * ref) < 1e-5


# ----------------------------------------------------------------------------------------------
# causality


def _causal_check(m: HybridLM, train: bool, t0: int = 11):
    x = ids()
    x2 = x.clone()
    x2[:, t0 + 1:] = (x2[:, t0 + 1:] + 1 + torch.arange(x.shape[1] - t0 - 1)) % SMALL["vocab_size"]
    m.train(train)

    def run(tokens):
        torch.manual_seed(123)  # the same Gumbel noise for both sequences in training mode
        return m(tokens, output_routing=True)

    a, b = run(x), run(x2)
    torch.testing.assert_close(a.logits[:, :t0 + 1], b.logits[:, :t0 + 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a.logits[:, t0 + 1:], b.logits[:, t0 + 1:], atol=1e-4)  # the change is visible
    if a.routing is not None:
        assert torch.equal(a.routing.to_softmax[:, :t0 + 1], b.routing.to_softmax[:, :t0 + 1])


@pytest.mark.parametrize("train", [pytest.param(False, id="eval"), pytest.param(True, id="train-gumbel")])
@pytest.mark.parametrize("layout, kv", [
    pytest.param(STATIC_LAYOUT, "routed", id="static"),
    pytest.param(DYNAMIC_LAYOUT, "routed", id="dynamic-kv-routed"),
    pytest.param(DYNAMIC_LAYOUT, "all", id="dynamic-kv-all"),
])
def test_causal(layout, kv, train):
    m = model(layout, softmax_kv=kv, init_std=0.3)  # a large router init: both branches get tokens
    _causal_check(m, train)
    if layout == DYNAMIC_LAYOUT:
        m.eval()
        frac = m(ids(), output_routing=True).routing.to_softmax.float().mean().item()
        assert 0.1 < frac < 0.9  # the check above exercised both branches


# ----------------------------------------------------------------------------------------------
# Gumbel-softmax straight-through, argmax at evaluation, temperature


def test_gumbel_straight_through_samples_the_softmax_and_gates_are_one():
    logits = torch.tensor([0.0, math.log(3.0)]).expand(40000, 2).clone().requires_grad_(True)
    torch.manual_seed(0)
    choice, gate = gumbel_straight_through(logits, tau=1.0)
    assert abs(choice.float().mean().item() - 0.75) < 0.01  # Gumbel-max: P(softmax branch) = 3/4
    assert torch.equal(gate.detach(), torch.ones(40000))  # hard forward: exactly 1
    gate.sum().backward()
    # soft backward: d p_chosen / d logit_chosen = p_c (1 - p_c) / tau > 0 for the chosen column
    chosen_grad = logits.grad.gather(1, choice[:, None]).squeeze(1)
    assert (chosen_grad > 0).all() and torch.allclose(logits.grad.sum(1), torch.zeros(40000), atol=1e-6)


def test_router_gets_gradient_through_the_straight_through_gate():
    m = model(balance_coef=0.0).train()  # no balance loss: any router gradient comes from the LM loss
    x = ids()
    F.cross_entropy(m(x).logits.flatten(0, 1), x.flatten()).backward()
    g = m.router.proj.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    m.zero_grad()
    forced = torch.zeros(3, 21, 2, dtype=torch.bool)  # given routes: no gate, so no router gradient
    F.cross_entropy(m(x, routes=forced).logits.flatten(0, 1), x.flatten()).backward()
    assert m.router.proj.weight.grad is None or m.router.proj.weight.grad.abs().sum() == 0
    m.zero_grad()
    m.config.balance_coef = 1.0  # the balance loss alone also reaches the router (through P)
    m(x).aux_loss.backward()
    assert m.router.proj.weight.grad.abs().sum() > 0


def test_training_forward_is_hard_and_eval_is_deterministic_argmax():
    m = model(init_std=0.3)
    x = ids()
    out = m(x, output_routing=True)
    r = out.routing
    assert r.gate is None and r.temperature is None
    assert torch.equal(r.to_softmax, r.logits[..., 1] > r.logits[..., 0])
    torch.manual_seed(7)
    again = m(x, output_routing=True)  # RNG state does not matter at evaluation
    assert torch.equal(again.logits, out.logits) and torch.equal(again.routing.to_softmax, r.to_softmax)
    with torch.no_grad():
        assert torch.equal(m.train()(x).logits, out.logits)  # no grad: argmax even in training mode
    torch.manual_seed(0)
    noisy = m(x, output_routing=True).routing
    assert torch.equal(noisy.gate.detach(), torch.ones_like(noisy.gate))  # hard forward
    assert not torch.equal(noisy.to_softmax, r.to_softmax)  # the noise changes some decisions


def test_temperature_schedule():
    cfg = HybridConfig(**SMALL, tau_start=2.0, tau_end=0.5, tau_anneal_steps=10)
    taus = [cfg.temperature_at(s) for s in range(15)]
    assert taus[0] == 2.0 and math.isclose(taus[5], 1.0) and math.isclose(taus[10], 0.5)
    assert all(a > b for a, b in zip(taus[:10], taus[1:11])) and taus[10:] == [taus[10]] * 5
    assert HybridConfig(**SMALL, tau_start=2.0, tau_end=0.5, tau_anneal_steps=0).temperature_at(0) == 0.5
    with pytest.raises(ConfigError, match="step"):
        cfg.temperature_at(-1)
    m = model(tau_start=2.0, tau_end=0.5, tau_anneal_steps=10).train()
    used = [m(ids(), output_routing=True).routing.temperature for _ in range(3)]
    assert used == taus[:3] and int(m.router_step) == 3
    m.eval()(ids())
    with torch.no_grad():
        m.train()(ids())
    assert int(m.router_step) == 3  # only training forwards with gradients advance the schedule
    fresh = model(tau_start=2.0, tau_end=0.5, tau_anneal_steps=10)
    fresh.load_state_dict(m.state_dict())  # the counter is persistent: a resumed run continues
    assert int(fresh.router_step) == 3 and fresh.temperature == taus[3]


# ----------------------------------------------------------------------------------------------
# balance loss and routing statistics


def test_balance_loss_and_entropy():
    b, t = 4, 10
    uniform = RouteDecision(torch.zeros(b, t, 2, 2), torch.rand(b, t, 2) < 2.0, None, None)  # all softmax, p = 1/2
    assert torch.allclose(uniform.balance_loss(), torch.ones(2)) and torch.allclose(uniform.entropy_bits(), torch.ones(2))
    half = torch.zeros(b, t, 2, dtype=torch.bool)
    half[:, ::2] = True
    confident = torch.zeros(b, t, 2, 2)
    confident[..., 1] = 20.0  # p(softmax) ~ 1 everywhere
    collapsed = RouteDecision(confident, torch.ones(b, t, 2, dtype=torch.bool), None, None)
    assert torch.allclose(collapsed.balance_loss(), torch.full((2,), 2.0)) and collapsed.entropy_bits().max() < 1e-6
    balanced = RouteDecision(torch.zeros(b, t, 2, 2), half, None, None)
    assert torch.allclose(balanced.balance_loss(), torch.ones(2))


def test_output_and_aux_loss():
    static = model(STATIC_LAYOUT)
    out = static(ids())
    assert out.logits.shape == (3, 21, 97) and out.aux_loss is None and out.routing is None
    dyn = model(balance_coef=0.25)
    out = dyn(ids(), output_routing=True)
    assert out.balance_loss.shape == (2,) and torch.isclose(out.aux_loss, 0.25 * out.balance_loss.mean())
    assert out.routing.logits.shape == (3, 21, 2, 2)
    with pytest.raises(ConfigError, match="routes"):
        dyn(ids(), routes=torch.zeros(3, 21, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# routing everything to one branch = the pure model


def fixed_copy(dyn: HybridLM, branch: str) -> HybridLM:
    """The model with every routed layer replaced by its ``branch`` mixer, holding dyn's weights."""
    layout = tuple(branch if k == "routed" else k for k in dyn.config.layers)
    pure = model(layout)
    sub = {"gdn": ".mixer.gdn.", "softmax": ".mixer.attn."}[branch]
    state = {}
    for key, value in dyn.state_dict().items():
        if key.startswith("router."):
            continue
        if ".mixer.gdn." in key or ".mixer.attn." in key:
            if sub not in key:
                continue
            key = key.replace(sub, ".mixer.")
        state[key] = value
    pure.load_state_dict(state)
    return pure


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("branch", ["gdn", "softmax"])
def test_routing_everything_to_one_branch_is_the_pure_model(branch, kv):
    dyn = model(softmax_kv=kv)
    x = ids()
    routes = torch.full((3, 21, 2), branch == "softmax")
    pure = fixed_copy(dyn, branch)
    assert pure.config.layers == ((STATIC_LAYOUT) if branch == "gdn" else ("gdn", "softmax", "softmax", "softmax"))
    assert rel(dyn(x, routes=routes).logits, pure(x).logits) < 1e-5


@pytest.mark.parametrize("kv", KV)
def test_bf16_autocast(kv):
    """The training loop runs the model under bf16 autocast on CUDA; the CPU autocast takes the same path."""
    m = model(softmax_kv=kv).train()
    x = ids()
    ref = m.eval()(x, output_routing=True)
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        F.cross_entropy(out.logits.flatten(0, 1).float(), x.flatten()).backward()
    assert m.router.proj.weight.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the fp32 decisions: bf16 may flip near-ties
        assert rel(m.eval()(x, routes=ref.routing.to_softmax).logits.float(), ref.logits) < 3e-2


def test_parameter_counts():
    dyn, static = model(), model(STATIC_LAYOUT)
    gdn = sum(p.numel() for p in dyn.blocks[1].mixer.gdn.parameters())
    att = sum(p.numel() for p in dyn.blocks[1].mixer.attn.parameters())
    router = sum(p.numel() for p in dyn.router.parameters())
    assert dyn.num_parameters() == static.num_parameters() + 2 * att + router
    assert dyn.active_parameters([0.0, 0.0]) == static.num_parameters() + router  # all GDN: the static model
    assert dyn.active_parameters([1.0, 0.5]) == dyn.num_parameters() - gdn - 0.5 * (gdn + att)
    assert static.active_parameters() == static.num_parameters()
    with pytest.raises(ConfigError, match="softmax_fraction"):
        dyn.active_parameters([0.5])


@pytest.mark.parametrize("bad, match", [
    pytest.param(dict(layers=("routed", "gdn")), "first layer", id="routed-first"),
    pytest.param(dict(layers=("gdn", "mamba")), "layers", id="unknown-kind"),
    pytest.param(dict(layers=()), "layers", id="empty"),
    pytest.param(dict(softmax_kv="some"), "softmax_kv", id="kv"),
    pytest.param(dict(balance_coef=-0.1), "balance_coef", id="negative-alpha"),
    pytest.param(dict(tau_end=0.0), "tau", id="zero-tau"),
    pytest.param(dict(tau_anneal_steps=-1), "tau_anneal_steps", id="anneal"),
    pytest.param(dict(hidden_size=30), "divisible", id="heads"),
    pytest.param(dict(gdn_backend="triton"), "backend", id="backend"),
    pytest.param(dict(vocab_size=0), "vocab_size", id="vocab"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        HybridConfig(**{**SMALL, **bad})


def test_named_layouts():
    assert HybridConfig.static(**SMALL).layers == STATIC_LAYOUT and HybridConfig.static().routed_layers == ()
    dyn = HybridConfig.dynamic(**SMALL)
    assert dyn.layers == DYNAMIC_LAYOUT and dyn.routed_layers == (1, 2) and dyn.router_after == 0
