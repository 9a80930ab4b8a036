"""Expert routing of MoE language models: collection and trace storage.

==========================  ==================================================================
:mod:`.collect`             :func:`collect` -- generate from prompts with any transformers MoE
                            causal LM and record every token's top-k experts and gate weights at
                            every MoE layer (hooks on the routers, KV cache on, left padding,
                            resumable shards); ``python -m routelib.routing.collect``
:mod:`.traces`              the trace format (Parquet shards + ``manifest.json``),
                            :func:`load_traces` (validated), :func:`trace_arrays` ((N, L, k) arrays)
:mod:`.analysis`            layer-to-layer predictability (uncertainty coefficient, lookup vs
                            prior accuracy), hop curves, paths, dataset usage tests (notebook 04)
:mod:`.dashboard`           the token-journey dashboard (ipywidgets) and its HTML views
:mod:`.study`               notebook 04's config and the live-collection agreement check
==========================  ==================================================================

``routelib.routing.collect`` is the module (and the command); the function is
``routelib.routing.collect.collect``.

Example::

    from routelib.routing.collect import collect
    from routelib.routing import load_traces, trace_arrays
    collect(model, tokenizer, {"p0": "def add(a, b):"}, "runs/traces", dataset="mine", max_new_tokens=32)
    df = load_traces("runs/traces")                       # one row per token
    experts, weights, _ = trace_arrays(df)               # (N, L, k) each
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "find_routers": "collect", "measure_overhead": "collect",
    "benchmark_prompts": "collect", "load_model": "collect", "NoMoELayersError": "collect",
    "RoutingRecorder": "collect", "topk_from_logits": "collect",
    "load_traces": "traces", "trace_arrays": "traces", "read_manifest": "traces", "TraceArrays": "traces",
    "TraceError": "traces",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"routelib.routing.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'routelib.routing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
