"""Control and content: what of a hidden state the router reads, and what that part carries.

Ye, Yuan & Sharkey (2026, "Polysemantic Experts, Monosemantic Paths: Routing as Control in MoEs",
arXiv 2604.17837) split each router input h (the hidden state a MoE layer's router reads) into a
*control* part -- its projection onto the row space of the router matrix W (E x H), all the router
sees -- and the orthogonal *content* part, and claim that surface features (which token it is) live in
the content part while function (for instance what the next layer's router will pick) lives in the
control part. This module measures that for any routers and their inputs:

- :func:`subspace_bases` / :func:`split_coordinates`: orthonormal bases of the control subspace (rank
  r, about E) and of its complement (H - r), and each state's coordinates in both. ``centre=True``
  uses the centred router (rows minus their mean): a shift common to every logit changes neither the
  softmax nor the top-k, so its row space (rank E - 1) is exactly what the routing decision reads;
  ``centre=False`` is the paper's row space of W (as :func:`.expert_paths.control_content`).
- :func:`probe_accuracy`: a linear probe (multinomial logistic regression, full-batch L-BFGS, torch)
  fitted on a train split, its held-out accuracy beside chance (the majority-class rate of the
  held-out split); :func:`probe_parts` runs it on the control coordinates (r dims), on the content
  coordinates (H - r dims) and on the content's top-r principal components fitted on the train split
  (``content_matched``: the same number of dimensions as control, so a difference is not one of size).
- :func:`sequence_split` (train/held-out by sequence, never by token, seeded, per stratum),
  :func:`frequent_tokens` (token identity among the K most frequent train tokens, others left out),
  :func:`position_buckets`: the splits and labels of the probes.
- :func:`layer_angles`: principal angles between consecutive layers' control subspaces (mean, in
  degrees) beside random subspaces of the same ranks (:func:`.expert_paths.random_subspace_angles`).
- :func:`kmeans` (k-means++ seeding, Lloyd iterations) and :func:`cluster_specificity`: clusters
  of control vectors vs full vectors, and how much of a label (token, domain, role) each grouping
  carries as normalised MI *in excess of* the size-matched permutation null
  (:func:`.expert_paths.specificity`), not as raw purity (more or smaller clusters raise purity alone).
- :func:`measure_layers` (every layer of a model: the probes of :data:`PROBE_LABELS`, the clusters of
  :data:`CLUSTER_LABELS` and the angles, under each definition of :data:`DEFINITIONS`) and :func:`verdicts`
  (those tables as sentences; the claim's verdict from 95 % t-intervals over layers, :func:`half_of_claim`):
  the control-and-content sections of notebooks 06 and 01.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from routelib.errors import ConfigError
from routelib.reference import t_interval, torch_threads
from routelib.routing.analyse.expert_paths import principal_angles, random_subspace_angles, row_space, specificity

#: Label value meaning "not labelled": the row is left out of that probe or cluster score.
UNLABELLED = -1
#: The parts :func:`probe_parts` compares.
PARTS = ("control", "content", "content_matched")
#: Probe labels of :func:`measure_layers`: surface (token, position), source (domain), function (this layer's
#: and the next layer's first-choice expert; the first is decoded from control by construction: a check of the split).
PROBE_LABELS = ("token", "position", "domain", "expert", "next_expert")
#: Cluster labels: the token id (all tokens), the domain, the role (roles.role_labels: register and the class
#: of the next token, for every token) and the next layer's first-choice expert.
CLUSTER_LABELS = ("token", "domain", "role", "next_expert")
#: Features clustered: the control part, the content part and the whole router input.
CLUSTER_PARTS = ("control", "content", "full")
#: Definitions of the control subspace: name -> (its label in the tables' ``definition`` column, centre the
#: router first). The whole router input ("full") is the same under both: clustered once, labelled "both".
DEFINITIONS = {"centred": ("centred router (E-1)", True), "paper": ("router W (paper, E)", False)}


@dataclass
class ProbeConfig:
    steps: int = 30  # L-BFGS iterations of each probe (full batch; the loss is convex)
    l2: float = 1e-3  # weight decay on the probe's weights (the bias is not decayed); features are
    # standardised with the train split's mean and standard deviation first

    def __post_init__(self):
        if self.steps < 1 or self.l2 < 0:
            raise ConfigError(f"ProbeConfig: steps must be >= 1 and l2 >= 0, got steps={self.steps}, l2={self.l2}")


def one_thread():
    """torch on one thread inside the block (:func:`routelib.reference.torch_threads`): the probes' and
    k-means' problems are small, and threads beyond the free cores slow them down many times (measured on
    2 cores with one busy)."""
    return torch_threads(1)


def _matrix(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ConfigError(f"{name}: expected a finite (rows, features) matrix, got shape {x.shape}"
                          + ("" if x.ndim != 2 else " with non-finite values"))
    return x


def subspace_bases(router, centre: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(control basis (r, H), content basis (H - r, H)): orthonormal rows spanning the row space of
    ``router`` (E, H) -- of its centred rows with ``centre`` -- and its orthogonal complement."""
    router = _matrix(router, "router")
    if centre:
        router = router - router.mean(0)
    control = row_space(router)  # (r, H)
    if len(control) == 0:
        raise ConfigError("router: all zero (after centring, all rows equal): it has no control subspace")
    _, _, vt = np.linalg.svd(control, full_matrices=True)  # (H, H): the first r rows span the control space
    return control, vt[len(control):]


def split_coordinates(hidden, router, centre: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of ``hidden`` (N, H) in the control basis (N, r) and in the content basis (N, H - r)
    of ``router`` (E, H) (:func:`subspace_bases`); distances in each equal those of the parts themselves."""
    hidden, router = _matrix(hidden, "hidden"), _matrix(router, "router")
    if hidden.shape[1] != router.shape[1]:
        raise ConfigError(f"hidden (N, H) and router (E, H) must share H: got {hidden.shape} and {router.shape}")
    control, content = subspace_bases(router, centre)
    return hidden @ control.T, hidden @ content.T


def sequence_split(sequence, held_out: float = 0.25, seed: int = 0, strata=None) -> np.ndarray:
    """(N,) bool, True for the train rows: whole sequences (``sequence``, one id per row) go to the
    held-out split, a share ``held_out`` of each stratum's sequences (``strata``: one value per row,
    constant within a sequence, e.g. the domain; default one stratum), at least one per stratum with two
    or more sequences."""
    sequence = np.asarray(sequence)
    strata = np.zeros(len(sequence), int) if strata is None else np.asarray(strata)
    if not 0 < held_out < 1:
        raise ConfigError(f"held_out must be a share in (0, 1), got {held_out}")
    if len(strata) != len(sequence):
        raise ConfigError(f"strata: one value per row, got {len(strata)} for {len(sequence)} rows")
    rng = np.random.default_rng(seed)
    test_seqs = []
    for stratum in np.unique(strata):
        seqs = np.unique(sequence[strata == stratum])
        if len(seqs) > 1:
            take = min(len(seqs) - 1, max(1, round(held_out * len(seqs))))
            test_seqs.extend(rng.permutation(seqs)[:take])
    train = ~np.isin(sequence, test_seqs)
    if train.all() or not train.any():
        raise ConfigError(f"sequence_split: {len(np.unique(sequence))} sequence(s) in {len(np.unique(strata))} "
                          "strata give no train and held-out split; give two or more sequences per stratum")
    return train


def frequent_tokens(token_ids, train, k: int) -> np.ndarray:
    """(N,) token id where it is one of the ``k`` most frequent ids of the train rows, else
    :data:`UNLABELLED` (the token-identity probe is a K-way classification)."""
    token_ids, train = np.asarray(token_ids), np.asarray(train, bool)
    if k < 1 or len(token_ids) != len(train):
        raise ConfigError(f"frequent_tokens: k must be >= 1 (got {k}) and train one flag per token "
                          f"({len(train)} for {len(token_ids)})")
    ids, counts = np.unique(token_ids[train], return_counts=True)
    top = ids[np.argsort(-counts, kind="stable")[:k]]
    return np.where(np.isin(token_ids, top), token_ids, UNLABELLED)


def position_buckets(position, edges=(16, 64, 256, 1024)) -> np.ndarray:
    """(N,) bucket index of each position: 0 for [0, edges[0]), 1 for [edges[0], edges[1]), ..."""
    edges = np.asarray(edges)
    if len(edges) == 0 or (np.diff(edges) <= 0).any() or edges[0] <= 0:
        raise ConfigError(f"position edges must be increasing and positive, got {edges.tolist()}")
    return np.searchsorted(edges, np.asarray(position), side="right")


def probe_accuracy(x_train, y_train, x_test, y_test, cfg: ProbeConfig = ProbeConfig()) -> dict:
    """Fit a multinomial logistic regression of ``y_train`` (labels) on ``x_train`` (n, d), score it on
    the held-out rows: {accuracy, chance (the held-out split's majority-class rate), classes, n_train,
    n_test}. A held-out label never seen in training counts as a miss."""
    x_train, x_test = _matrix(x_train, "x_train"), _matrix(x_test, "x_test")
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test) or x_train.shape[1] != x_test.shape[1]:
        raise ConfigError(f"probe: x_train {x_train.shape} / y_train {y_train.shape} and x_test {x_test.shape} / "
                          f"y_test {y_test.shape} must match in rows, and the x's in features")
    classes, codes = np.unique(y_train, return_inverse=True)
    if len(classes) < 2 or len(y_test) == 0:
        raise ConfigError(f"probe: needs two or more classes in training (got {len(classes)}) and held-out rows "
                          f"(got {len(y_test)})")
    mean, std = x_train.mean(0), x_train.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    xt = torch.as_tensor((x_train - mean) / std, dtype=torch.float32)  # (n, d) standardised
    yt = torch.as_tensor(codes.ravel(), dtype=torch.long)  # (n,)
    weight = torch.zeros(xt.shape[1], len(classes), requires_grad=True)  # (d, C): zero start, deterministic
    bias = torch.zeros(len(classes), requires_grad=True)  # (C,)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=cfg.steps, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(xt @ weight + bias, yt) + cfg.l2 * weight.square().sum()
        value.backward()
        return value

    with one_thread():
        opt.step(loss)
        with torch.no_grad():
            scores = torch.as_tensor((x_test - mean) / std, dtype=torch.float32) @ weight + bias  # (m, C)
    predicted = classes[scores.argmax(1).numpy()]
    _, test_counts = np.unique(y_test, return_counts=True)
    return {"accuracy": float((predicted == y_test).mean()), "chance": float(test_counts.max() / len(y_test)),
            "classes": int(len(classes)), "n_train": int(len(y_train)), "n_test": int(len(y_test))}


def top_components(x_train, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), components (r, d)): the top-``r`` principal axes of ``x_train`` (n, d)."""
    x_train = _matrix(x_train, "x_train")
    if not 1 <= r <= min(x_train.shape):
        raise ConfigError(f"top_components: r must be in 1..{min(x_train.shape)}, got {r}")
    mean = x_train.mean(0)
    centred = torch.as_tensor(x_train - mean)
    with one_thread():
        _, vectors = torch.linalg.eigh(centred.T @ centred)  # (d, d), eigenvalues ascending
    return mean, vectors.flip(1)[:, :r].T.numpy()


def probe_parts(hidden, router, labels: dict, train, cfg: ProbeConfig = ProbeConfig(),
                centre: bool = False) -> pd.DataFrame:
    """Per label of ``labels`` (name -> (N,) labels, :data:`UNLABELLED` rows left out) and per part of
    :data:`PARTS`: the probe's held-out accuracy and chance (:func:`probe_accuracy`), with the part's
    dimensions. hidden: (N, H) one layer's router inputs; router: (E, H) that layer's router; train:
    (N,) bool, True for train rows (:func:`sequence_split`)."""
    train = np.asarray(train, bool)
    control, content = split_coordinates(hidden, router, centre)  # (N, r), (N, H - r)
    if len(train) != len(control):
        raise ConfigError(f"train: one flag per row, got {len(train)} for {len(control)} rows")
    mean, axes = top_components(content[train], control.shape[1])
    parts = {"control": control, "content": content, "content_matched": (content - mean) @ axes.T}
    rows = []
    for name, y in labels.items():
        y = np.asarray(y)
        if len(y) != len(train):
            raise ConfigError(f"label {name!r}: one value per row, got {len(y)} for {len(train)} rows")
        keep = y != UNLABELLED
        for part, x in parts.items():
            scores = probe_accuracy(x[keep & train], y[keep & train], x[keep & ~train], y[keep & ~train], cfg)
            rows.append({"label": name, "part": part, "dims": x.shape[1], **scores})
    return pd.DataFrame(rows)


def layer_angles(routers, centre: bool = False, draws: int = 20, seed: int = 0) -> pd.DataFrame:
    """Per pair of consecutive layers of ``routers`` (L, E, H): the ranks of their control subspaces,
    the mean and smallest principal angle between them in degrees, and the mean angle between random
    subspaces of the same ranks in H dimensions (``draws`` draws)."""
    routers = np.asarray(routers, np.float64)
    if routers.ndim != 3 or len(routers) < 2:
        raise ConfigError(f"routers: expected (layers >= 2, experts, hidden), got shape {routers.shape}")
    bases = [subspace_bases(r, centre)[0] for r in routers]
    rows = []
    for layer, (a, b) in enumerate(zip(bases, bases[1:])):
        angles = np.degrees(principal_angles(a, b))
        null = np.degrees(random_subspace_angles(len(a), len(b), routers.shape[2], draws, seed + layer))
        rows.append({"layers": f"{layer}-{layer + 1}", "rank": min(len(a), len(b)), "mean_angle": float(angles.mean()),
                     "min_angle": float(angles.min()), "null_mean": float(null.mean())})
    return pd.DataFrame(rows)


def kmeans(x, k: int, seed: int = 0, iterations: int = 100, tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), centres (k, d)) of k-means on ``x`` (N, d): k-means++ seeding, then Lloyd
    iterations until at most a share ``tol`` of the labels changes (at most ``iterations``); an emptied
    cluster restarts at the point farthest from its centre."""
    x = _matrix(x, "x")
    if not 1 <= k <= len(x):
        raise ConfigError(f"kmeans: k must be in 1..{len(x)} (the number of rows), got {k}")
    rng = np.random.default_rng(seed)
    xt = torch.as_tensor(x)  # (N, d)
    norms = xt.square().sum(1, keepdim=True)  # (N, 1)

    def sq_dist(centres):  # (N, k)
        c = torch.as_tensor(centres)
        return (norms - xt @ (2 * c).T + c.square().sum(1)).clamp_min(0).numpy()

    with one_thread():
        centres = x[[rng.integers(len(x))]]
        while len(centres) < k:  # k-means++: the next centre drawn with probability ~ squared distance
            d = sq_dist(centres).min(1)
            pick = rng.choice(len(x), p=d / d.sum()) if d.sum() > 0 else rng.integers(len(x))
            centres = np.vstack([centres, x[pick]])
        labels = np.full(len(x), -1)
        for _ in range(iterations):
            dist = sq_dist(centres)
            new = dist.argmin(1)
            settled = (new != labels).mean() <= tol
            labels = new
            if settled:
                break
            members = torch.nn.functional.one_hot(torch.as_tensor(labels), k).double()  # (N, k)
            counts = members.sum(0).numpy()  # (k,)
            sums = (members.T @ xt).numpy()  # (k, d)
            centres = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
            for c in np.flatnonzero(counts == 0):  # an emptied cluster restarts at the worst-served point
                centres[c] = x[dist[np.arange(len(x)), labels].argmax()]
    return labels, centres


def cluster_specificity(features: dict, labels: dict, k: int, seed: int = 0, permutations: int = 20) -> pd.DataFrame:
    """Cluster each of ``features`` (part name -> (N, d)) with :func:`kmeans` (``k`` clusters) and score
    every label of ``labels`` (name -> (N,), :data:`UNLABELLED` rows left out) against the clusters:
    normalised MI, its permutation null and the excess (:func:`.expert_paths.specificity`)."""
    rows = []
    for part, x in features.items():
        groups, _ = kmeans(x, k, seed)
        for name, y in labels.items():
            y = np.asarray(y)
            if len(y) != len(groups):
                raise ConfigError(f"label {name!r}: one value per row, got {len(y)} for {len(groups)} rows")
            keep = y != UNLABELLED
            score = specificity(y[keep], groups[keep], permutations, seed)
            rows.append({"part": part, "label": name, "nmi": score["nmi"], "null_mean": score["null_mean"],
                         "excess": score["excess"]})
    return pd.DataFrame(rows)


def measure_layers(hidden, routers, experts, token_id, domain, position, role, train, *, top_tokens: int = 50,
                   position_edges=(64, 128, 192), definitions=("centred", "paper"), clusters: int = 0,
                   permutations: int = 20, probe_steps: int = 30, seed: int = 0,
                   layers=None) -> dict[str, pd.DataFrame]:
    """{"probes", "angles", "clusters"}: per layer and definition of control (:data:`DEFINITIONS`), the
    probes of :data:`PROBE_LABELS` (:func:`routelib.routing.analyse.control.probe_parts`), k-means of the
    control, content and whole inputs scored against :data:`CLUSTER_LABELS`; the principal angles between
    consecutive layers' control subspaces. hidden: (N, L, H) router inputs; routers: (L, E, H); experts:
    (N, L, k), first choice first; token_id, domain, position, role: (N,); train: (N,) bool (whole
    sequences, :func:`routelib.routing.analyse.control.sequence_split`). Layers are numbered 0..L-1; ``layers``:
    the ones probed and clustered (None: all; a deep model's 30 layers cost minutes each), the angles always
    over every consecutive pair."""
    hidden, routers, experts = np.asarray(hidden), np.asarray(routers, np.float64), np.asarray(experts)
    if hidden.ndim != 3 or routers.ndim != 3 or experts.ndim != 3 or len(routers) < 2 or not (
            hidden.shape[1] == len(routers) == experts.shape[1] and len(hidden) == len(experts)):
        raise ConfigError(f"measure_layers: expected hidden (N, L, H), routers (L >= 2, E, H), experts (N, L, k); got "
                          f"{hidden.shape}, {routers.shape}, {experts.shape}")
    if not definitions or set(definitions) - set(DEFINITIONS):
        raise ConfigError(f"definitions must name one or more of {list(DEFINITIONS)}, got {definitions}")
    chosen_layers = range(len(routers)) if layers is None else sorted({int(layer) for layer in layers})
    if not len(chosen_layers) or not all(0 <= layer < len(routers) for layer in chosen_layers):
        raise ConfigError(f"layers must name one or more of 0..{len(routers) - 1}, got {layers}")
    train = np.asarray(train, bool)
    probe_cfg = ProbeConfig(steps=probe_steps)
    k = clusters or routers.shape[1]
    chosen = [DEFINITIONS[name] for name in definitions]
    token = frequent_tokens(token_id, train, top_tokens)
    bucket = position_buckets(position, position_edges)
    probes, angles, found = [], [], []
    for layer in chosen_layers:
        router = routers[layer]
        x = hidden[:, layer].astype(np.float64)  # (N, H)
        labels = probe_labels(token, bucket, domain, experts, layer)
        targets = {"token": np.asarray(token_id), "domain": np.asarray(domain), "role": np.asarray(role)}
        targets.update({"next_expert": labels["next_expert"]} if "next_expert" in labels else {})
        full = cluster_specificity({"full": x}, targets, k, seed, permutations)
        found.append(_first(full, definition="both", layer=layer, k=k))
        for definition, centre in chosen:
            table = probe_parts(x, router, labels, train, probe_cfg, centre)
            probes.append(_first(table, definition=definition, layer=layer))
            parts = dict(zip(CLUSTER_PARTS[:2], split_coordinates(x, router, centre)))
            table = cluster_specificity(parts, targets, k, seed, permutations)
            found.append(_first(table, definition=definition, layer=layer, k=k))
    for definition, centre in chosen:
        angles.append(_first(layer_angles(routers, centre, seed=seed), definition=definition))
    return {name: pd.concat(rows, ignore_index=True)
            for name, rows in (("probes", probes), ("angles", angles), ("clusters", found))}


def probe_labels(token, bucket, domain, experts, layer: int) -> dict[str, np.ndarray]:
    """The labels of :data:`PROBE_LABELS` at ``layer``: token (:func:`frequent_tokens`), position bucket, domain
    and the first choice of ``experts`` (N, L, k) at ``layer`` and, below the last layer, at ``layer + 1``."""
    labels = {"token": token, "position": bucket, "domain": np.asarray(domain), "expert": experts[:, layer, 0]}
    if layer + 1 < experts.shape[1]:
        labels["next_expert"] = experts[:, layer + 1, 0]
    return labels


def _first(table: pd.DataFrame, **columns) -> pd.DataFrame:
    """``table`` with constant ``columns`` put first."""
    return table.assign(**columns)[[*columns, *table.columns]]


def verdicts(tables: dict[str, pd.DataFrame]) -> list[str]:
    """From the tables of :func:`measure_layers`: per probe label, for the angles and per cluster label one
    sentence naming every definition's numbers, then the claim's verdict, one line per definition.

    The verdict rests on two gaps in held-out accuracy, one value per layer: token identity, size-matched
    content minus control (the surface half), and the next layer's expert, control minus size-matched
    content (the function half); each half is read from the mean gap's 95 % t-interval over layers
    (:func:`half_of_claim`): "above 0" (the half holds), "below 0" (its opposite holds), "includes 0"
    (undecided) or, with one layer, "no interval" (undecided). The claim **holds** when both halves'
    intervals lie above 0, **holds in part** when one does, **does not hold** when neither does and one lies
    below 0, and **is not resolved** otherwise (both undecided). The layers each half is ahead at are named
    beside."""
    probes, angles, clusters = tables["probes"], tables["angles"], tables["clusters"]
    definitions = list(dict.fromkeys(probes["definition"]))
    acc = probes.pivot_table(index=["definition", "label", "layer"], columns="part", values="accuracy")
    dims = probes.groupby(["definition", "part"])["dims"].first()
    lines = []
    for label in [name for name in PROBE_LABELS if name in acc.index.get_level_values(1)]:
        chance = probes.loc[probes["label"] == label, "chance"].mean()
        layers = probes.loc[probes["label"] == label, "layer"].nunique()
        each = []
        for definition in definitions:
            a = acc.loc[(definition, label)]
            wins = int((a["control"] > a["content_matched"]).sum())
            each.append(f"{definition}: control {a['control'].mean():.3f} ({dims[definition, 'control']} dims), "
                        f"size-matched content {a['content_matched'].mean():.3f}, all content "
                        f"{a['content'].mean():.3f} ({dims[definition, 'content']} dims), control ahead at "
                        f"{wins}/{len(a)} layers")
        lines.append(f"{label}: mean held-out accuracy over {layers} layers, chance {chance:.3f}; " + "; ".join(each))
    each = []
    for definition, a in angles.groupby("definition", sort=False):
        angle = a["mean_angle"]
        closer = int((angle < a["null_mean"]).sum())
        each.append(f"{definition} (rank {a['rank'].min()}): {angle.mean():.1f} deg ({angle.min():.1f}-"
                    f"{angle.max():.1f} over pairs), random subspaces {a['null_mean'].mean():.1f} deg, closer at "
                    f"{closer}/{len(a)} pairs")
    lines.append("consecutive layers' control subspaces, mean principal angle: " + "; ".join(each))
    excess = clusters.pivot_table(index=["label", "definition"], columns="part", values="excess")  # mean over layers
    k = int(clusters["k"].iloc[0])
    for label in [name for name in CLUSTER_LABELS if name in excess.index.get_level_values(0)]:
        e = excess.loc[label]
        each = [f"{d}: control {e.loc[d, 'control']:.3f}, content {e.loc[d, 'content']:.3f}" for d in definitions]
        lines.append(f"k-means (k={k}) by {label}: NMI excess over the permutation null, mean over layers: "
                     + "; ".join(each) + f"; full {e.loc['both', 'full']:.3f}")
    for definition in definitions:
        token, following = acc.loc[(definition, "token")], acc.loc[(definition, "next_expert")]
        surface = half_of_claim(token["content_matched"] - token["control"])
        function = half_of_claim(following["control"] - following["content_matched"])
        sides = [surface["side"], function["side"]]
        holds = ("holds" if sides.count("above 0") == 2 else "holds in part" if "above 0" in sides
                 else "does not hold" if "below 0" in sides else "is not resolved")
        lines.append(f"{definition}: claim (d) {holds} by the probes (mean gap in held-out accuracy over layers, "
                     f"95 % t-interval): token identity, size-matched content minus control, {surface['text']}; the "
                     f"next layer's expert, control minus size-matched content, {function['text']}")
    return lines


def half_of_claim(gaps) -> dict:
    """One half of claim (d) from its per-layer accuracy ``gaps`` (the part the claim favours minus the
    other): {"side": "above 0" / "below 0" / "includes 0" for the mean gap's 95 % t-interval over layers,
    "no interval" for one layer; "text": the mean, interval, layers ahead and side, as
    ``+0.186 [+0.160, +0.212] over 4 layers, ahead at 4/4 (above 0)``}."""
    gaps = np.asarray(gaps, dtype=float)
    if gaps.ndim != 1 or len(gaps) == 0 or not np.isfinite(gaps).all():
        raise ConfigError(f"half_of_claim: expected finite gaps, one per layer, got {gaps!r}")
    t = t_interval(gaps)
    ahead = f"ahead at {int((gaps > 0).sum())}/{len(gaps)}"
    if len(gaps) == 1:
        return {"side": "no interval", "text": f"{t['mean']:+.3f} at one layer, {ahead} (no interval)"}
    side = "above 0" if t["low"] > 0 else "below 0" if t["high"] < 0 else "includes 0"
    return {"side": side, "text": f"{t['mean']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}] over {len(gaps)} layers, "
                                  f"{ahead} ({side})"}
