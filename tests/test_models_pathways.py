"""Pathway routing: exact reproduction of the base model, sparse = dense_masked (outputs and
gradients), GLBL on hand-computed values, momentum statistics in the loss, GLBL rebalancing a
collapsed router, config validation and unsupported architectures."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from routelib.errors import ConfigError
from routelib.models.pathways import (
    GlobalFrequency,
    PathwayMLP,
    RoutedLLM,
    RoutingConfig,
    decoder_layers,
    glbl_loss,
    switch_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOL = 1e-5  # relative error ||a - b|| / ||b|| in fp32


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """||a - b|| / ||b||; ``floor`` bounds the denominator for gradients that are ~0 by construction
    (e.g. the router's gradient when k = 1 and the gate is renormalised to 1)."""
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def tiny_llama(seed: int = 0, mlp_bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, mlp_bias=mlp_bias)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def small_mlp(hidden: int, intermediate: int) -> LlamaMLP:
    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=1,
                                num_key_value_heads=1))


MODELS = [pytest.param(tiny_llama, id="llama"), pytest.param(lambda: tiny_llama(mlp_bias=True), id="llama-bias"),
          pytest.param(tiny_gpt2, id="gpt2")]


# ----------------------------------------------------------------------------------------------
# exactness and the two implementations


@pytest.mark.parametrize("make", MODELS)
def test_all_pathways_unit_weights_reproduce_base_logits_exactly(make):
    model = make()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        routed = RoutedLLM(model, RoutingConfig(num_pathways=8, top_k_pathways=2)).set_mode("all")
        out = routed(ids, attention_mask=mask)
    assert torch.equal(out.logits, ref)  # bit for bit
    assert [r.layer for r in out.routing] == routed.routed_layers == list(range(0, len(decoder_layers(model)), 2))
    # routing is still recorded in "all" mode; routed mode changes the output
    assert out.routing[0].indices.shape == (2, 12, 2) and out.routing[0].probs.shape == (2, 12, 8)
    with torch.no_grad():
        assert not torch.allclose(routed.set_mode("routed")(ids, attention_mask=mask).logits, ref)
    # unwrap restores the original modules
    base = routed.unwrap()
    assert not any(isinstance(layer.mlp, PathwayMLP) for layer in decoder_layers(base))


@pytest.mark.parametrize("make", MODELS)
def test_sum_of_all_pathways_is_the_mlp(make):
    """sparse with k = N and unit weights computes the whole MLP (up to summation order)."""
    model = make()
    mlp = decoder_layers(model)[0].mlp
    pm = PathwayMLP(mlp, RoutingConfig(num_pathways=4, top_k_pathways=4))
    x = torch.randn(10, pm.hidden_size)
    idx = torch.arange(4).repeat(10, 1)  # (10, 4) every pathway
    w = torch.ones(10, 4)
    with torch.no_grad():
        ref = mlp(x)
        assert rel_err(pm.sparse(x, idx, w), ref) < TOL
        assert rel_err(pm.dense_masked(x, idx, w), ref) < TOL


# (tokens n, N pathways, k)
SPARSE_SHAPES = [
    pytest.param((1, 8, 2), id="n1-N8-k2"),
    pytest.param((37, 8, 2), id="n37-N8-k2"),
    pytest.param((64, 16, 4), id="n64-N16-k4"),
    pytest.param((20, 4, 1), id="n20-N4-k1"),
    pytest.param((16, 2, 2), id="n16-N2-kN"),
]


@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("shape", SPARSE_SHAPES)
@pytest.mark.parametrize("normalize", [True, False], ids=["renorm", "raw"])
def test_sparse_equals_dense_masked_outputs_and_grads(make, shape, normalize):
    n, num, k = shape
    model = make()
    mlp = decoder_layers(model)[0].mlp
    pm = PathwayMLP(mlp, RoutingConfig(num_pathways=num, top_k_pathways=k, normalize_topk=normalize,
                                       router_init_std=0.5))
    x0 = torch.randn(n, pm.hidden_size, generator=torch.Generator().manual_seed(n))
    results = {}
    for impl in ("dense_masked", "sparse"):
        pm.zero_grad()
        x = x0.clone().requires_grad_(True)
        pm.impl = impl
        y = pm(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = {name: p.grad.clone() for name, p in pm.named_parameters() if p.grad is not None}
        results[impl] = (y.detach(), x.grad.clone(), grads)
    (yd, gxd, gd), (ys, gxs, gs) = results["dense_masked"], results["sparse"]
    assert rel_err(ys, yd) < TOL
    assert rel_err(gxs, gxd) < TOL
    assert gd.keys() == gs.keys() and "router.proj.weight" in gd
    for name in gd:
        assert rel_err(gs[name], gd[name], floor=1e-3) < 1e-4, name


def test_routed_llm_sparse_equals_dense_masked_end_to_end():
    model = tiny_llama()
    routed = RoutedLLM(model, RoutingConfig(num_pathways=8, top_k_pathways=2, router_init_std=0.3))
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    outs = {}
    for impl in ("dense_masked", "sparse"):
        routed.zero_grad()
        out = routed.set_impl(impl)(ids, labels=ids)
        out.loss.backward()
        outs[impl] = (out.logits.detach(), {n: p.grad.clone() for n, p in routed.named_parameters()
                                            if p.grad is not None})
    assert rel_err(outs["sparse"][0], outs["dense_masked"][0]) < TOL
    for name, g in outs["dense_masked"][1].items():
        assert rel_err(outs["sparse"][1][name], g, floor=1e-3) < 1e-4, name


def test_unit_weights_for_uniform_router():
    """A zero router (uniform probs) gives every chosen pathway weight exactly 1, both gate modes."""
    mlp = small_mlp(16, 32)
    for normalize in (True, False):
        pm = PathwayMLP(mlp, RoutingConfig(num_pathways=8, top_k_pathways=3, router_init="zeros",
                                           normalize_topk=normalize))
        dec = pm.router(torch.randn(5, 16))
        torch.testing.assert_close(dec.weights, torch.ones(5, 3))
    pm = PathwayMLP(mlp, RoutingConfig(num_pathways=8, top_k_pathways=2, router_init="zeros", gate_scale=4.0))
    torch.testing.assert_close(pm.router(torch.randn(5, 16)).weights, torch.full((5, 2), 4.0))


def test_smollm2_all_pathways_reproduce_base_and_sparse_matches_dense():
    """The pretrained SmolLM2-135M (30 layers, 15 routed at 16 pathways x 96 neurons, top-4)."""
    from routelib.data.pretrained import load_pretrained

    model, tok = load_pretrained("smollm2-135m")
    ids = tok("def add(a, b):\n    return a + b\n\nThe quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        routed = RoutedLLM(model, RoutingConfig()).set_mode("all")
        assert torch.equal(routed(ids).logits, ref)
        assert routed.routed_layers == list(range(0, 30, 2))
        assert all(m.pathway_size == 96 for m in routed.pathway_mlps().values())
        routed.set_mode("routed")
        sparse = routed.set_impl("sparse")(ids).logits
        dense = routed.set_impl("dense_masked")(ids).logits
    assert rel_err(sparse, dense) < 1e-4  # 15 routed layers of fp32 reordering


# ----------------------------------------------------------------------------------------------
# GLBL and the Switch loss


def test_glbl_hand_computed():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1],
                          [0.1, 0.7, 0.1, 0.1]])  # score P = [0.4, 0.4, 0.1, 0.1]
    freq = torch.tensor([0.5, 0.25, 0.25, 0.0])
    assert glbl_loss(probs, freq).item() == pytest.approx(4 * (0.5 * 0.4 + 0.25 * 0.4 + 0.25 * 0.1))  # 1.3
    # uniform frequency -> exactly 1 whatever the probabilities; collapse onto k of N -> N / k
    assert glbl_loss(probs, torch.full((4,), 0.25)).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).repeat(3, 1)
    assert glbl_loss(collapsed, torch.tensor([0.5, 0.5, 0.0, 0.0])).item() == pytest.approx(2.0)
    # Switch loss: f from this batch's top-k selections (here top-1: pathways 0 and 1)
    idx = torch.tensor([[0], [1]])
    assert switch_loss(probs, idx).item() == pytest.approx(4 * (0.5 * 0.4 + 0.5 * 0.4))  # 1.6
    # gradient flows through the score only (the frequency is a constant)
    p = probs.clone().requires_grad_(True)
    f = freq.clone().requires_grad_(True)
    glbl_loss(p, f).backward()
    torch.testing.assert_close(p.grad, (4 * freq / 2).expand(2, 4))
    assert f.grad is None


def test_glbl_uses_the_momentum_statistics():
    """The EMA is the frequency in the loss: change it and the loss changes; with momentum 0 on one
    process GLBL equals the Switch loss of the batch."""
    torch.manual_seed(0)
    mlp = small_mlp(16, 32)
    x = torch.randn(50, 16)
    pm = PathwayMLP(mlp, RoutingConfig(num_pathways=8, top_k_pathways=2, momentum=0.0, router_init_std=0.5)).train()
    pm(x)
    assert pm.last.glbl.item() == pytest.approx(pm.last.switch.item(), rel=1e-6)
    torch.testing.assert_close(pm.last.global_frequency, pm.last.frequency)

    pm = PathwayMLP(mlp, RoutingConfig(num_pathways=8, top_k_pathways=2, momentum=0.9, router_init_std=0.5)).train()
    pm(x)  # first update: ema = batch frequency
    first = pm.freq.ema.clone()
    torch.testing.assert_close(first, pm.last.frequency)
    prior = torch.zeros(8)
    prior[0] = 1.0
    with torch.no_grad():
        pm.freq.ema.copy_(prior)  # pretend the past global batches all went to pathway 0
    pm(x)
    torch.testing.assert_close(pm.freq.ema, 0.9 * prior + 0.1 * first)  # the same batch again
    expected = 8 * (pm.freq.ema * pm.last.probs.reshape(-1, 8).mean(0)).sum()
    assert pm.last.glbl.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(pm.last.glbl.item() - pm.last.switch.item()) > 1e-3  # the EMA, not the batch, is used
    # eval and no-grad passes leave the EMA alone
    ema = pm.freq.ema.clone()
    pm.eval()
    pm(x)
    pm.train()
    with torch.no_grad():
        pm(x)
    torch.testing.assert_close(pm.freq.ema, ema)


def test_global_frequency_counts_only_valid_tokens_and_checkpoints():
    model = tiny_llama()
    routed = RoutedLLM(model, RoutingConfig(num_pathways=8, top_k_pathways=2, momentum=0.0)).train()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    out = routed(ids, attention_mask=mask)
    r = out.routing[0]
    valid = mask.bool()
    expect = torch.bincount(r.indices[valid].reshape(-1), minlength=8).float() / (valid.sum() * 2)
    torch.testing.assert_close(r.frequency, expect)
    torch.testing.assert_close(routed.pathway_mlps()[0].freq.ema, expect)
    state = routed.state_dict()
    assert any(k.endswith("freq.ema") for k in state) and any(k.endswith("router.proj.weight") for k in state)
    tokens, sel = routed.collect_routing(ids, attention_mask=mask)
    assert tokens.shape == (int(valid.sum()),) and set(sel) == {0, 2} and sel[0].shape == (tokens.shape[0], 2)


def test_glbl_rebalances_a_collapsed_router():
    """Optimise only the router with GLBL from a collapsed start (every token on pathways 0..3):
    the selection frequencies spread out."""
    torch.manual_seed(0)
    n_pw, k, hid = 16, 4, 32
    mlp = small_mlp(hid, 64)
    pm = PathwayMLP(mlp, RoutingConfig(num_pathways=n_pw, top_k_pathways=k, momentum=0.5)).train()
    with torch.no_grad():
        pm.router.proj.weight.normal_(0.0, 0.1)
        pm.router.proj.weight[:k, 0] += 4.0  # feature 0 is a constant 1: a bias toward pathways 0..3
    opt = torch.optim.Adam(pm.router.parameters(), lr=0.05)

    def batch(step):
        x = torch.randn(256, hid, generator=torch.Generator().manual_seed(step))
        x[:, 0] = 1.0
        return x

    def selection_stats(x):
        with torch.no_grad():
            idx = pm.router(x).indices
        f = torch.bincount(idx.reshape(-1), minlength=n_pw).float() / idx.numel()
        ent = -(f[f > 0] * f[f > 0].log()).sum().item() / math.log(n_pw)
        return ent, f.max().item()

    x_eval = batch(10_000)
    ent0, max0 = selection_stats(x_eval)
    assert max0 > 0.24  # collapsed: 4 pathways take (almost) all selections
    for step in range(60):
        opt.zero_grad()
        pm(batch(step))
        pm.last.glbl.backward()
        opt.step()
    ent1, max1 = selection_stats(x_eval)
    assert ent1 > ent0 + 0.15 and ent1 > 0.9
    assert max1 < 0.5 * max0


def test_aux_loss_weights_and_train_loop_interface():
    model = tiny_llama()
    cfg = RoutingConfig(num_pathways=8, top_k_pathways=2, glbl_weight=0.5, switch_weight=0.25)
    routed = RoutedLLM(model, cfg)
    ids = torch.randint(0, 96, (2, 8))
    out = routed(ids, labels=ids)
    glbl = torch.stack([r.glbl for r in out.routing]).mean()
    switch = torch.stack([r.switch for r in out.routing]).mean()
    torch.testing.assert_close(out.aux_loss, 0.5 * glbl + 0.25 * switch)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert not hasattr(routed, "router_aux_loss_coef")  # routelib.train adds aux_loss with weight 1
    assert routed.config is model.config
    assert sum(p.numel() for p in routed.router_parameters()) == 2 * 8 * 64


# ----------------------------------------------------------------------------------------------
# configuration and architectures


@pytest.mark.parametrize("kwargs", [
    pytest.param({"top_k_pathways": 17}, id="k>N"),
    pytest.param({"num_pathways": 0}, id="N0"),
    pytest.param({"momentum": 1.0}, id="momentum1"),
    pytest.param({"glbl_weight": -1.0}, id="negative-weight"),
    pytest.param({"impl": "fast"}, id="impl"),
    pytest.param({"router_init": "xavier"}, id="init"),
    pytest.param({"routed_layers": ()}, id="no-layers"),
    pytest.param({"gate_scale": 0.0}, id="gate-scale"),
])
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        RoutingConfig(**kwargs)


def test_layer_selection_and_divisibility():
    assert RoutingConfig().layers_to_route(30) == list(range(0, 30, 2))
    assert RoutingConfig(route_every_n_layers=3).layers_to_route(7) == [0, 3, 6]
    assert RoutingConfig(routed_layers=(3, 1)).layers_to_route(4) == [1, 3]
    with pytest.raises(ConfigError, match="out of range"):
        RoutedLLM(tiny_llama(), RoutingConfig(num_pathways=8, top_k_pathways=2, routed_layers=(4,)))
    with pytest.raises(ConfigError, match="not divisible"):
        RoutedLLM(tiny_llama(), RoutingConfig(num_pathways=12, top_k_pathways=2))  # I = 128


def test_unsupported_architecture_is_named():
    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4))
    with pytest.raises(ConfigError, match="mixtral.*MoE"):
        RoutedLLM(moe, RoutingConfig(num_pathways=4, top_k_pathways=2))
    with pytest.raises(ConfigError, match="no decoder layers.*Sequential"):
        RoutedLLM(torch.nn.Sequential(torch.nn.Linear(4, 4)), RoutingConfig(num_pathways=4, top_k_pathways=2))


_DDP_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
from routelib.models.pathways import GlobalFrequency, glbl_loss

def main(rank, world, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    gf = GlobalFrequency(4, momentum=0.5)
    local = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 3.0]])[rank]  # each rank sees other pathways
    freq = gf.update(local)
    probs = torch.full((2, 4), 0.25)
    json.dump({"freq": freq.tolist(), "ema": gf.ema.tolist(), "glbl": glbl_loss(probs, gf.ema).item()},
              open(os.path.join(out, f"rank{rank}.json"), "w"))
    dist.destroy_process_group()

if __name__ == "__main__":
    torch.multiprocessing.spawn(main, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
"""


def test_global_frequency_is_synchronised_across_ranks(tmp_path):
    """Two gloo ranks with disjoint local selections both see the global frequencies."""
    import json
    import subprocess
    import sys

    script = tmp_path / "ddp_freq.py"
    script.write_text(_DDP_SCRIPT)
    subprocess.run([sys.executable, str(script), f"file://{tmp_path / 'pg'}", str(tmp_path)], check=True,
                   timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["freq"] == pytest.approx([0.375, 0.125, 0.125, 0.375])  # (local counts summed) / 8
        assert got["ema"] == pytest.approx(got["freq"])  # first update


def test_trains_with_routelib_train_and_checkpoints(tmp_path):
    """RoutedLLM plugs into routelib.train: aux_loss logged, router and EMA saved in the checkpoint."""
    from routelib.train import TrainConfig, load_checkpoint, train

    routed = RoutedLLM(tiny_llama(), RoutingConfig(num_pathways=8, top_k_pathways=2, glbl_weight=0.1))

    def batch_fn(step, rank, world):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, 96, (2, 16), generator=g)
        return x, torch.roll(x, -1, 1)

    cfg = TrainConfig(max_steps=3, warmup_steps=0, log_every=1, lr=1e-3, out_dir=str(tmp_path), device="cpu")
    result = train(routed, batch_fn, cfg)
    assert len(result.history) == 3 and all("aux_loss" in r for r in result.history)
    ema = routed.pathway_mlps()[0].freq.ema.clone()
    assert int(routed.pathway_mlps()[0].freq.num_updates) == 3
    fresh = RoutedLLM(tiny_llama(seed=1), RoutingConfig(num_pathways=8, top_k_pathways=2))
    load_checkpoint(tmp_path, fresh)
    torch.testing.assert_close(fresh.pathway_mlps()[0].freq.ema, ema)
    torch.testing.assert_close(fresh.routers()[0].proj.weight, routed.routers()[0].proj.weight)


def test_wrapping_keeps_the_model_in_its_mode():
    import transformers as tf

    for training in (False, True):
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
        model.train(training)
        routed = RoutedLLM(model, RoutingConfig(num_pathways=4, top_k_pathways=2))
        assert routed.training == training and all(m.training == training for m in routed.modules())
