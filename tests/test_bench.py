"""routelib.bench: per-call timing (perf_counter on CPU, CUDA events on GPU) and comparison tables."""

import time

import pytest
import torch

from routelib.bench import Timing, compare, time_fn
from routelib.errors import ConfigError


def test_time_fn_cpu_gives_positive_ordered_statistics():
    x = torch.randn(64, 64)
    calls = []
    t = time_fn(lambda: calls.append(x @ x), warmup=2, repeats=7, device="cpu")
    assert isinstance(t, Timing) and t.device == "cpu" and t.repeats == 7 and len(t.times_ms) == 7
    assert len(calls) == 2 + 7  # warm-up calls are not timed
    assert 0 < t.min_ms <= t.p10_ms <= t.median_ms <= t.p90_ms


def test_time_fn_measures_what_it_times():
    t = time_fn(lambda: time.sleep(0.005), warmup=1, repeats=5, device="cpu")
    assert 4.5 < t.median_ms < 50


def test_time_fn_picks_repeats_to_fill_min_time():
    t = time_fn(lambda: time.sleep(0.002), warmup=0, min_time_s=0.03, device="cpu")
    assert 5 <= t.repeats <= 16  # about 0.03 s / 2 ms, never below 5
    fast = time_fn(lambda: None, warmup=0, min_time_s=0.01, max_repeats=50, device="cpu")
    assert fast.repeats == 50  # capped


@pytest.mark.parametrize("bad", [dict(repeats=0), dict(warmup=-1), dict(min_time_s=-1.0)])
def test_time_fn_rejects_bad_arguments(bad):
    with pytest.raises(ConfigError):
        time_fn(lambda: None, device="cpu", **bad)


def test_compare_tabulates_throughput_and_speedup_against_the_baseline():
    fns = {"slow": lambda: time.sleep(0.004), "fast": lambda: time.sleep(0.001)}
    df = compare(fns, baseline="slow", items=1000, flops={"slow": 4e9, "fast": 1e9}, warmup=1, repeats=5,
                 rounds=2, device="cpu")
    assert list(df["name"]) == ["slow", "fast"] and df.attrs["baseline"] == "slow"
    assert set(df.columns) >= {"median_ms", "min_ms", "p10_ms", "p90_ms", "items_per_s", "tflops", "speedup"}
    assert (df["repeats"] == 10).all()  # two rounds pooled
    row = df.set_index("name")
    assert row.loc["slow", "speedup"] == 1.0 and row.loc["fast", "speedup"] > 1.5
    assert row.loc["slow", "items_per_s"] == pytest.approx(1000 / (row.loc["slow", "median_ms"] / 1e3))
    with pytest.raises(ConfigError, match="baseline"):
        compare(fns, baseline="missing", repeats=1, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_time_fn_cuda_uses_events_and_sees_the_kernel_time():
    a = torch.randn(2048, 2048, device="cuda")
    small = time_fn(lambda: a @ a, warmup=3, repeats=10)
    assert small.device == "cuda" and small.median_ms > 0
    b = torch.randn(8192, 8192, device="cuda")
    big = time_fn(lambda: b @ b, warmup=3, repeats=10)
    assert big.median_ms > 10 * small.median_ms  # 64x the flops; async launches would hide this
