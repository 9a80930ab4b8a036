"""Notebook 06's parameters and pipeline: a MoE model's router/expert geometry and routing on
domain text, and the evolution of its routing over training from the training snapshots shipped
beside it (``routelib.routing.analyse.snapshots``; the subject's are made by its training command).

The notebook runs on any model whose MoE type the weight reader serves
(:mod:`routelib.routing.analyse.weights`): :func:`router_matrices` and :func:`training_snapshots`
return what the model and its folder have, or say in one line why a section cannot run (a router
that is no single matrix; no snapshots, or another model's).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from routelib import paths
from routelib.errors import ConfigError
from routelib.routing.analyse import geometry as G
from routelib.routing.analyse.snapshots import SnapshotError
from routelib.routing.analyse.weights import UnsupportedMoEError


@dataclass
class RouterStudyConfig:
    model: str = "data/moe-subject-v3"  # transformers MoE to study (a local folder or a hub name)
    snapshots: str | None = "data/moe-subject-v3/training_snapshots.npz"  # its training snapshots
    # (routelib.routing.analyse.snapshots); None, a missing file or another model's: section 5 is skipped
    subspace_rank: int = 16  # r: dimensions of each expert's input subspace in the alignment test
    seq_len: int = 128  # tokens per held-out window routed for co-activation and load balance
    windows_per_domain: int = 8  # held-out windows per domain (validation split)
    tokenizer: str = "model"  # tokenizer of the held-out windows: "model" = the studied model's own; or any load_tokenizer name
    control_traces: str | None = "routing_data_collected/moe-subject-v3-text"  # plain-text traces routed by `model`,
    # for section 6 (routelib.studies.router_weights.control); None skips it
    seed: int = 0  # random baselines
    compare_snapshots: str | None = "data/moe-subject/training_snapshots.npz"  # another model's training snapshots
    # whose saturation section 5 draws beside (subject v2: 6 layers trained from scratch); None leaves it out

    def __post_init__(self):
        for name in ("subspace_rank", "seq_len", "windows_per_domain"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def eval_windows(self) -> int:
        """``windows_per_domain`` under the name ``routelib.evaluation.domain_eval_data`` reads."""
        return self.windows_per_domain


def _model_source(cfg: RouterStudyConfig) -> str:
    """``cfg.model`` as a local folder when it names one (:func:`routelib.subject.build.model_folder`: a model
    folder, or subject v3's delta folder, built on first use), else the Hub id."""
    from routelib.subject.build import model_folder

    folder = model_folder(cfg.model)
    return str(folder) if folder is not None else cfg.model


def load_subject(cfg: RouterStudyConfig):
    """The studied transformers MoE (eval mode) from ``cfg.model`` (relative paths: from the repo root)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_model_source(cfg)).eval()


def window_tokenizer(cfg: RouterStudyConfig):
    """The tokenizer of the held-out windows: the studied model's own for ``tokenizer="model"`` (so an
    OLMoE or Mixtral reads its own token ids, not the subject's BPE), else ``load_tokenizer(cfg.tokenizer)``."""
    from routelib.data.tokenizer import load_tokenizer

    if cfg.tokenizer != "model":
        return load_tokenizer(cfg.tokenizer)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(_model_source(cfg))
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer='model': no tokenizer could be loaded from {cfg.model!r} ({err}); "
                          "name one with tokenizer=...") from err


def domain_routing(model, cfg: RouterStudyConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Route held-out windows of every corpus domain through ``model``: experts (N, L, k), router
    log-probabilities (N, L, E) and the domain of each token (N,). The windows are tokenised with
    :func:`window_tokenizer`; a token id outside the model's vocabulary is an error, not a silent
    lookup of some other embedding."""
    from routelib.evaluation import domain_eval_data

    data = domain_eval_data(dataclasses.replace(cfg, tokenizer=window_tokenizer(cfg)))
    vocab = model.get_input_embeddings().num_embeddings
    top = max(int(x.max()) for batches in data.values() for x, _ in batches)
    if top >= vocab:
        raise ConfigError(f"tokenizer {cfg.tokenizer!r} produces token id {top}, but {cfg.model!r} has "
                          f"{vocab} embeddings: the windows must use the model's own tokenizer (tokenizer='model')")
    experts, logprobs, domains = [], [], []
    for domain, batches in data.items():
        ex, lp = G.route_batches(model, batches)
        experts.append(ex)
        logprobs.append(lp)
        domains += [domain] * len(ex)
    return np.concatenate(experts), np.concatenate(logprobs), np.asarray(domains)


def load_training_snapshots(cfg: RouterStudyConfig):
    """The model's training snapshots (``cfg.snapshots``, relative paths from the repo root)."""
    from routelib.routing.analyse.snapshots import load_snapshots

    if cfg.snapshots is None:
        raise ConfigError("snapshots is None: no training snapshots to load")
    return load_snapshots(paths.in_repo(cfg.snapshots))


def router_matrices(weights):
    """(the routers (L, E, H), None), or (None, why not in one line) for a model whose routers are not
    one linear map each (a router MLP): then only its experts are read."""
    try:
        return weights.routers(), None
    except UnsupportedMoEError as err:
        return None, str(err)


def training_snapshots(cfg: RouterStudyConfig, weights):
    """(the snapshots, None) of ``cfg.snapshots`` when they are this model's (the same number of MoE
    layers, experts and hidden size as ``weights``), else (None, why not in one line, with how to
    make them)."""
    make = ("make them from the model's checkpoints with routelib.routing.analyse.snapshots.collect_snapshots "
            "and pass snapshots=<file>")
    snaps, missing = _read_snapshots("snapshots", cfg.snapshots, f" ({make})")
    if snaps is None:
        return None, missing
    path = paths.in_repo(cfg.snapshots)
    have = tuple(snaps.routers.shape[1:])
    want = (len(weights.layers), weights.num_experts, weights.hidden_size)
    if have != want:
        return None, (f"{path} holds the snapshots of another model (routers of {have[0]} layers x {have[1]} experts x "
                      f"{have[2]} hidden, {cfg.model} has {want[0]} x {want[1]} x {want[2]}); {make}")
    return snaps, None


def evolution(snaps) -> dict[str, pd.DataFrame]:
    """Routing over training from training snapshots (every step routes the same held-out tokens):
    ``saturation`` (OLMoE, Muennighoff et al. 2024: share of the final top-k already chosen),
    ``drift`` (router cosine to the final step, relative change since the previous one),
    ``specialisation`` (U(domain | top-1 expert)) and ``balance`` (load CV), each per step and layer."""
    experts = snaps.experts_by_step()
    special = [G.domain_predictability(ex, snaps.domains, snaps.num_experts).assign(step=step) for step, ex in experts.items()]
    balance = [G.load_balance(ex, snaps.num_experts).assign(step=step) for step, ex in experts.items()]
    return {"saturation": G.saturation(experts), "drift": G.router_drift(snaps.routers_by_step()),
            "specialisation": pd.concat(special, ignore_index=True), "balance": pd.concat(balance, ignore_index=True)}


def saturation_by_fraction(saturation: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per model (``saturation``: name -> :func:`evolution`'s saturation table) and snapshot: the share of
    training done (step / last step) and the saturation's mean, min and max over layers -- runs of
    different lengths and depths on one axis."""
    rows = []
    for name, table in saturation.items():
        stats = table.groupby("step")["saturation"].agg(["mean", "min", "max"]).reset_index()
        stats.insert(0, "model", name)
        stats.insert(2, "fraction", stats["step"] / stats["step"].max())
        rows.append(stats)
    return pd.concat(rows, ignore_index=True)


def compare_saturation(cfg: RouterStudyConfig) -> tuple[pd.DataFrame | None, str | None]:
    """(the saturation of ``cfg.compare_snapshots``, None), or (None, why not in one line)."""
    snaps, missing = _read_snapshots("compare_snapshots", cfg.compare_snapshots)
    return (None, missing) if snaps is None else (G.saturation(snaps.experts_by_step()), None)


def _read_snapshots(name: str, value: str | None, hint: str = ""):
    """(the training snapshots at ``value``, None), or (None, why not in one line; ``hint`` appended):
    ``name`` is the parameter that gave ``value``."""
    from routelib.routing.analyse.snapshots import load_snapshots

    if value is None:
        return None, f"{name} is None{hint}"
    path = paths.in_repo(value)
    if not path.is_file():
        return None, f"no training snapshots at {path}{hint}"
    try:
        return load_snapshots(path), None
    except SnapshotError as err:
        return None, str(err)


def save_tables(tables: dict[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Write each table as CSV under ``out_dir`` (relative: from the repo root); returns the files."""
    out = paths.in_repo(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in tables.items():
        path = out / f"{name}.csv"
        table.to_csv(path, index=not isinstance(table.index, pd.RangeIndex))
        written.append(path)
    return written


