"""Expert routing of MoE language models: a library, reusable without any notebook (the notebooks'
pipelines and views are in :mod:`routelib.studies`). Three wings:

==========================  ==================================================================
:mod:`.record`              find and read any model's routers, collect traces while it generates
                            (``python -m routelib.routing.record.collect``), the trace format,
                            importers (``python -m routelib.routing.record.convert``), the vLLM
                            backend, the supported-architecture table
:mod:`.analyse`             layer-to-layer predictability, locality across tokens, repetition,
                            router and expert weights, their geometry, training snapshots
:mod:`.predict`             next-layer expert prediction: dataset, leak-free splits, metrics,
                            predictors, evaluation (``python -m routelib.routing.predict <trace_dir>``),
                            prefetch cost and cache hit rates, benchmarks
==========================  ==================================================================

The names below are importable from here, each module imported on first use.

Example::

    from routelib.routing.record.collect import collect
    from routelib.routing import load_traces, trace_arrays
    collect(model, tokenizer, {"p0": "def add(a, b):"}, "runs/traces", dataset="mine", max_new_tokens=32)
    df = load_traces("runs/traces")                       # one row per token
    experts, weights, _ = trace_arrays(df)               # (N, L, k) each
"""

from __future__ import annotations

from routelib.lazy import lazy_exports

_EXPORTS = {
    **{name: "record.routers" for name in ("find_routers", "load_model", "NoMoELayersError", "RoutingRecorder",
                                           "topk_from_logits", "split_router_output")},
    "measure_overhead": "record.collect", "benchmark_prompts": "record.collect",
    "load_traces": "record.traces", "trace_arrays": "record.traces", "read_manifest": "record.traces",
    "TraceArrays": "record.traces", "TraceError": "record.traces", "trace_info": "record.traces",
    "TraceInfo": "record.traces", "companion_problem": "record.traces",
    "open_columns": "record.columns", "TraceColumns": "record.columns",
    "import_jsonl": "record.convert", "import_vllm": "record.convert", "ConvertError": "record.convert",
    "consecutive_routing": "analyse.locality", "previous_rows": "analyse.locality",
    **{name: "analyse.weights" for name in ("moe_weights", "MoEWeights", "MoELayer", "UnsupportedMoEError",
                                            "hf_from_checkpoint")},
    **{name: "predict.dataset" for name in ("load_routing", "RoutingData", "attach_hidden_states", "PredictorError",
                                            "HiddenStatesUnavailable")},
    **{name: "predict.evaluation" for name in ("EvalConfig", "evaluate", "summarize", "seed_table", "metric_table",
                                             "make_predictor")},
    "make_splits": "predict.splits", "PREDICTORS": "predict.predictors", "MLPPredictor": "predict.predictors",
    "routing_metrics": "predict.metrics", "chance_metrics": "predict.metrics",
    **{name: "predict.prefetch" for name in ("prefetch_curves", "predictor_latency", "moe_layer_latency", "latency_table")},
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
