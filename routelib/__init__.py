"""routelib: the library behind the routelib notebooks.

Routing inside language models -- which MLP pathway, attention type or expert each token is sent
to, why, and what it costs. The numbered notebooks in ``notebooks/`` tell the story; this package
holds everything that is more than a call, in two layers:

notebook level (one folder per notebook; nothing below imports them)
- :mod:`routelib.studies`   each notebook's study: config dataclass and pipeline (``__init__``), its
                            reference run (``reference``), figures and dashboards (``views``), GPU
                            steps (``gpu``)
- :mod:`routelib.notebooks` the papermill runner (``python -m routelib.notebooks run|refresh``)
- :mod:`routelib.gpu`       the GPU plan: the runner and the ordered list of every study's steps

libraries
- :mod:`routelib.models`     pathway MLP + router, Gated DeltaNet, attention routing, MoE FFN/LM
- :mod:`routelib.data`       offline corpora, tokenizers, benchmark prompts, pretrained models
- :mod:`routelib.routing`    expert routing in three wings: ``record`` (any model's routers,
                             collection, trace format, importers), ``analyse`` (predictability,
                             locality, weights, geometry, snapshots), ``predict`` (next-expert
                             predictors, evaluation, prefetch)
- :mod:`routelib.train`      the one training loop (AdamW, warm-up + cosine, checkpoints, resume, DDP)
- :mod:`routelib.evaluation` held-out batches, perplexity per domain, throughput
- :mod:`routelib.metrics`    pathway purity, utilisation, load balance
- :mod:`routelib.bench`      timing that is right on CPU and GPU; :mod:`routelib.moe_bench` the
                             Mixtral-shape MoE kernel benchmark
- :mod:`routelib.reference`  the skeleton every study's reference run shares (manifest, invocations,
                             parts side by side, the command line, intervals)
- :mod:`routelib.plots`      figures several notebooks share (training curves, perplexity bars)
- :mod:`routelib.io`         the one atomic-write helper and ``sha256_file``
- :mod:`routelib.device`     the one ``"auto"`` -> cuda/cpu rule
- :mod:`routelib.config`, :mod:`routelib.paths`, :mod:`routelib.progress`, :mod:`routelib.errors`,
  :mod:`routelib.lazy`, :mod:`routelib.cli`  small shared helpers
"""

__version__ = "0.1.0"
