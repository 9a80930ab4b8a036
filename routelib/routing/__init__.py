"""Expert routing of MoE language models: a library, reusable without any notebook (the notebooks'
pipelines are in :mod:`routelib.studies`, their dashboards in :mod:`routelib.views`).

==========================  ==================================================================
:mod:`.collect`             :func:`collect` -- generate from prompts with any transformers MoE
                            causal LM and record every token's top-k experts and gate weights at
                            every MoE layer (hooks on the routers, KV cache on, left padding,
                            resumable shards); ``python -m routelib.routing.collect``
:mod:`.traces`              the trace format (Parquet shards + ``manifest.json``),
                            :func:`load_traces` (validated), :func:`trace_arrays` ((N, L, k) arrays)
:mod:`.columns`             :func:`open_columns` -- large traces as memory-mapped numpy columns
                            (Arrow -> numpy, validated, cached); ``load_routing(..., memory_map=True)``
:mod:`.convert`             importers: JSON-lines routing records and vLLM request outputs -> traces;
                            ``python -m routelib.routing.convert {jsonl,vllm}``
:mod:`.vllm_backend`        ``collect --backend vllm``: vLLM's routed experts (GPU builds), imported
:mod:`.analysis`            layer-to-layer predictability (uncertainty coefficient, lookup vs
                            prior accuracy), hop curves, paths, dataset usage tests
:mod:`.locality`            routing across consecutive tokens (the Mixtral paper's §5): top-1
                            repetition and top-k overlap per layer, phase, distance, vs chance
:mod:`.routing_data`        traces as prediction data (journeys, gate vectors, hidden states)
:mod:`.expert_metrics`      top-1, top-2 hit, set recall, exact set; chance values
:mod:`.splits`              leak-free splits: by problem, across datasets (and by token, to compare)
:mod:`.predictors`          next-layer expert predictors (prior, lookup, n-gram, previous token,
                            history, MLP, hidden-state router/probe), :func:`evaluate`;
                            ``python -m routelib.routing.predictors <trace_dir>``
:mod:`.prefetch`            their cost: latency against one MoE layer, expert-cache hit rates
:mod:`.bench_prefetch`      benchmark: predictor cost against one Mixtral-8x7B layer (README table)
:mod:`.bench_traces`        benchmark: 10 M-token OLMoE-layout traces loaded and predictors trained
:mod:`.weights`             router and expert weights of any supported MoE
:mod:`.geometry`            router similarity, subspaces, co-activation, saturation over training
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

from routelib.lazy import lazy_exports

_EXPORTS = {
    "find_routers": "collect", "measure_overhead": "collect",
    "benchmark_prompts": "collect", "load_model": "collect", "NoMoELayersError": "collect",
    "RoutingRecorder": "collect", "topk_from_logits": "collect",
    "load_traces": "traces", "trace_arrays": "traces", "read_manifest": "traces", "TraceArrays": "traces",
    "TraceError": "traces", "split_router_output": "collect", "open_columns": "columns", "TraceColumns": "columns",
    "import_jsonl": "convert", "import_vllm": "convert", "ConvertError": "convert",
    **{name: "predictors" for name in (
        "load_routing", "RoutingData", "EvalConfig", "evaluate", "summarize", "seed_table", "metric_table",
        "make_splits", "make_predictor", "PREDICTORS", "routing_metrics", "chance_metrics", "attach_hidden_states",
        "MLPPredictor", "PredictorError", "HiddenStatesUnavailable")},
    "consecutive_routing": "locality", "previous_rows": "locality",
    **{name: "prefetch" for name in ("prefetch_curves", "predictor_latency", "moe_layer_latency", "latency_table")},
    **{name: "weights" for name in ("moe_weights", "MoEWeights", "MoELayer", "UnsupportedMoEError", "hf_from_checkpoint")},
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
