"""Recording routing: find and read any MoE model's routers, collect traces while it generates, the
trace format, and traces from other tools.

==========================  ==================================================================
:mod:`.routers`             :func:`find_routers`, :class:`RoutingRecorder`, :func:`split_router_output`,
                            :func:`model_info`, :func:`load_model`: reading any model's routers
:mod:`.collect`             :func:`collect`: generate from prompts and record every token's top-k
                            experts at every MoE layer (resumable shards);
                            ``python -m routelib.routing.record.collect``
:mod:`.shards`              collection split over processes (``collect --shard i/n``) merged into one
                            folder: ``python -m routelib.routing.record.shards <out>``
:mod:`.traces`              the trace format (Parquet shards + ``manifest.json``),
                            :func:`load_traces` (validated), :func:`trace_arrays` ((N, L, k) arrays)
:mod:`.columns`             :func:`open_columns`: large traces as memory-mapped numpy columns
:mod:`.convert`             importers: JSON-lines routing records and vLLM outputs -> traces;
                            ``python -m routelib.routing.record.convert {jsonl,vllm}``
:mod:`.vllm`                ``collect --backend vllm``: vLLM's routed experts (GPU builds)
:mod:`.olmoe_analysis`      a safe reader of the OLMoE paper's published routing aggregates
                            (OLMoE-1B-7B, Mixtral-8x7B; pickles read by a restricted unpickler)
:mod:`.architectures`       the supported-architecture table: every transformers MoE checked against
                            what its experts receive; ``python -m routelib.routing.record.architectures``
==========================  ==================================================================
"""
