"""MoE FFN: the padded and grouped paths against the naive reference, router losses, capacity."""

from __future__ import annotations

import math

import pytest
import torch

from routelib.errors import ConfigError
from routelib.models import moe
from routelib.models.moe import (
    DenseFFN,
    MoEConfig,
    MoEFFN,
    dense_flops_per_token,
    grouped_matmul,
    grouped_mm_supported,
    load_balancing_loss,
    moe_flops_per_token,
    param_counts,
    router_z_loss,
)

FAST_IMPLS = ["padded", "grouped"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# (N tokens, H, I, E, k)
SHAPES = [
    pytest.param((8, 16, 32, 4, 2), id="N8-H16-I32-E4-k2"),
    pytest.param((16, 16, 8, 4, 1), id="N16-H16-I8-E4-k1"),
    pytest.param((12, 8, 16, 4, 4), id="N12-H8-I16-E4-kE"),
    pytest.param((64, 32, 16, 16, 4), id="N64-H32-I16-E16-k4"),
    pytest.param((9, 10, 6, 3, 2), id="N9-H10-I6-E3-k2-unaligned"),  # grouped_mm -> loop fallback
    pytest.param((1, 16, 16, 4, 2), id="N1-single-token"),
]
CAPACITIES = [
    pytest.param(None, id="dropless"),
    pytest.param(0.5, id="cf0.5"),
    pytest.param(1.0, id="cf1.0"),
    pytest.param(1.25, id="cf1.25"),
]
ROUTINGS = ["random", "empty-experts", "one-expert"]


def make(shape, capacity_factor=None, routing="random", seed=0, **kw):
    """A layer and an input (N, H) with the requested routing pattern forced through gate weights."""
    n, h, i, e, k = shape
    torch.manual_seed(seed)
    cfg = MoEConfig(
        hidden_size=h, intermediate_size=i, num_experts=e, top_k=k, capacity_factor=capacity_factor,
        init_std=0.3, aux_loss_coef=1.0, z_loss_coef=1e-3, **kw,
    )
    layer = MoEFFN(cfg)
    x = torch.randn(n, h)
    if routing != "random":
        x[:, 0] = 3.0  # a constant feature the gate can key on
        with torch.no_grad():
            if routing == "empty-experts":  # the last E-k experts can never be chosen
                layer.gate.weight[k:, 0] = -50.0
            else:  # every token's first choice is expert 0
                layer.gate.weight[0, 0] = 50.0
    return layer, x


def grid_params():
    for s in SHAPES:
        _, _, _, e, k = s.values[0]
        for c in CAPACITIES:
            for r in ROUTINGS:
                if r == "empty-experts" and k == e:
                    continue  # with k = E every expert gets every token
                yield pytest.param(s.values[0], c.values[0], r, id=f"{s.id}-{c.id}-{r}")


GRID = list(grid_params())


def run(layer, x, impl):
    return layer(x, impl=impl)  # (y, RouterOutput)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("shape,capacity_factor,routing", GRID)
def test_forward_matches_naive(shape, capacity_factor, routing, impl):
    layer, x = make(shape, capacity_factor, routing)
    ref, r_ref = run(layer, x, "naive")
    y, r = run(layer, x, impl)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(r.keep, r_ref.keep) and float(r.drop_rate) == float(r_ref.drop_rate)
    if routing == "empty-experts":
        assert (r.tokens_per_expert[shape[4]:] == 0).all()
    if routing == "one-expert":
        assert (r.indices[:, 0] == 0).all()


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("shape,capacity_factor,routing", GRID)
def test_gradients_match_naive(shape, capacity_factor, routing, impl):
    layer, x = make(shape, capacity_factor, routing)
    g = torch.randn_like(x)

    def grads(which):
        layer.zero_grad(set_to_none=False)
        xi = x.clone().requires_grad_(True)
        y, router = layer(xi, impl=which)
        ((y * g).sum() + router.loss).backward()
        return [xi.grad.clone()] + [p.grad.clone() for p in layer.parameters()]

    names = ["x"] + [name for name, _ in layer.named_parameters()]
    for name, got, want in zip(names, grads(impl), grads("naive")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_weight_drop_policy_same_across_impls(impl, capacity_factor):
    layer, x = make((32, 16, 16, 4, 2), capacity_factor, drop_policy="weight")
    ref, r_ref = run(layer, x, "naive")
    y, r = run(layer, x, impl)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert float(r.drop_rate) > 0


@pytest.mark.parametrize("impl", ["naive"] + FAST_IMPLS)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_bf16_forward_backward_close(impl, capacity_factor):
    layer, x = make((32, 16, 32, 4, 2), capacity_factor)
    ref32, _ = run(layer, x, "naive")
    layer = layer.to(torch.bfloat16)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    ref, _ = run(layer, xb.detach(), "naive")
    y, router = run(layer, xb, impl)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    (y.float().square().sum() + router.loss).backward()
    assert torch.isfinite(xb.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    if capacity_factor is None:  # dropless: same routing as fp32 unless a near-tie flipped
        assert (y.float() - ref32).abs().mean() < 5e-2 * ref32.abs().mean()


def test_input_shapes_preserved():
    layer, x = make((12, 16, 16, 4, 2))
    y3, r3 = layer(x.view(3, 4, 16))
    y2, r2 = layer(x)
    assert y3.shape == (3, 4, 16) and r3.logits.shape == (12, 4) and r3.indices.shape == (12, 2)
    torch.testing.assert_close(y3.view(12, 16), y2)


# ---------------------------------------------------------------------------- grouped matmul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "counts", [[3, 0, 4, 3], [0, 0, 10, 0], [0, 0, 0, 0], [1, 1, 1, 1]], ids=["mixed", "one", "none", "ones"]
)
def test_grouped_matmul_kernel_and_loop_agree(monkeypatch, dtype, counts):
    torch.manual_seed(0)
    a = torch.randn(sum(counts), 16, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 8, 16, dtype=dtype, requires_grad=True)  # (G, N, K) like w13
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    fast = grouped_matmul(a, w.transpose(1, 2), offs)
    fast.sum().backward()  # a stride-0 gradient, which the kernel's own backward would reject
    da, dw = a.grad.clone(), w.grad.clone()
    a.grad = w.grad = None
    monkeypatch.setattr(moe, "_GROUPED_MM", None)  # force the loop
    loop = grouped_matmul(a, w.transpose(1, 2), offs)
    loop.sum().backward()
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, loop, **tol)
    torch.testing.assert_close(da, a.grad, **tol)
    torch.testing.assert_close(dw, w.grad, **tol)


@pytest.mark.skipif(moe._GROUPED_MM is None, reason="this torch has no grouped_mm")
def test_grouped_mm_used_on_cpu_for_aligned_shapes():
    a = torch.randn(10, 16)
    assert grouped_mm_supported(a, torch.randn(4, 8, 16).transpose(1, 2))
    assert grouped_mm_supported(a.bfloat16(), torch.randn(4, 8, 16).bfloat16().transpose(1, 2))
    assert not grouped_mm_supported(torch.randn(9, 10), torch.randn(3, 6, 10).transpose(1, 2))
    assert not grouped_mm_supported(a.double(), torch.randn(4, 8, 16).double().transpose(1, 2))


# ---------------------------------------------------------------------------- router losses


def test_aux_loss_is_one_when_perfectly_balanced():
    e, k, n = 4, 2, 8
    probs = torch.full((n, e), 1.0 / e)
    indices = torch.stack([torch.arange(n) % e, (torch.arange(n) + 1) % e], dim=1)  # each expert 4 of 16
    assert load_balancing_loss(probs, indices, e).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_aux_loss_of_layer_balanced_and_collapsed(k):
    e = 4
    cfg = MoEConfig(hidden_size=e, intermediate_size=8, num_experts=e, top_k=k, aux_loss_coef=1.0)
    layer = MoEFFN(cfg)
    v = torch.tensor([2.0, 1.0, 0.0, -1.0])
    with torch.no_grad():  # circulant gate: token n's logits are v rolled by n -> balanced routing
        layer.gate.weight.copy_(torch.stack([v.roll(n) for n in range(e)], dim=1))
    _, router = layer(torch.eye(e))
    assert (router.tokens_per_expert == k).all()
    assert router.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():  # every token prefers expert 0 overwhelmingly
        layer.gate.weight.zero_()
        layer.gate.weight[0] = 20.0
    _, collapsed = layer(torch.eye(e))
    assert collapsed.aux_loss.item() > 1.5
    if k == 1:
        assert collapsed.aux_loss.item() == pytest.approx(e, rel=1e-4)


def test_aux_loss_is_hf_mixtral_loss_over_k():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    logits = torch.randn(20, 8)
    probs = logits.softmax(-1)
    ours = load_balancing_loss(probs, probs.topk(2, dim=-1).indices, 8)
    theirs = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    assert ours.item() * 2 == pytest.approx(theirs.item(), rel=1e-5)


def test_z_loss_non_negative_and_formula():
    torch.manual_seed(0)
    logits = torch.randn(16, 8) * 3
    z = router_z_loss(logits)
    assert z.item() >= 0
    assert z.item() == pytest.approx(float((torch.logsumexp(logits, -1) ** 2).mean()), rel=1e-6)
    assert router_z_loss(torch.full((4, 8), -math.log(8))).item() == pytest.approx(0.0, abs=1e-10)


def test_router_losses_are_weighted_by_coefs():
    layer, x = make((16, 16, 16, 4, 2))
    _, r = layer(x)
    probs = r.logits.float().softmax(-1)
    assert r.aux_loss.item() == pytest.approx(load_balancing_loss(probs, r.indices, 4).item(), rel=1e-6)
    assert r.z_loss.item() == pytest.approx(1e-3 * router_z_loss(r.logits).item(), rel=1e-6)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(16))  # normalize_topk


# ---------------------------------------------------------------------------- capacity


@pytest.mark.parametrize("impl", ["naive"] + FAST_IMPLS)
def test_dropless_drops_nothing(impl):
    layer, x = make((32, 16, 16, 4, 2), None, "one-expert")
    _, r = layer(x, impl=impl)
    assert r.capacity is None and float(r.drop_rate) == 0.0 and r.keep.all()


def _k1_layer(policy):
    """4 tokens, E=2, k=1, capacity_factor 1 -> C = ceil(4*1/2) = 2; everyone wants expert 0,
    token n with probability sigmoid(2n+2) (increasing with n)."""
    cfg = MoEConfig(hidden_size=4, intermediate_size=4, num_experts=2, top_k=1, capacity_factor=1.0,
                    drop_policy=policy, normalize_topk=False, init_std=0.3)
    torch.manual_seed(0)
    layer = MoEFFN(cfg)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0, 0], layer.gate.weight[1, 0] = 1.0, -1.0
    x = torch.zeros(4, 4)
    x[:, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x[:, 1:] = torch.randn(4, 3)
    return layer, x


@pytest.mark.parametrize("impl", ["naive"] + FAST_IMPLS)
@pytest.mark.parametrize("policy,kept", [("position", [0, 1]), ("weight", [2, 3])])
def test_hand_computed_drop(impl, policy, kept):
    layer, x = _k1_layer(policy)
    y, r = layer(x, impl=impl)
    assert r.capacity == 2 and float(r.drop_rate) == 0.5
    assert r.keep.squeeze(1).nonzero().squeeze(1).tolist() == kept
    dropped = [n for n in range(4) if n not in kept]
    assert (y[dropped] == 0).all() and (y[kept] != 0).any(dim=1).all()


def test_first_choices_outrank_second_choices():
    """E=3, k=2, N=2, factor 0.75 -> C = ceil(0.75*2*2/3) = 1. Token 0 wants (1, 0), token 1 wants
    (0, 2): at expert 0, token 1's first choice beats token 0's second choice despite token order."""
    cfg = MoEConfig(hidden_size=2, intermediate_size=4, num_experts=3, top_k=2, capacity_factor=0.75)
    layer = MoEFFN(cfg)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.tensor([[2.0, 3.0], [3.0, -5.0], [-5.0, 2.0]]))
    _, r = layer(torch.eye(2))
    assert r.indices.tolist() == [[1, 0], [0, 2]]
    assert r.capacity == 1 and r.keep.tolist() == [[True, False], [True, True]]
    assert float(r.drop_rate) == 0.25


# ---------------------------------------------------------------------------- config, jitter


def test_top_k_above_num_experts_names_both():
    with pytest.raises(ConfigError, match=r"top_k=3 > num_experts=2"):
        MoEConfig(num_experts=2, top_k=3)


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param(dict(capacity_factor=0.0), id="capacity"),
        pytest.param(dict(router_jitter=-0.1), id="jitter"),
        pytest.param(dict(impl="sparse"), id="impl"),
        pytest.param(dict(drop_policy="random"), id="policy"),
        pytest.param(dict(hidden_size=0), id="hidden"),
        pytest.param(dict(aux_loss_coef=-1.0), id="aux"),
    ],
)
def test_bad_config_raises(kw):
    with pytest.raises(ConfigError, match=next(iter(kw))):
        MoEConfig(**kw)


def test_jitter_only_in_training():
    layer, x = make((16, 16, 16, 4, 2), router_jitter=0.5)
    layer.eval()
    (y1, r1), (y2, r2) = layer(x), layer(x)
    assert torch.equal(y1, y2) and torch.equal(r1.logits, r2.logits)
    layer.train()
    _, t1 = layer(x)
    _, t2 = layer(x)
    assert not torch.equal(t1.logits, t2.logits)


# ---------------------------------------------------------------------------- export, costs


def test_exports_exactly_to_transformers_mixtral_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    layer, x = make((10, 16, 32, 4, 2))
    layer.eval()
    hf_cfg = MixtralConfig(hidden_size=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    hf_cfg._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(hf_cfg).eval()
    block.load_state_dict(layer.hf_state_dict())
    x3 = x.view(2, 5, 16)
    torch.testing.assert_close(layer(x3)[0], block(x3), rtol=1e-5, atol=1e-6)
    logits, scores, indices = block.gate(x3)
    _, r = layer(x3)
    torch.testing.assert_close(r.logits, logits)
    assert torch.equal(r.indices, indices)
    # and back
    other = MoEFFN(layer.cfg)
    other.load_hf_state_dict(block.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), layer.parameters()))
    torch.testing.assert_close(layer.w1, layer.w13[:, :32])
    assert layer.w3.shape == (4, 32, 16)


def test_costs_and_param_counts():
    mixtral = MoEConfig(hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2)
    total, active = param_counts(mixtral)
    assert total == 8 * 3 * 4096 * 14336 + 4096 * 8 and active == 2 * 3 * 4096 * 14336 + 4096 * 8
    assert moe_flops_per_token(mixtral) == 2 * dense_flops_per_token(4096, 14336) + 2 * 4096 * 8
    assert dense_flops_per_token(4096, 14336) == 6 * 4096 * 14336
    small = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2)
    assert sum(p.numel() for p in MoEFFN(small).parameters()) == param_counts(small)[0]
    dense = DenseFFN.matching(small, "total")
    assert sum(p.numel() for p in dense.parameters()) == param_counts(small)[0] - 16 * 4
    assert dense(torch.randn(3, 16)).shape == (3, 16)
    assert DenseFFN.matching(small, "active").w1.weight.shape == (16, 16)


@pytest.mark.parametrize("impl", ["naive"] + FAST_IMPLS)
def test_empty_batch(impl):
    layer, _ = make((1, 16, 16, 4, 2), 1.0)
    x = torch.randn(0, 16, requires_grad=True)
    y, r = layer(x, impl=impl)
    assert y.shape == (0, 16) and float(r.drop_rate) == 0.0
    assert r.aux_loss.item() == 0.0 and r.z_loss.item() == 0.0
    (y.sum() + r.loss).backward()
