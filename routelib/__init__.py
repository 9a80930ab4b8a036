"""routelib: the library behind the routelib notebooks.

Routing inside language models -- which MLP pathway, attention type or expert each token is sent
to, why, and what it costs. The numbered notebooks in ``notebooks/`` tell the story; this package
holds everything that is more than a call:

- :mod:`routelib.data`    offline corpora, tokenizers, benchmark prompts, pretrained models
- :mod:`routelib.routing` expert-routing collection from any transformers MoE model; validated traces
- :mod:`routelib.train`   the one training loop (AdamW, warm-up + cosine, checkpoints, resume, DDP)
- :mod:`routelib.bench`   timing that is right on CPU and GPU
- :mod:`routelib.config`  notebook parameters -> dataclass configs (unknown names rejected)
- :mod:`routelib.paths`   where the repository keeps data, runs and caches
"""

__version__ = "0.1.0"
