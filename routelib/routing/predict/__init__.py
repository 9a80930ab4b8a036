"""Next-layer expert prediction (notebook 05): a token has been routed through MoE layers 0..l; rank
the experts of layer l + h before that layer runs, so that their weights can be fetched in time.

==========================  ==================================================================
:mod:`.dataset`             traces as prediction data: :class:`RoutingData`, :func:`load_routing`,
                            (layer, hop) pairs, journeys, :func:`attach_hidden_states`
:mod:`.splits`              leak-free splits: by problem, across datasets (and by token, to compare)
:mod:`.metrics`             top-1, top-2 hit, set recall, exact set; their chance levels
:mod:`.predictors`          the predictors (prior, lookup, n-gram, previous token, history, MLP,
                            hidden-state router and probe)
:mod:`.pre_attention`       the probe on the residual stream before a layer's attention
:mod:`.evaluation`          :class:`EvalConfig`, :func:`evaluate` over splits, the tables, the command
                            line: ``python -m routelib.routing.predict <trace_dir>``
:mod:`.prefetch`            what a prediction costs against one MoE layer; expert-cache hit rates
:mod:`.bench_cost`          benchmark: predictor cost against one Mixtral-8x7B layer
:mod:`.bench_scale`         benchmark: 10 M-token OLMoE-layout traces loaded and predictors trained
==========================  ==================================================================

Every public name of the first six modules is importable from here (``from routelib.routing import
predict as P; P.evaluate(...)``), each imported on first use.
"""

from __future__ import annotations

from routelib.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(('PredictorError', 'HiddenStatesUnavailable', 'HiddenStates', 'RoutingData', 'load_routing', 'repetition_table', 'gate_vectors', 'sequences', 'check_pair', 'layer_pairs', 'row_keys', 'journeys', 'attach_hidden_states', 'need_pre_attention', 'decoder_blocks',), "dataset"),
    **dict.fromkeys(('SPLITS', 'SUBSETS', 'Split', 'check_no_leak', 'held_out_problems', 'describe_split', 'make_splits', 'journey_overlap', 'subset_masks',), "splits"),
    **dict.fromkeys(('METRICS', 'rank_experts', 'routing_metrics_per_token', 'routing_metrics', 'chance_metrics',), "metrics"),
    **dict.fromkeys(('PREDICTORS', 'HIDDEN_PREDICTORS', 'PRE_ATTENTION_PREDICTORS', 'Predictor', 'RandomPredictor', 'PriorPredictor', 'SameExpertPredictor', 'CHUNK_ROWS', 'target_gates', 'NGramPredictor', 'LookupPredictor', 'known_previous', 'PrevTokenPredictor', 'HistoryPredictor', 'MLPConfig', 'RoutingHistoryMLP', 'history_features', 'soft_cross_entropy', 'MLPPredictor', 'HistoryMLPPredictor', 'HiddenRouterPredictor', 'ProbeConfig', 'LinearProbes', 'HiddenProbePredictor',), "predictors"),
    **dict.fromkeys(('PreAttentionProbePredictor', 'rms_normalise',), "pre_attention"),
    **dict.fromkeys(('SEED_CLAIMS', 'EvalConfig', 'make_predictor', 'SplitResult', 'mlp_dir', 'run_split', 'evaluate', 'summarize', 'metric_table', 'seed_table',), "evaluation"),
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
