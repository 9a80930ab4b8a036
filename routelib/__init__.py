"""routelib: the library behind the routelib notebooks.

Routing inside language models -- which MLP pathway, attention type or expert each token is sent
to, why, and what it costs. The numbered notebooks in ``notebooks/`` tell the story; this package
holds everything that is more than a call, in two layers:

notebook level (one module per notebook; nothing below imports them)
- :mod:`routelib.studies`  each notebook's config dataclass and pipeline
- :mod:`routelib.views`    each notebook's figures and dashboards
- :mod:`routelib.notebooks` the papermill runner (``python -m routelib.notebooks run|refresh``)

libraries
- :mod:`routelib.models`     pathway MLP + router, Gated DeltaNet, attention routing, MoE FFN/LM
- :mod:`routelib.data`       offline corpora, tokenizers, benchmark prompts, pretrained models
- :mod:`routelib.routing`    expert-routing collection from any transformers MoE model, traces,
                             analysis, next-expert predictors, router/expert weights and geometry
- :mod:`routelib.train`      the one training loop (AdamW, warm-up + cosine, checkpoints, resume, DDP)
- :mod:`routelib.evaluation` held-out batches, perplexity per domain, throughput
- :mod:`routelib.metrics`    pathway purity, utilisation, load balance
- :mod:`routelib.bench`      timing that is right on CPU and GPU; :mod:`routelib.moe_bench` the
                             Mixtral-shape MoE kernel benchmark
- :mod:`routelib.config`, :mod:`routelib.paths`, :mod:`routelib.io`, :mod:`routelib.progress`,
  :mod:`routelib.errors`, :mod:`routelib.lazy`  small shared helpers
"""

__version__ = "0.1.0"
