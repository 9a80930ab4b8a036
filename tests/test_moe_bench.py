"""routelib.moe_bench at toy shapes on CPU: every row present, and the transformers peer computes
the same function as routelib's layer (so the GPU table compares like with like)."""

import pytest
import torch

from routelib import moe_bench
from routelib.models.moe import MoEConfig, MoEFFN

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("impl", moe_bench.HF_IMPLS)
def test_transformers_block_equals_routelib_layer(impl):
    torch.manual_seed(0)
    layer = MoEFFN(MoEConfig(hidden_size=32, intermediate_size=48, num_experts=4, top_k=2)).eval()
    block = moe_bench._hf_block(layer, impl)
    x = torch.randn(1, 10, 32)
    out = block(x)
    hf_y = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(hf_y, layer(x)[0], rtol=1e-5, atol=1e-6)


def test_benchmark_table_at_toy_shapes():
    df = moe_bench.benchmark(hidden=32, ffn=64, experts=4, top_k=2, tokens=(64, 128), dtype="fp32",
                             device="cpu", rounds=1, min_time_s=0.01)
    names = {"moe_naive", "moe_padded", "moe_grouped", "grouped_mm_alone", "dense_equal_total",
             "dense_equal_active", "transformers_eager", "transformers_grouped_mm"}
    assert set(df["name"]) == names and sorted(df["tokens"].unique()) == [64, 128]
    assert (df["median_ms"] > 0).all() and (df["tflops"] > 0).all()
    row = df[(df.tokens == 64) & (df.name == "moe_naive")].iloc[0]
    assert row["speedup"] == 1.0
