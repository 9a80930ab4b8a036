"""Notebook 06's control-and-content section: claim (d) of Ye, Yuan & Sharkey (2026, "Polysemantic
Experts, Monosemantic Paths: Routing as Control in MoEs", arXiv 2604.17837) on a model's traced domain
text -- the part of each router input inside the router's row space (control) carries function, the
rest (content) carries surface features.

:func:`load` draws whole sequences of every domain from a plain-text trace folder (the domain is the
first part of ``problem_id``), recomputes the router inputs of the model that routed them
(:func:`routelib.routing.predict.dataset.attach_hidden_states`) and reads its routers; :func:`run` measures
with :mod:`routelib.routing.analyse.control` and returns tidy tables -- ``probes`` (layer, label, part,
accuracy, chance), ``angles`` (layer pair, mean principal angle, random null), ``clusters`` (layer,
part, label, NMI excess over the permutation null) -- or, when the model, its routers or the traces
are not here, one line saying why; :func:`verdicts` turns the tables into sentences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from routelib.errors import ConfigError
from routelib.routing.analyse import control as C
from routelib.routing.analyse.roles import role_labels

#: Probe labels: surface (token, position), source (domain), function (this layer's and the next
#: layer's first-choice expert; the first is decoded from control by construction: a check of the split).
PROBE_LABELS = ("token", "position", "domain", "expert", "next_expert")
#: Cluster labels: the token id (all tokens), the domain, the role (roles.role_labels: register and the
#: class of the next token, for every token) and the next layer's first-choice expert.
CLUSTER_LABELS = ("token", "domain", "role", "next_expert")
#: Features clustered: the control part, the content part and the whole router input.
CLUSTER_PARTS = ("control", "content", "full")


@dataclass
class ControlStudyConfig:
    model: str = "data/moe-subject"  # the MoE that routed the traces (its routers and router inputs)
    trace_dir: str = "routing_data_collected/moe-subject-text"  # plain-text traces (domain = first part of problem_id)
    tokens_per_domain: int = 2048  # whole sequences drawn (seeded) per domain until this many tokens
    held_out: float = 0.25  # share of each domain's sequences held out for the probes
    top_tokens: int = 50  # token identity: a K-way probe over the K most frequent train tokens (others left out)
    position_edges: tuple = (64, 128, 192)  # position buckets 0-63, 64-127, 128-191, 192+ (quarters of the
    # traces' 256-token windows: with a 75 % majority bucket a weak probe only ever predicts it)
    centre: bool = True  # control = the row space of the centred router (the routing decision reads exactly
    # that: softmax and top-k ignore a shift common to all logits); False: the row space of W itself
    clusters: int = 0  # k of k-means; 0: the number of experts
    permutations: int = 20  # label shuffles of the clusters' size-matched null
    probe_steps: int = 30  # L-BFGS iterations per probe (accuracies move by < 0.01 from 30 to 100 on the subject)
    seed: int = 0  # sequence draw, split, k-means and nulls

    def __post_init__(self):
        if self.tokens_per_domain < 1 or self.top_tokens < 1 or self.clusters < 0 or self.permutations < 1:
            raise ConfigError(f"tokens_per_domain, top_tokens and permutations must be >= 1 and clusters >= 0, got "
                              f"{self.tokens_per_domain}, {self.top_tokens}, {self.permutations}, {self.clusters}")
        C.position_buckets([0], self.position_edges)  # checks the edges

    @classmethod
    def from_study(cls, cfg, **overrides) -> "ControlStudyConfig":
        """The notebook's model and seed (a :class:`~routelib.studies.router_weights.RouterStudyConfig`)."""
        return cls(**{"model": cfg.model, "seed": cfg.seed, **overrides})


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


def probe_labels(data: ControlData, layer: int, cfg: ControlStudyConfig) -> dict[str, np.ndarray]:
    """The labels of :data:`PROBE_LABELS` for layer ``layer`` (no ``next_expert`` at the last layer)."""
    labels = {"token": C.frequent_tokens(data.token_id, data.train, cfg.top_tokens),
              "position": C.position_buckets(data.position, cfg.position_edges),
              "domain": data.domain, "expert": data.experts[:, layer, 0]}
    if layer + 1 < data.experts.shape[1]:
        labels["next_expert"] = data.experts[:, layer + 1, 0]
    return labels


def run(cfg: ControlStudyConfig, model=None) -> tuple[dict[str, pd.DataFrame] | None, str]:
    """({"probes", "angles", "clusters"}, a one-line summary of the data), or (None, why not)."""
    data, why = load(cfg, model)
    if data is None:
        return None, why
    probe_cfg = C.ProbeConfig(steps=cfg.probe_steps)
    k = cfg.clusters or data.routers.shape[1]
    probes, clusters = [], []
    for layer, router in enumerate(data.routers):
        hidden = data.hidden[:, layer].astype(np.float64)  # (N, H)
        labels = probe_labels(data, layer, cfg)
        probes.append(_first(C.probe_parts(hidden, router, labels, data.train, probe_cfg, cfg.centre), layer=layer))
        parts = dict(zip(CLUSTER_PARTS, (*C.split_coordinates(hidden, router, cfg.centre), hidden)))
        targets = {"token": data.token_id, "domain": data.domain, "role": data.role}
        targets.update({"next_expert": labels["next_expert"]} if "next_expert" in labels else {})
        clusters.append(_first(C.cluster_specificity(parts, targets, k, cfg.seed, cfg.permutations), layer=layer, k=k))
    tables = {"probes": pd.concat(probes, ignore_index=True),
              "angles": C.layer_angles(data.routers, cfg.centre, seed=cfg.seed),
              "clusters": pd.concat(clusters, ignore_index=True)}
    held = int((~data.train).sum())
    domains = ", ".join(f"{d} {n:,}" for d, n in zip(*np.unique(data.domain, return_counts=True)))
    summary = (f"{len(data.train):,} tokens ({domains}), {len(data.train) - held:,} train / {held:,} held out by "
               f"sequence; recomputed routing agrees with the traces on {data.agreement:.1%} of (token, layer)")
    return tables, summary


def _first(table: pd.DataFrame, **columns) -> pd.DataFrame:
    """``table`` with constant ``columns`` put first."""
    return table.assign(**columns)[[*columns, *table.columns]]


def verdicts(tables: dict[str, pd.DataFrame]) -> list[str]:
    """One sentence per probe label, one for the angles, one per cluster label and the claim's verdict,
    all from the tables of :func:`run`."""
    probes, angles, clusters = tables["probes"], tables["angles"], tables["clusters"]
    acc = probes.pivot_table(index=["label", "layer"], columns="part", values="accuracy")
    dims = probes.groupby("part")["dims"].first()
    lines = []
    for label in [name for name in PROBE_LABELS if name in acc.index.get_level_values(0)]:
        a = acc.loc[label]
        chance = probes.loc[probes["label"] == label, "chance"].mean()
        wins = int((a["control"] > a["content_matched"]).sum())
        lines.append(f"{label}: mean held-out accuracy over {len(a)} layers: control {a['control'].mean():.3f} "
                     f"({dims['control']} dims), size-matched content {a['content_matched'].mean():.3f}, all content "
                     f"{a['content'].mean():.3f} ({dims['content']} dims), chance {chance:.3f}; control above "
                     f"size-matched content at {wins}/{len(a)} layers")
    angle = angles["mean_angle"]
    closer = int((angle < angles["null_mean"]).sum())
    lines.append(f"consecutive layers' control subspaces (rank {angles['rank'].min()}): mean principal angle "
                 f"{angle.mean():.1f} deg ({angle.min():.1f}-{angle.max():.1f} over pairs), random subspaces "
                 f"{angles['null_mean'].mean():.1f} deg; closer than random at {closer}/{len(angles)} pairs")
    excess = clusters.pivot_table(index="label", columns="part", values="excess")  # mean over layers
    k = int(clusters["k"].iloc[0])
    for label in [name for name in CLUSTER_LABELS if name in excess.index]:
        e = excess.loc[label]
        lines.append(f"k-means (k={k}) by {label}: NMI excess over the permutation null, mean over layers: control "
                     f"{e['control']:.3f}, content {e['content']:.3f}, full {e['full']:.3f}")
    token, following = acc.loc["token"], acc.loc["next_expert"]
    surface = int((token["content_matched"] > token["control"]).sum())
    function = int((following["control"] > following["content_matched"]).sum())
    halves = ["yes" if 2 * n > len(t) else "no" for n, t in ((surface, token), (function, following))]
    holds = ("does not hold", "holds in part", "holds")[halves.count("yes")]
    lines.append(f"claim (d) {holds} by the probes: token identity is decoded better from size-matched content than "
                 f"from control at {surface}/{len(token)} layers ({halves[0]}), the next layer's expert better from "
                 f"control than from size-matched content at {function}/{len(following)} layers ({halves[1]})")
    return lines
