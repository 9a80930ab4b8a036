"""routelib.routing.predict.pre_attention and the pre-attention states: on constructed traces and hidden
states where a leak would show (a probe reading the target layer's own router input scores perfectly,
the pre-attention probe stays at chance; where the source block's input does hold the answer, it learns
it), and on a tiny Mixtral, whose recomputed block inputs are the token embeddings at block 0 and do not
change when later tokens are cut off."""

import numpy as np
import pytest
import torch
from torch import nn

from routelib.routing import predict as P
from routelib.routing.predict.dataset import HiddenStatesUnavailable, need_hidden

from test_routing_predict_dataset import LAYERS, make_data, tiny_traces  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 24  # hidden size of the constructed states
FAST_PROBE = P.ProbeConfig(steps=150, batch_size=256, lr=3e-2)


def with_constructed_states(data, seed=0):
    """``data`` with hidden states as causality allows: layer l's router input encodes layer l's gate
    vector (the router decides from it); the input of block l encodes layer l - 1's (its MoE output
    went into the residual stream), block 0's input nothing (an embedding); small noise everywhere."""
    rng = np.random.default_rng(seed)
    gates = np.stack([P.gate_vectors(data.experts[:, t], data.weights[:, t], data.num_experts)
                      for t in range(data.num_layers)], 1)  # (N, L, E)
    proj = rng.normal(0, 1, (data.num_experts, WIDTH))  # (E, H)
    x = gates @ proj + rng.normal(0, 0.05, (len(data), data.num_layers, WIDTH))  # (N, L, H)
    before = np.concatenate([np.zeros_like(gates[:, :1]), gates[:, :-1]], 1)  # (N, L, E): layer l - 1's gates
    pre = before @ proj + rng.normal(0, 0.05, (len(data), data.num_layers, WIDTH))  # (N, L, H)
    routers = [nn.Linear(WIDTH, data.num_experts, bias=False) for _ in range(data.num_layers)]
    data.hidden = P.HiddenStates(x.astype(np.float16), routers, "constructed", 1.0, None, pre.astype(np.float16))
    return data


class ReadsTheTargetsRouterInput(P.PreAttentionProbePredictor):
    """A leaky variant: for source layer l it reads layer l + 1's router input, which does not exist
    when layer l's block starts (the test's own control: a leak must show)."""

    name = "leaky"

    def states(self, data):
        x = need_hidden(data, self.name).x
        return np.concatenate([x[:, 1:], x[:, -1:]], 1)  # (N, L, H): source l -> layer l + 1's router input


def top1(predictor, test, layer, hop=1):
    return P.routing_metrics(predictor.predict_scores(test, layer, hop), test.experts[:, layer + hop])["top1"]


def split(data):
    s = P.make_splits(data, "problem", seed=0)[0]
    return data.take(s.train), data.take(s.test)


def test_a_leak_would_score_perfectly_and_the_pre_attention_probe_does_not(tmp_path):
    data = with_constructed_states(make_data(tmp_path, "independent", per_dataset=20, length=40))
    train, test = split(data)
    pairs = P.layer_pairs(LAYERS, [1])
    honest = P.PreAttentionProbePredictor(FAST_PROBE).fit(train, pairs)
    leaky = ReadsTheTargetsRouterInput(FAST_PROBE).fit(train, pairs)
    for layer, _ in pairs:
        assert top1(leaky, test, layer) > 0.95  # the target's routing was readable: a leak shows
        assert top1(honest, test, layer) < 0.25  # independent layers: chance is 1/8
    # and the router-input probe of the same pair (layer l's router input: layer l's routing only) too
    probe = P.HiddenProbePredictor(FAST_PROBE).fit(train, pairs)
    assert max(top1(probe, test, layer) for layer, _ in pairs) < 0.25


def test_it_reads_the_source_blocks_input_and_learns_what_it_holds(tmp_path):
    # every layer repeats layer 0: block l's input (layer l - 1's routing) holds the answer for l >= 1,
    # block 0's input (an embedding) does not
    data = with_constructed_states(make_data(tmp_path, "same", per_dataset=20, length=40))
    train, test = split(data)
    probe = P.PreAttentionProbePredictor(FAST_PROBE).fit(train, P.layer_pairs(LAYERS, [1, 2]))
    assert top1(probe, test, 0) < 0.3
    for layer, hop in [(1, 1), (2, 1), (1, 2)]:
        assert top1(probe, test, layer, hop) > 0.9


def test_it_needs_the_pre_attention_states(tmp_path):
    data = with_constructed_states(make_data(tmp_path, "independent", per_dataset=4, length=20))
    data.hidden.pre_attention = None
    with pytest.raises(HiddenStatesUnavailable, match="pre_attention=True"):
        P.PreAttentionProbePredictor(FAST_PROBE).fit(data, [(0, 1)])
    assert "pre_attn_probe" in P.PREDICTORS and "pre_attn_probe" in P.HIDDEN_PREDICTORS
    assert isinstance(P.make_predictor("pre_attn_probe"), P.PreAttentionProbePredictor)


def test_rms_normalise():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = P.rms_normalise(x)
    torch.testing.assert_close(out[0].pow(2).mean(), torch.tensor(1.0))
    assert torch.equal(out[1], torch.zeros(2))


# ---- the pre-attention states of a real (tiny) model ----------------------------------------------------


def test_block_inputs_are_the_residual_before_attention_and_causal(tiny_traces):  # noqa: F811
    model, out = tiny_traces
    data = P.load_routing(out)
    hidden = P.attach_hidden_states(data, model, batch_tokens=64, progress=False, pre_attention=True)
    assert hidden.pre_attention.shape == hidden.x.shape == (len(data), 3, 32)
    with torch.no_grad():
        embedded = model.model.embed_tokens(torch.from_numpy(data.token_id)).numpy()  # (N, H)
    np.testing.assert_allclose(hidden.pre_attention[:, 0], embedded, atol=2e-3)  # block 0: the embeddings
    assert not np.allclose(hidden.pre_attention[:, 1], hidden.x[:, 1], atol=1e-2)  # not the router's input
    # cut every sequence after 4 tokens: the states of those tokens do not change (no later token read)
    prefix = data.take(data.position < 4)
    P.attach_hidden_states(prefix, model, progress=False, pre_attention=True)
    np.testing.assert_allclose(prefix.hidden.pre_attention, hidden.pre_attention[data.position < 4], atol=5e-3)
    assert prefix.hidden.take(np.arange(3)).pre_attention.shape == (3, 3, 32)


def test_evaluate_attaches_the_pre_attention_states(tiny_traces):  # noqa: F811
    model, out = tiny_traces
    data = P.load_routing(out)
    P.attach_hidden_states(data, model, progress=False)  # router inputs only
    with pytest.raises(HiddenStatesUnavailable, match="pre-attention"):
        P.PreAttentionProbePredictor().fit(data, [(0, 1)])
    per_layer = P.evaluate(data, predictors="prior,pre_attn_probe", hops="1,2", probe_steps=5, model=model,
                           test_fraction=0.5)
    assert data.hidden.pre_attention is not None
    rows = per_layer[per_layer["predictor"] == "pre_attn_probe"]
    assert sorted(set(zip(rows["layer"], rows["hop"]))) == [(0, 1), (0, 2), (1, 1)]
    assert rows["top1"].between(0, 1).all()
