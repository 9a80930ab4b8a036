"""Notebook 06's control-and-content section: claim (d) of Ye, Yuan & Sharkey (2026, "Polysemantic
Experts, Monosemantic Paths: Routing as Control in MoEs", arXiv 2604.17837) on a model's traced domain
text -- the part of each router input inside the router's row space (control) carries function, the
rest (content) carries surface features.

:func:`load` draws whole sequences of every domain from a plain-text trace folder (the domain is the
first part of ``problem_id``), recomputes the router inputs of the model that routed them
(:func:`routelib.routing.predict.dataset.attach_hidden_states`) and reads its routers; :func:`run` measures
with :mod:`routelib.routing.analyse.control` under each definition of the control subspace
(:data:`DEFINITIONS`: the paper's row space of W, and that of the centred router) and returns tidy
tables -- ``probes`` (definition, layer, label, part, accuracy, chance), ``angles`` (definition, layer
pair, mean principal angle, random null), ``clusters`` (definition, layer, part, label, NMI excess over
the permutation null) -- or, when the model, its routers or the traces are not here, one line saying
why; :func:`verdicts` turns the tables into sentences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from routelib.errors import ConfigError
from routelib.routing.analyse import control as C
from routelib.routing.analyse.roles import role_labels

#: Probe and cluster labels, parts and definitions of control (:mod:`routelib.routing.analyse.control`).
PROBE_LABELS, CLUSTER_LABELS, CLUSTER_PARTS, DEFINITIONS = C.PROBE_LABELS, C.CLUSTER_LABELS, C.CLUSTER_PARTS, C.DEFINITIONS
#: Sentences from the tables of :func:`run`.
verdicts = C.verdicts


@dataclass
class ControlStudyConfig:
    model: str = "data/moe-subject-v3"  # the MoE that routed the traces (its routers and router inputs)
    trace_dir: str | None = "routing_data_collected/moe-subject-v3-text"  # plain-text traces (domain = first part of
    # problem_id); None: nothing to read, :func:`load` says so
    tokens_per_domain: int = 1024  # whole sequences drawn (seeded) per domain until this many tokens
    max_layers: int = 10  # probes and clusters at this many layers, evenly spread from the first to the last
    # (all of a model with fewer): subject v3's 30 layers would cost minutes each; angles use every layer
    held_out: float = 0.25  # share of each domain's sequences held out for the probes
    top_tokens: int = 50  # token identity: a K-way probe over the K most frequent train tokens (others left out)
    position_edges: tuple = (64, 128, 192)  # position buckets 0-63, 64-127, 128-191, 192+ (quarters of the
    # traces' 256-token windows: with a 75 % majority bucket a weak probe only ever predicts it)
    definitions: tuple = ("centred", "paper")  # control subspaces measured (DEFINITIONS), each from the same
    # data: "centred" = the row space of the centred router (E - 1; softmax and top-k ignore a shift common
    # to all logits, so the routing decision reads exactly that), "paper" = the row space of W itself (E)
    clusters: int = 0  # k of k-means; 0: the number of experts
    permutations: int = 20  # label shuffles of the clusters' size-matched null
    probe_steps: int = 30  # L-BFGS iterations per probe (accuracies move by < 0.01 from 30 to 100 on the subject)
    seed: int = 0  # sequence draw, split, k-means and nulls

    def __post_init__(self):
        if min(self.tokens_per_domain, self.top_tokens, self.permutations, self.max_layers) < 1 or self.clusters < 0:
            raise ConfigError(f"tokens_per_domain, top_tokens, permutations and max_layers must be >= 1 and clusters "
                              f">= 0, got {self.tokens_per_domain}, {self.top_tokens}, {self.permutations}, "
                              f"{self.max_layers}, {self.clusters}")
        C.position_buckets([0], self.position_edges)  # checks the edges
        if not self.definitions or set(self.definitions) - set(DEFINITIONS):
            raise ConfigError(f"definitions must name one or more of {list(DEFINITIONS)}, got {self.definitions}")

    @classmethod
    def from_study(cls, cfg, **overrides) -> "ControlStudyConfig":
        """The notebook's model, traces and seed (a :class:`~routelib.studies.router_weights.RouterStudyConfig`)."""
        return cls(**{"model": cfg.model, "trace_dir": cfg.control_traces, "seed": cfg.seed, **overrides})


def spread_layers(num_layers: int, count: int) -> list[int]:
    """``count`` layers evenly spread over 0..num_layers-1, the first and the last among them (all when
    ``count >= num_layers``)."""
    if count >= num_layers:
        return list(range(num_layers))
    return sorted({int(round(x)) for x in np.linspace(0, num_layers - 1, count)})


@dataclass
class ControlData:
    hidden: np.ndarray  # (N, L, H) float16: the router inputs
    routers: np.ndarray  # (L, E, H) float64: the routers
    experts: np.ndarray  # (N, L, k): traced top-k experts, first choice first
    token_id: np.ndarray  # (N,)
    role: np.ndarray  # (N,) roles.role_labels from the token's and the next token's text
    domain: np.ndarray  # (N,) first part of problem_id
    position: np.ndarray  # (N,)
    train: np.ndarray  # (N,) bool: train rows (whole sequences, a share held out per domain)
    agreement: float  # share of (token, layer) whose recomputed top-k equals the traced one


def _draw(frame: pd.DataFrame, cfg: ControlStudyConfig) -> pd.DataFrame:
    """Whole sequences of every domain, drawn in a seeded order until ``tokens_per_domain`` tokens."""
    rng = np.random.default_rng(cfg.seed)
    sizes = frame.groupby("problem_id", sort=True).size()
    domains = sizes.index.str.split("/").str[0]
    keep = []
    for domain in sorted(set(domains)):
        order = rng.permutation(sizes.index[domains == domain])
        count = np.cumsum(sizes[order].to_numpy())
        keep.extend(order[:int(np.searchsorted(count, cfg.tokens_per_domain)) + 1])
    return frame[frame["problem_id"].isin(keep)]


def load(cfg: ControlStudyConfig, model=None) -> tuple[ControlData | None, str | None]:
    """(the data, None), or (None, why not in one line) when the traces, the model that routed them or
    its router matrices are not here. model: the loaded model (saves loading ``cfg.model`` again)."""
    from routelib.routing.analyse.weights import UnsupportedMoEError, moe_weights
    from routelib.routing.predict.dataset import HiddenStatesUnavailable, RoutingData, attach_hidden_states
    from routelib.routing.record.traces import TraceError, load_traces, resolve_trace_dir

    if cfg.trace_dir is None:
        return None, "no plain-text traces to read (trace_dir, the notebook's control_traces, is None)"
    columns = ["dataset", "problem_id", "position", "phase", "token_id", "token_text", "experts", "weights"]
    try:
        frame = load_traces(resolve_trace_dir(cfg.trace_dir), columns=columns)
        manifest = frame.attrs["manifest"]
        frame = _draw(frame, cfg).sort_values(["problem_id", "position"], kind="stable").reset_index(drop=True)
        data = RoutingData.from_frame(frame, manifest)
        with C.one_thread():  # the section's budget is one core
            hidden = attach_hidden_states(data, model if model is not None else cfg.model, progress=False)
        routers = moe_weights(hidden.model).routers().double().numpy()
    except (TraceError, HiddenStatesUnavailable, UnsupportedMoEError) as err:
        return None, " ".join(str(err).split())
    if len(routers) < 2:
        return None, f"{cfg.model} has one MoE layer: the next layer's expert and the angles need two or more"
    text = frame["token_text"].astype(str)
    same = frame["problem_id"].shift(-1) == frame["problem_id"]
    following = text.shift(-1).where(same, "").tolist()
    domain = frame["problem_id"].str.split("/").str[0].to_numpy()
    train = C.sequence_split(frame["problem_id"].to_numpy(), cfg.held_out, cfg.seed, strata=domain)
    role = role_labels(text.tolist(), domain.tolist(), following)
    return ControlData(hidden.x, routers, data.experts, data.token_id, role, domain, data.position, train,
                       hidden.agreement), None


def run(cfg: ControlStudyConfig, model=None) -> tuple[dict[str, pd.DataFrame] | None, str]:
    """({"probes", "angles", "clusters"}, a one-line summary of the data), or (None, why not). Every table
    has a ``definition`` column (:data:`DEFINITIONS`): the router inputs are loaded once and measured
    under each definition of ``cfg.definitions``."""
    data, why = load(cfg, model)
    if data is None:
        return None, why
    tables = C.measure_layers(data.hidden, data.routers, data.experts, data.token_id, data.domain, data.position,
                              data.role, data.train, top_tokens=cfg.top_tokens, position_edges=cfg.position_edges,
                              definitions=cfg.definitions, clusters=cfg.clusters, permutations=cfg.permutations,
                              probe_steps=cfg.probe_steps, seed=cfg.seed,
                              layers=spread_layers(len(data.routers), cfg.max_layers))
    held = int((~data.train).sum())
    domains = ", ".join(f"{d} {n:,}" for d, n in zip(*np.unique(data.domain, return_counts=True)))
    summary = (f"{len(data.train):,} tokens ({domains}), {len(data.train) - held:,} train / {held:,} held out by "
               f"sequence; recomputed routing agrees with the traces on {data.agreement:.1%} of (token, layer)")
    return tables, summary
