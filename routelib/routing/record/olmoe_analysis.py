"""A safe reader for the routing aggregates of the OLMoE paper's routing analysis.

The OLMoE authors (Muennighoff et al. 2024, "OLMoE: Open Mixture-of-Experts Language Models") published
the expert-usage counts behind their domain- and vocabulary-specialization analysis in the public
repository allenai/OLMoE (``scripts/routing_output/``, Apache-2.0): for OLMoE-1B-7B (64 experts, top-8)
and Mixtral-8x7B (8 experts, top-2; folder ``mistral``), layers 0, 7 and 15, five text domains (arxiv,
book, c4, github, wikipedia; 208,896 teacher-forced tokens each):

==================================  ==========================================================================
``expert_counts/<domain>.pkl``      per layer: expert -> count, every one of the k choices counted
``expert_counts_top1/``             the same, first choice only
``expert_counts_crosslayer_top1/``  first-choice transitions 0 -> 7 and 7 -> 15: (expert_i, expert_j) -> count
``expert_counts_crosslayer/``       rank-aligned top-k pairs (the k-th choice with the k-th), not k x k
``eid2token/<domain>.pkl``          per layer: expert -> (token id -> count), the model's own tokenizer
==================================  ==========================================================================

They are Python pickles, and unpickling can run code. :class:`SafeUnpickler` allows exactly what these
files hold -- ``collections.Counter``, ``collections.defaultdict``, numpy integer scalars and dtypes --
and refuses anything else with one line naming the file and the refused object. The readers return
tidy frames. The data is not part of this repository (its license allows it, our rule is not to copy
third-party data): put the ``routing_output`` folder anywhere and pass it, or set
``ROUTELIB_OLMOE_ROUTING`` to it.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from routelib.errors import RoutelibError

ENV = "ROUTELIB_OLMOE_ROUTING"  # where a user keeps the routing_output folder
SOURCE = "allenai/OLMoE routing analysis (Apache-2.0)"  # the citation for figures derived from the data
WHERE = ("the routing_output folder of the public repository allenai/OLMoE (scripts/routing_output, "
         f"Apache-2.0): clone it and pass the folder, or set {ENV} to it")
MODELS = {"olmoe": dict(name="OLMoE-1B-7B", experts=64, top_k=8, layers=16),
          "olmoe-sft": dict(name="OLMoE-1B-7B-SFT", experts=64, top_k=8, layers=16),
          "olmoe-dpo": dict(name="OLMoE-1B-7B-Instruct (DPO)", experts=64, top_k=8, layers=16),
          "mistral": dict(name="Mixtral-8x7B", experts=8, top_k=2, layers=32)}
DOMAINS = ("arxiv", "book", "c4", "github", "wikipedia")
LAYERS = (0, 7, 15)  # the layers the analysis kept (of both models)
KINDS = ("expert_counts", "expert_counts_top1", "expert_counts_crosslayer", "expert_counts_crosslayer_top1",
         "eid2token")
_ALLOWED = {("collections", "Counter"): collections.Counter, ("collections", "defaultdict"): collections.defaultdict,
            ("numpy", "dtype"): np.dtype}
_SCALAR_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")


class UnsafePickleError(RoutelibError, ValueError):
    """A pickle asks for an object outside what the routing-analysis files hold (it could run code)."""


class AnalysisDataMissing(RoutelibError, FileNotFoundError):
    """The routing_output folder (or one of its files) is not on this machine."""


def _scalar(dtype, data):
    """numpy's scalar reconstructor, for integer dtypes only."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        raise UnsafePickleError(f"numpy scalar of dtype {dtype}: only integers are expected")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds only Counters, defaultdicts, numpy integer scalars and dtypes, and the
    plain types pickle needs no import for (int, str, tuple, list, dict)."""

    def __init__(self, file, name: str):
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in _SCALAR_MODULES and name == "scalar":
            return _scalar
        if module == "builtins" and name == "int":
            return int
        raise UnsafePickleError(f"{self.name}: refuses {module}.{name} (a routing-analysis file holds only "
                                "Counters of numpy integers; this one could run code)")


def safe_load(path: str | os.PathLike):
    """The object pickled in ``path``, built by :class:`SafeUnpickler`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AnalysisDataMissing(f"{path}: not found; the data is {WHERE}") from None
    try:
        return SafeUnpickler(io.BytesIO(data), str(path)).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # truncated or not a pickle
        raise UnsafePickleError(f"{path}: not a readable routing-analysis pickle ({type(err).__name__}: {err})") from None


def find_root(root: str | os.PathLike | None = None) -> Path:
    """The routing_output folder: ``root``, else ``$ROUTELIB_OLMOE_ROUTING``; it must hold the model folders."""
    chosen = root if root is not None else os.environ.get(ENV)
    if not chosen:
        raise AnalysisDataMissing(f"no routing_output folder given; the data is {WHERE}")
    path = Path(chosen)
    if (path / "routing_output").is_dir():
        path = path / "routing_output"
    if not any((path / m).is_dir() for m in MODELS):
        raise AnalysisDataMissing(f"{path}: holds none of the model folders {', '.join(MODELS)}; the data is {WHERE}")
    return path


def _file(root: Path, model: str, kind: str, domain: str) -> Path:
    if model not in MODELS:
        raise RoutelibError(f"model {model!r}: choose from {', '.join(MODELS)}")
    if kind not in KINDS:
        raise RoutelibError(f"kind {kind!r}: choose from {', '.join(KINDS)}")
    return root / model / kind / f"{domain}.pkl"


def expert_counts(root, model: str, domain: str, top1: bool = False) -> pd.DataFrame:
    """Columns layer, expert, count (layers 0, 7, 15; every choice counted, or the first only)."""
    counters = safe_load(_file(find_root(root), model, "expert_counts_top1" if top1 else "expert_counts", domain))
    rows = [(layer, int(e), int(c)) for layer, counter in zip(LAYERS, counters) for e, c in counter.items()]
    return pd.DataFrame(rows, columns=["layer", "expert", "count"]).sort_values(["layer", "expert"], ignore_index=True)


def transitions_top1(root, model: str, domain: str) -> pd.DataFrame:
    """First-choice transitions: columns from_layer, to_layer, from_expert, to_expert, count (0 -> 7, 7 -> 15)."""
    counters = safe_load(_file(find_root(root), model, "expert_counts_crosslayer_top1", domain))
    rows = [(a, b, int(i), int(j), int(c)) for (a, b), counter in zip(zip(LAYERS, LAYERS[1:]), counters)
            for (i, j), c in counter.items()]
    return pd.DataFrame(rows, columns=["from_layer", "to_layer", "from_expert", "to_expert", "count"])


def expert_tokens(root, model: str, domain: str) -> pd.DataFrame:
    """Columns layer, expert, token_id, count: which token ids each expert was chosen for."""
    per_layer = safe_load(_file(find_root(root), model, "eid2token", domain))
    rows = [(layer, int(e), int(t), int(c)) for layer, experts in zip(LAYERS, per_layer)
            for e, tokens in experts.items() for t, c in tokens.items()]
    return pd.DataFrame(rows, columns=["layer", "expert", "token_id", "count"])


def available(root=None) -> pd.DataFrame:
    """Which (model, kind, domain) files the folder holds: columns model, kind, domain, path."""
    base = find_root(root)
    rows = [(m, k, p.stem, str(p)) for m in MODELS for k in KINDS for p in sorted((base / m / k).glob("*.pkl"))]
    return pd.DataFrame(rows, columns=["model", "kind", "domain", "path"])
