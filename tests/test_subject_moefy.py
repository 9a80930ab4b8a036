"""MoEfication of a gated MLP: the split computes the dense function, modes and gatings, LoRA, router fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from routelib.errors import ConfigError
from routelib.subject.moefy import MoEfiedMLP, SplitConfig, moefy_mlp, split_order, topk_agreement
from routelib.subject.router_fit import RouterFitConfig, fit_router, oracle_labels

H, I = 16, 48


class GatedMLP(nn.Module):
    """The Llama MLP's form: down(silu(gate x) * up x)."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.act_fn = F.silu

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def hidden(self, x):
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)


@pytest.fixture
def mlp_x():
    torch.manual_seed(0)
    return GatedMLP(), torch.randn(64, H)


@pytest.mark.parametrize("shared", [0, 8])
def test_dense_mode_and_all_experts_reproduce_the_mlp(mlp_x, shared):
    mlp, x = mlp_x
    moe = moefy_mlp(mlp, mlp.hidden(x).detach(), SplitConfig(num_experts=4, top_k=4, shared_size=shared))
    with torch.no_grad():
        want = mlp(x)
        moe.set_mode("dense")
        torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-5)
        moe.set_mode("oracle", "unit")  # k = E: every expert kept, weight 1
        torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-5)
        moe.set_mode("router", "softmax")  # zero router: equal gates 1/k, times k
        torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-5)


def test_topk_keeps_the_picked_experts(mlp_x):
    mlp, x = mlp_x
    moe = moefy_mlp(mlp, mlp.hidden(x).detach(), SplitConfig(num_experts=4, top_k=2))
    moe.set_mode("oracle", "unit")
    with torch.no_grad():
        out = moe(x)
        per = moe.expert_outputs(x)  # (N, E, H)
        top = per.norm(dim=-1).topk(2, dim=-1).indices
        want = per.gather(1, top[..., None].expand(-1, -1, H)).sum(1)
    torch.testing.assert_close(out, want)
    assert torch.equal(moe.last_topk, top)
    moe.set_mode("random", seed=3)
    with torch.no_grad():
        moe(x)
    assert not torch.equal(moe.last_topk.sort(1).values, top.sort(1).values)


def test_split_order_is_a_permutation_shared_first(mlp_x):
    mlp, x = mlp_x
    h = mlp.hidden(x).detach()
    cfg = SplitConfig(num_experts=4, top_k=2, shared_size=8)
    order = split_order(h, cfg)
    assert sorted(order.tolist()) == list(range(I))
    freq = (h.abs() >= h.abs().quantile(0.9, dim=1, keepdim=True)).float().mean(0)  # activity per neuron
    assert freq[order[:8]].min() >= freq[order[8:]].max() - 1e-6  # the most often active neurons are shared
    assert torch.equal(order, split_order(h, cfg))  # deterministic


def test_bad_splits_are_named():
    with pytest.raises(ConfigError, match="top_k=5 > num_experts=4"):
        SplitConfig(num_experts=4, top_k=5).check(I)
    with pytest.raises(ConfigError, match="do not split"):
        SplitConfig(num_experts=5, top_k=2).check(I)
    with pytest.raises(ConfigError, match="mode="):
        MoEfiedMLP(torch.zeros(I, H), torch.zeros(I, H), torch.zeros(H, I), torch.arange(I),
                   SplitConfig(num_experts=4)).set_mode("best")


def test_lora_starts_as_the_identity_and_trains_only_updates(mlp_x):
    mlp, x = mlp_x
    moe = moefy_mlp(mlp, mlp.hidden(x).detach(), SplitConfig(num_experts=4, top_k=2, shared_size=8))
    moe.set_mode("router", "softmax")
    with torch.no_grad():
        before = moe(x)
    moe.add_lora(rank=2)
    out = moe(x)
    torch.testing.assert_close(out, before)
    out.pow(2).sum().backward()
    assert moe.gate_w.grad is None and moe.lora["gate_w_B"].grad.abs().sum() > 0
    assert moe.lora["down_w_A"].shape == (4, 2, (I - 8) // 4) and moe.lora["shared_down_B"].shape == (H, 2)


def test_balance_loss_is_one_when_balanced():
    moe = MoEfiedMLP(torch.zeros(I, H), torch.zeros(I, H), torch.zeros(H, I), torch.arange(I),
                     SplitConfig(num_experts=4, top_k=1))
    moe.last_logits = torch.zeros(8, 4)
    moe.last_topk = torch.arange(8).remainder(4)[:, None]
    assert moe.balance_loss().item() == pytest.approx(1.0)
    moe.last_topk = torch.zeros(8, 1, dtype=torch.long)  # everything to expert 0
    moe.last_logits = torch.tensor([[5.0, 0, 0, 0]]).expand(8, 4)
    assert moe.balance_loss().item() > 3.5


def test_router_fit_learns_a_linear_rule():
    torch.manual_seed(1)
    x = torch.randn(2000, H)
    w = torch.randn(4, H)
    norms = (x @ w.T).exp()  # the experts that matter follow a linear score
    weight, stats = fit_router(x, norms, 2, RouterFitConfig(steps=300, lr=0.05))
    assert stats["agreement"] > 0.9
    assert topk_agreement((x @ weight.T).topk(2, 1).indices.numpy(), norms.topk(2, 1).indices.numpy()) > 0.9
    assert oracle_labels(norms, 2).sum(1).eq(2).all()
    with pytest.raises(ConfigError, match="top_k=5"):
        oracle_labels(norms, 5)
