"""routelib.routing.predict.bench_cost at toy shapes: the layer is transformers' Mixtral block in the asked
dtype with finite random weights, and the table holds every (batch, name) with the layer at 100 %.
Times are not checked (a benchmark, not a timed test)."""

import pytest
import torch

from routelib.routing.predict import bench_cost as B

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = dict(hidden_size=32, intermediate_size=16, num_experts=4, top_k=2, num_layers=4, train_tokens=2000,
           mlp_steps=5, rounds=1, min_time_s=0.001, batch_sizes="1,8")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_layer_is_the_mixtral_block_in_its_dtype(dtype):
    layer = B.mixtral_layer(B.PrefetchBenchConfig(**{**TOY, "dtype": dtype}))
    assert type(layer).__name__ == "MixtralSparseMoeBlock"
    assert {p.dtype for p in layer.parameters()} == {B.DTYPES[dtype]}
    assert all(torch.isfinite(p).all() and 0.01 < p.float().std() < 0.03 for p in layer.parameters())
    with torch.no_grad():
        out = layer(torch.randn(1, 3, 32).to(B.DTYPES[dtype]))
    assert out.shape == (1, 3, 32) and torch.isfinite(out).all()


def test_cost_table_at_toy_shapes():
    table = B.cost_table(B.PrefetchBenchConfig(**TOY, predictors="prior,lookup,mlp"))
    assert sorted(table["batch"].unique()) == [1, 8]
    assert set(table["name"]) == {"moe_layer", "prior", "lookup", "mlp"}
    assert (table.loc[table["name"] == "moe_layer", "pct_of_layer"] == 100).all()
    assert (table["median_ms"] > 0).all()
    text = B.markdown(table)
    assert text.splitlines()[0].startswith("| | B = 1: ms | % of layer | B = 8: ms") and "| mlp |" in text
    with pytest.raises(B.ConfigError, match="batch_sizes"):
        B.PrefetchBenchConfig(batch_sizes="1,x").batches()


def test_hidden_state_predictors_are_timed_at_every_hop():
    cfg = B.PrefetchBenchConfig(**TOY, predictors="lookup,hidden_router,hidden_probe,pre_attn_probe",
                                hidden_hops="1,3", hidden_tokens=1000, probe_steps=2)
    data = B.hidden_data(cfg, B.mixtral_layer(cfg).gate)
    assert data.num_layers == 4 and data.hidden.x.shape == data.hidden.pre_attention.shape == (1000, 4, 32)
    table = B.cost_table(cfg)
    timed = set(zip(table["name"], table["hop"].fillna(0).astype(int)))
    assert timed == {("moe_layer", 0), ("lookup", 1)} | {(n, h) for n in ("hidden_router", "hidden_probe", "pre_attn_probe")
                                                         for h in (1, 3)}
    assert len(table) == 2 * len(timed) and (table["median_ms"] > 0).all()
    lines = B.markdown(table).splitlines()
    assert len(lines) == 2 + len(timed)
    assert any(line.startswith("| pre_attn_probe, hop 3 |") for line in lines)
    assert any(line.startswith("| lookup |") for line in lines)
    with pytest.raises(B.ConfigError, match="hidden_hops"):
        B.hidden_data(B.PrefetchBenchConfig(**{**TOY, "hidden_hops": "4"}), None)
