"""Timing that is right on CPU and GPU; every speed figure in the notebooks comes from here.

Method (the one ``triton.testing.do_bench`` and ``torch.utils.benchmark`` follow):

1. warm up: call the function a few times first (compilation, autotuning, caches, the allocator);
2. time every call separately: on CUDA with a pair of ``torch.cuda.Event``s recorded on the stream
   around it (launches are asynchronous, so a host clock would time the launch, not the work) and one
   ``synchronize`` at the end; on CPU with ``time.perf_counter``; garbage collection paused;
3. report the median over the repeats (robust to the odd slow call) with min and p10/p90;
4. compare variants in one process, one after the other (optionally round-robin), and report ratios
   of medians measured in that same run -- never against numbers from another run or machine.

    t = time_fn(lambda: layer(x), device="cuda")            # Timing(median_ms=..., ...)
    df = compare({"dense": dense_fn, "moe": moe_fn}, baseline="dense", items=n_tokens)
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from routelib.device import resolve_device
from routelib.errors import ConfigError


@dataclass
class Timing:
    median_ms: float  # median of the timed calls
    min_ms: float  # fastest call
    p10_ms: float  # 10th percentile
    p90_ms: float  # 90th percentile
    repeats: int  # number of timed calls
    device: str  # "cuda" (CUDA events) or "cpu" (perf_counter)
    times_ms: list[float] = field(default_factory=list, repr=False)  # every timed call, in order


def _summarise(times_ms: list[float], device: str) -> Timing:
    p10, p50, p90 = np.percentile(times_ms, [10, 50, 90])
    return Timing(float(p50), float(min(times_ms)), float(p10), float(p90), len(times_ms), device, list(times_ms))


def time_fn(fn: Callable[[], Any], *, warmup: int = 3, repeats: int | None = None, min_time_s: float = 0.1,
            max_repeats: int = 10_000, device: str | torch.device | None = None) -> Timing:
    """Time ``fn()`` (no arguments; wrap with a lambda).

    warmup: untimed calls first. repeats: timed calls; None picks enough to fill ``min_time_s``
    (at least 5, at most ``max_repeats``) from one synchronised trial call. device: "cuda" times with
    CUDA events, "cpu" with perf_counter; None means "cuda" if available, else "cpu".
    """
    if warmup < 0 or (repeats is not None and repeats < 1) or min_time_s < 0 or max_repeats < 1:
        raise ConfigError(f"time_fn: need warmup >= 0, repeats >= 1, min_time_s >= 0, max_repeats >= 1; "
                          f"got {warmup}, {repeats}, {min_time_s}, {max_repeats}")
    kind = resolve_device(device).type
    cuda = kind == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if repeats is None:
        t = time.perf_counter()
        fn()
        sync()
        once = time.perf_counter() - t
        repeats = int(min(max_repeats, max(5, math.ceil(min_time_s / max(once, 1e-9)))))
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(repeats)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            times = [start.elapsed_time(end) for start, end in events]
        else:
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return _summarise(times, kind)


def compare(fns: Mapping[str, Callable[[], Any]], *, baseline: str | None = None,
            items: float | Mapping[str, float] | None = None, flops: float | Mapping[str, float] | None = None,
            rounds: int = 1, **timing_kwargs):
    """Time every function in this one run and tabulate them (a pandas DataFrame, one row each).

    Columns: name, median_ms, min_ms, p10_ms, p90_ms, repeats, device; items_per_s if ``items``
    (work per call, e.g. tokens; a number or one per name); tflops if ``flops`` (per call, likewise);
    speedup = baseline median / this median (baseline: ``baseline`` or the first name; also in
    ``df.attrs["baseline"]``). rounds > 1 times the functions round-robin and pools the samples, so
    slow drift (clocks, heat) hits every variant alike. ``timing_kwargs`` go to :func:`time_fn`.
    """
    import pandas as pd

    if not fns:
        raise ConfigError("compare: no functions given")
    baseline = baseline if baseline is not None else next(iter(fns))
    if baseline not in fns:
        raise ConfigError(f"compare: baseline {baseline!r} is not one of {list(fns)}")
    if rounds < 1:
        raise ConfigError(f"compare: rounds must be >= 1, got {rounds}")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    kind = "cpu"
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time_fn(fn, **timing_kwargs)
            samples[name] += t.times_ms
            kind = t.device
    per = lambda v, name: v[name] if isinstance(v, Mapping) else v  # noqa: E731
    rows = []
    for name, times in samples.items():
        t = _summarise(times, kind)
        row = {"name": name, **{k: v for k, v in asdict(t).items() if k != "times_ms"}}
        if items is not None:
            row["items_per_s"] = per(items, name) / (t.median_ms / 1e3)
        if flops is not None:
            row["tflops"] = per(flops, name) / (t.median_ms / 1e3) / 1e12
        rows.append(row)
    df = pd.DataFrame(rows)
    df["speedup"] = df.loc[df["name"] == baseline, "median_ms"].iloc[0] / df["median_ms"]
    df.attrs["baseline"] = baseline
    return df
