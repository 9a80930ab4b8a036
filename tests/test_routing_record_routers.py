"""routelib.routing.record.routers: finding any model's routers, reading every kind of router output,
telling the kind of its scores."""

import pytest
import torch

from routelib.errors import RoutelibError
from routelib.routing.record import routers as RT

from test_routing_record_collect import mixtral, tiny_model  # noqa: F401 -- a module fixture, shared

pytestmark = pytest.mark.usefixtures("one_thread")


def test_structural_fallback_and_routers_returning_only_logits(mixtral, monkeypatch):
    declared = RT.find_routers(mixtral)
    monkeypatch.setattr(RT, "_recorder_specs", lambda model: [])
    found = RT.find_routers(mixtral)
    assert found.names == declared.names and found.source.startswith("structural")
    # a router that returns bare logits: top-k and weights derived as Mixtral does (softmax, top-k, renorm)
    router = mixtral.model.layers[0].mlp.gate
    x = torch.randn(2 * 5, 32)
    logits, weights, ids = router(x)
    rec = RT.RoutingRecorder(mixtral, found)
    for store in rec._outputs:
        store.extend([logits[:6], logits[6:]])  # two "steps" of a batch of 2: 3 positions, then 2
    experts, w, _ = rec.gather(batch_size=2, seq_len=5)  # (B, T, L, k)

    def by_position(t):  # the same two steps, rows (b, t) of each: (2, 5, k)
        return torch.cat([t[:6].reshape(2, 3, -1), t[6:].reshape(2, 2, -1)], dim=1)

    torch.testing.assert_close(experts[:, :, 0], by_position(ids))
    torch.testing.assert_close(w[:, :, 0], by_position(weights))
    assert "derived from router logits" in rec.weights_source


def test_output_router_logits_with_cache_and_mask_is_broken_upstream(mixtral):
    """Why collection hooks the routers instead of passing output_router_logits=True to generate:
    in transformers 5.x the aux loss breaks on decode steps with an attention mask. If this starts
    passing, the public path works again and collect could switch to it."""
    ids = torch.tensor([[1, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(RuntimeError, match="size of tensor"):
        mixtral.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=1,
                         output_router_logits=True)


def test_router_outputs_of_other_layouts_are_put_back_per_token():
    """JetMoE's expert-sorted output and Llama-4's dense scores become the same (N, k) ids and weights
    that each model's own definition gives (top-k of the logits; softmax over them / their sigmoid)."""
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeTopKGating
    from transformers.models.llama4.configuration_llama4 import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    torch.manual_seed(0)
    x = torch.randn(7, 16)
    gating = JetMoeTopKGating(16, 6, 2)
    logits, weights, ids = RT.split_router_output(gating(x))
    top, want_ids = logits.topk(2, dim=-1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, torch.softmax(top, dim=-1))
    router = Llama4Router(Llama4TextConfig(hidden_size=16, num_local_experts=6, num_experts_per_tok=2))
    logits, weights, ids = RT.split_router_output(router(x), logits_index=1, top_k=2)
    top, want_ids = logits.topk(2, dim=-1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, torch.sigmoid(top))


def test_score_kind_is_told_from_the_weights_the_model_applied():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 8, generator=gen)  # (N, E)
    ids = logits.topk(2, dim=-1).indices
    soft = torch.softmax(logits, -1).gather(-1, ids)
    sig = torch.sigmoid(logits).gather(-1, ids)
    assert RT.score_kind(logits, soft / soft.sum(-1, keepdim=True), ids) == "softmax"  # renormalised
    assert RT.score_kind(logits, 2.5 * sig / sig.sum(-1, keepdim=True), ids) == "sigmoid"  # DeepSeek-style
    assert RT.score_kind(torch.softmax(logits, -1), soft, ids) == "probabilities"  # Gemma-4
    top1 = logits.topk(1, dim=-1).indices
    assert RT.score_kind(logits, torch.ones(50, 1), top1) == "unknown"  # renormalised top-1: nothing to tell
    torch.testing.assert_close(RT.scores_to_probs(logits, "sigmoid"), torch.sigmoid(logits))
    with pytest.raises(RoutelibError, match="unknown"):
        RT.scores_to_probs(logits, "unknown")
