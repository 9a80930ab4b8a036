"""Notebook 01's "Control and content": claim (d) of Ye, Yuan & Sharkey (2026, "Polysemantic Experts,
Monosemantic Paths: Routing as Control in MoEs", arXiv 2604.17837) on the pathway model the notebook trains.

The claim: the input h (H,) of a router W (E, H) splits into a *control* part -- its projection onto the
row space of W, all the router sees -- and the orthogonal *content* part; surface features (which token
it is) live in the content, function (what the next routed layer's router will pick) in the control.
Notebook 06 measures it on the MoE subject; here an expert is a pathway, E = ``num_pathways`` and each
router is a :class:`routelib.models.pathways.PathwayRouter`, whose ``proj.weight`` is W (E, H), no bias.

- :func:`held_out_windows`: whole windows of the study's ``seq_len`` from every domain's held-out split,
  spread over it as :func:`routelib.studies.pathways.domain_eval_data` spreads them, until about
  ``tokens_per_domain`` tokens per domain;
- :func:`capture`: one no-grad pass over them with a forward hook on every PathwayRouter, recording its
  input x (the hidden state its MLP reads) and the top-k pathways it chose, the pass stopped once the last
  routed layer has routed (nothing after it is needed);
- :func:`run`: the tokens split into train and held-out **by window** (a share of each domain's windows
  held out), then ``routelib.routing.analyse.control.measure_layers`` -- linear probes of the token (among
  the most frequent), the position (quarter of the window), the domain, this layer's and the next routed layer's first-choice
  pathway from control, from the size-matched content and from all content; principal angles between
  consecutive routed layers' control subspaces beside random ones; k-means NMI excess over a permutation
  null -- under both definitions of control (:data:`DEFINITIONS`: the row space of the centred router,
  rank E - 1, which is what top-k and the gates read; the paper's row space of W itself, rank E), all with
  :mod:`routelib.routing.analyse.control`, whose ``verdicts`` turns the tables into sentences;
- :func:`random_control`: the same probes from the control of a random router of the same shape (a
  uniformly random subspace of the same rank), the baseline that says whether the trained router's
  control is special; :func:`variance_shares`: how much of the inputs' variance each part holds (the
  size-matched content reads the content's strongest directions).

:func:`routelib.routing.analyse.control.measure_layers` and :func:`~routelib.routing.analyse.control.verdicts`
are the measurement and sentences notebook 06 uses too.

Only a model in memory can be measured: the reference run of section 7 keeps its held-out routing samples
(token ids and chosen pathways), not its model; :mod:`routelib.studies.pathways.control_reference` trains
its first main run again and commits these tables for it. :func:`probe_table`, :func:`cluster_table` and
:func:`share_table` lay the tables out as notebook 01 shows them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from routelib.errors import ConfigError
from routelib.models.pathways import RoutedLLM
from routelib.routing.analyse import control as C
from routelib.routing.analyse.roles import role_labels

#: Probe labels, cluster labels and parts, definitions of control: notebook 06's (E = the number of pathways here).
PROBE_LABELS, CLUSTER_LABELS, CLUSTER_PARTS, DEFINITIONS = C.PROBE_LABELS, C.CLUSTER_LABELS, C.CLUSTER_PARTS, C.DEFINITIONS
#: Sentences from the tables of :func:`run`.
verdicts = C.verdicts


@dataclass
class ControlContentConfig:
    tokens_per_domain: int = 1536  # held-out tokens per domain: ceil(this / seq_len) whole windows of the study's
    # seq_len (notebook 06 takes 2,048; 1,536 keeps the section near 40 s on one core at the committed parameters)
    split: str = "validation"  # corpus split the windows come from (never trained on)
    held_out: float = 0.25  # share of each domain's windows held out for the probes
    top_tokens: int = 50  # token identity: a K-way probe over the K most frequent train tokens (others left out)
    definitions: tuple = ("centred", "paper")  # control subspaces measured (DEFINITIONS), each on the same inputs
    clusters: int = 0  # k of k-means; 0: the number of pathways
    permutations: int = 20  # label shuffles of the clusters' size-matched null
    probe_steps: int = 30  # L-BFGS iterations per probe (as notebook 06)
    seed: int = 0  # split, k-means and nulls

    def __post_init__(self):
        if self.tokens_per_domain < 1 or self.top_tokens < 1 or self.clusters < 0 or self.permutations < 1:
            raise ConfigError(f"tokens_per_domain, top_tokens and permutations must be >= 1 and clusters >= 0, got "
                              f"{self.tokens_per_domain}, {self.top_tokens}, {self.permutations}, {self.clusters}")
        if not self.definitions or set(self.definitions) - set(DEFINITIONS):
            raise ConfigError(f"definitions must name one or more of {list(DEFINITIONS)}, got {self.definitions}")


@dataclass
class RouterInputs:
    """What the routers read and chose on held-out windows, one row per token in (domain, window,
    position) order."""

    layers: list[int]  # decoder-layer index of each routed layer, in order (L of them)
    hidden: np.ndarray  # (N, L, H) float32: each routed layer's router input x
    routers: np.ndarray  # (L, E, H) float64: each PathwayRouter's W
    experts: np.ndarray  # (N, L, k) int64: the top-k pathways chosen, first choice first
    token_id: np.ndarray  # (N,) int64 input token
    next_id: np.ndarray  # (N,) int64 the token that follows it in the text (the window's target)
    domain: np.ndarray  # (N,) str
    window: np.ndarray  # (N,) int64 window index, unique over domains
    position: np.ndarray  # (N,) int64 position in the window
    seq_len: int  # tokens per window
    agreement: float  # share of (token, layer) whose top-k of x W^T in float64 is the set the router chose


def held_out_windows(cfg, tokenizer, tokens_per_domain: int = 1536, split: str = "validation") -> dict[str, list]:
    """{domain: [(x, y) batches, each (B, seq_len)]}: ceil(tokens_per_domain / seq_len) non-overlapping
    windows per domain of ``cfg`` (a :class:`routelib.studies.pathways.PathwayStudyConfig`), spread over
    the domain's ``split`` -- :func:`routelib.studies.pathways.domain_eval_data` with that many windows."""
    from routelib.studies.pathways import domain_eval_data

    if tokens_per_domain < 1:
        raise ConfigError(f"tokens_per_domain must be >= 1, got {tokens_per_domain}")
    windows = math.ceil(tokens_per_domain / cfg.seq_len)
    return domain_eval_data(dataclasses.replace(cfg, eval_windows=windows), tokenizer, split)


class _Routed(Exception):
    """Raised by the last routed layer's hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def capture(routed: RoutedLLM, data: dict[str, list]) -> RouterInputs:
    """Run ``routed`` (in eval mode, no frequency update) over ``data`` ({domain: [(x, y), ...]}, e.g.
    :func:`held_out_windows`) with a forward hook on every PathwayRouter recording its input (n, H) and its
    top-k (n, k); each pass stops after the last routed layer. ``routed`` comes back in its mode, hooks removed."""
    routers = routed.routers()  # {decoder layer: PathwayRouter}, in layer order
    layers = list(routers)
    if len(layers) < 2:
        raise ConfigError(f"capture: {len(layers)} routed layer(s); the next layer's pathway and the angles need "
                          "two or more")
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(layer: int):
        def record(module, args, out):
            got[layer] = (args[0].detach().float().cpu(), out.indices.detach().cpu())  # (n, H), (n, k)
            if layer == layers[-1]:
                raise _Routed
        return record

    handles = [router.register_forward_hook(hook(layer)) for layer, router in routers.items()]
    was = routed.training
    routed.eval()
    device = next(routed.parameters()).device
    hidden, experts, tokens, following, domains, windows, positions = [], [], [], [], [], [], []
    n_windows, seq_len = 0, None
    with C.one_thread():  # the section's budget is one core, as notebook 06's recomputation
        try:
            for domain, batches in data.items():
                for x, y in batches:
                    b, t = x.shape
                    if seq_len not in (None, t):
                        raise ConfigError(f"capture: windows of {seq_len} and {t} tokens; give windows of one length")
                    seq_len = t
                    got.clear()
                    try:
                        routed(input_ids=x.to(device), use_cache=False)
                    except _Routed:
                        pass
                    if len(got) != len(layers):
                        raise ConfigError(f"capture: routers of layers {sorted(got)} ran, expected {layers}")
                    hidden.append(torch.stack([got[layer][0] for layer in layers], 1))  # (b t, L, H)
                    experts.append(torch.stack([got[layer][1] for layer in layers], 1))  # (b t, L, k)
                    tokens.append(x.reshape(-1))  # (b t,)
                    following.append(y.reshape(-1))  # (b t,)
                    domains.append(np.full(b * t, domain, dtype=object))
                    windows.append(np.repeat(np.arange(n_windows, n_windows + b), t))  # (b t,)
                    positions.append(np.tile(np.arange(t), b))  # (b t,)
                    n_windows += b
        finally:
            for handle in handles:
                handle.remove()
            routed.train(was)
    if not hidden:
        raise ConfigError("capture: no windows to run")
    x = torch.cat(hidden).numpy()  # (N, L, H)
    chosen = torch.cat(experts).numpy().astype(np.int64)  # (N, L, k)
    w = np.stack([r.proj.weight.detach().double().cpu().numpy() for r in routers.values()])  # (L, E, H)
    logits = np.einsum("nlh,leh->nle", x.astype(np.float64), w)  # (N, L, E)
    k = chosen.shape[2]
    top = np.sort(np.argsort(-logits, axis=2, kind="stable")[..., :k], axis=2)  # (N, L, k) as sets
    agreement = float((top == np.sort(chosen, axis=2)).all(2).mean())
    return RouterInputs(layers, x, w, chosen, torch.cat(tokens).numpy().astype(np.int64),
                        torch.cat(following).numpy().astype(np.int64), np.concatenate(domains).astype(str),
                        np.concatenate(windows).astype(np.int64), np.concatenate(positions).astype(np.int64),
                        int(seq_len), agreement)


def quarters(seq_len: int) -> tuple[int, ...]:
    """Position edges cutting a window of ``seq_len`` tokens into quarters (fewer buckets when shorter)."""
    return tuple(sorted({seq_len * q // 4 for q in (1, 2, 3)} - {0}))


def run(inputs: RouterInputs, cfg: ControlContentConfig, tokenizer) -> tuple[dict[str, pd.DataFrame], str]:
    """({"probes", "angles", "clusters", "random_control"}, a one-line summary of the data):
    ``C.measure_layers`` and :func:`random_control` on the captured router inputs, the tokens split by
    window (a share of each domain's held out); ``tokenizer`` decodes the tokens for the roles. Tables name
    routed layers by their decoder-layer index."""
    train = C.sequence_split(inputs.window, cfg.held_out, cfg.seed, strata=inputs.domain)
    ids = np.unique(np.concatenate([inputs.token_id, inputs.next_id]))
    text = dict(zip(ids.tolist(), (tokenizer.decode([int(i)]) for i in ids)))
    role = role_labels([text[i] for i in inputs.token_id.tolist()], inputs.domain.tolist(),
                       [text[i] for i in inputs.next_id.tolist()])
    tables = C.measure_layers(inputs.hidden, inputs.routers, inputs.experts, inputs.token_id, inputs.domain,
                              inputs.position, role, train, top_tokens=cfg.top_tokens,
                            position_edges=quarters(inputs.seq_len), definitions=cfg.definitions,
                            clusters=cfg.clusters, permutations=cfg.permutations, probe_steps=cfg.probe_steps,
                            seed=cfg.seed)
    tables["random_control"] = random_control(
        inputs.hidden, inputs.experts, inputs.token_id, inputs.domain, inputs.position, train, inputs.routers.shape[1],
        top_tokens=cfg.top_tokens, position_edges=quarters(inputs.seq_len), definitions=cfg.definitions,
        probe_steps=cfg.probe_steps, seed=cfg.seed)
    names = dict(enumerate(inputs.layers))
    for name in ("probes", "clusters", "random_control"):
        tables[name]["layer"] = tables[name]["layer"].map(names)
    tables["angles"]["layers"] = [f"{names[a]}-{names[a + 1]}" for a in range(len(names) - 1)] * len(cfg.definitions)
    held = int((~train).sum())
    domains = ", ".join(f"{d} {n:,}" for d, n in zip(*np.unique(inputs.domain, return_counts=True)))
    summary = (f"{len(train):,} tokens ({domains}) in windows of {inputs.seq_len}, {len(train) - held:,} train / "
               f"{held:,} held out by window; routed layers {', '.join(map(str, inputs.layers))}; the hooks' top-"
               f"{inputs.experts.shape[2]} equals top-{inputs.experts.shape[2]} of x W^T on {inputs.agreement:.1%} "
               "of (token, layer)")
    return tables, summary


def variance_shares(inputs: RouterInputs, definitions=("centred", "paper")) -> pd.DataFrame:
    """Per routed layer and definition of control: the share of the router inputs' variance (summed over
    the H dimensions, about their mean, all tokens) inside the control subspace (rank r), inside the
    content's top r principal directions (what the size-matched content probe reads; the probe fits them
    on the train split only), and r / H, the expected share of a uniformly random r-dimensional subspace."""
    rows = []
    with C.one_thread():
        for j, layer in enumerate(inputs.layers):
            x = torch.as_tensor(inputs.hidden[:, j], dtype=torch.float64)  # (N, H)
            x = x - x.mean(0)
            cov = x.T @ x / len(x)  # (H, H)
            total = float(cov.trace())
            for name in definitions:
                label, centre = DEFINITIONS[name]
                bases = C.subspace_bases(inputs.routers[j], centre)
                control, content = (torch.as_tensor(b) for b in bases)  # (r, H), (H - r, H)
                r = len(control)
                top = torch.linalg.eigvalsh(content @ cov @ content.T)[-r:]  # (r,) the content's largest variances
                rows.append({"definition": label, "layer": layer, "rank": r,
                             "control": float((control @ cov @ control.T).trace()) / total,
                             "content_top_r": float(top.sum()) / total, "random": r / cov.shape[0]})
    return pd.DataFrame(rows)


def random_control(hidden, experts, token_id, domain, position, train, num_experts: int, *, top_tokens: int = 50,
                   position_edges=(64, 128, 192), definitions=("centred", "paper"), probe_steps: int = 30,
                   seed: int = 0) -> pd.DataFrame:
    """The probes of :data:`PROBE_LABELS` (the trained router's choices as the expert labels) from the control
    coordinates of a *random* router of the same shape, one per layer: ``num_experts`` Gaussian rows, as an
    untrained router is drawn, so its row space is a uniformly random subspace of the same rank -- what any
    E directions of the router input carry, against which the trained router's control is read. Rows as
    ``C.measure_layers``' probes, part ``"random control"``. Arguments as ``C.measure_layers``."""
    hidden, experts, train = np.asarray(hidden), np.asarray(experts), np.asarray(train, bool)
    rng = np.random.default_rng(seed)
    probe_cfg = C.ProbeConfig(steps=probe_steps)
    token = C.frequent_tokens(token_id, train, top_tokens)
    bucket = C.position_buckets(position, position_edges)
    rows = []
    for layer in range(hidden.shape[1]):
        router = rng.normal(size=(num_experts, hidden.shape[2]))  # (E, H)
        x = hidden[:, layer].astype(np.float64)  # (N, H)
        labels = C.probe_labels(token, bucket, domain, experts, layer)
        for name in definitions:
            definition, centre = DEFINITIONS[name]
            control, _ = C.split_coordinates(x, router, centre)  # (N, r)
            for label, y in labels.items():
                y = np.asarray(y)
                keep = y != C.UNLABELLED
                score = C.probe_accuracy(control[keep & train], y[keep & train], control[keep & ~train],
                                         y[keep & ~train], probe_cfg)
                rows.append({"definition": definition, "layer": layer, "label": label, "part": "random control",
                             "dims": control.shape[1], **score})
    return pd.DataFrame(rows)


def random_control_lines(tables: dict[str, pd.DataFrame]) -> list[str]:
    """One sentence per definition: the mean held-out accuracy over layers of every probe label from a random
    router's control (``tables["random_control"]``) beside the trained router's control."""
    probes, rand = tables["probes"], tables["random_control"]
    trained = probes[probes["part"] == "control"].groupby(["definition", "label"])["accuracy"].mean()
    random = rand.groupby(["definition", "label"])["accuracy"].mean()
    lines = []
    for definition in dict.fromkeys(rand["definition"]):
        dims = int(rand.loc[rand["definition"] == definition, "dims"].iloc[0])
        each = [f"{label} {random[definition, label]:.3f} vs {trained[definition, label]:.3f}"
                for label in PROBE_LABELS if (definition, label) in random.index]
        lines.append(f"{definition}: control of a random router of the same shape ({dims} dims) vs the trained "
                     f"router's, mean held-out accuracy over layers: " + ", ".join(each))
    return lines


def probe_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Held-out probe accuracy (rows: label, layer; columns: definition, part) with each row's chance, labels
    in :data:`PROBE_LABELS` order: the probes of :func:`run` as notebook 01 shows them."""
    probes = tables["probes"]
    chance = probes.groupby(["label", "layer"])["chance"].first().rename(("", "chance"))
    return (probes.pivot_table(index=["label", "layer"], columns=["definition", "part"], values="accuracy")
            .join(chance).reindex(list(PROBE_LABELS), level=0))


def cluster_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """k-means NMI excess over the permutation null (rows: label, layer; columns: definition, part), labels
    in :data:`CLUSTER_LABELS` order."""
    return (tables["clusters"].pivot_table(index=["label", "layer"], columns=["definition", "part"], values="excess")
            .reindex(list(CLUSTER_LABELS), level=0))


def share_table(shares: pd.DataFrame) -> pd.DataFrame:
    """:func:`variance_shares` with a row per layer and columns (share, definition)."""
    return shares.pivot_table(index="layer", columns="definition", values=["control", "content_top_r", "random"],
                              sort=False)


def plot_probes(tables: dict[str, pd.DataFrame], title: str = ""):
    """One panel per probe label: held-out accuracy against the routed layer, a line per (part, definition)
    (colour: the part, grey: a random router's control when the tables have it; solid: the first
    definition, dashed: the second), chance dotted. Returns the figure."""
    import matplotlib.pyplot as plt

    probes = tables["probes"]
    labels = [name for name in PROBE_LABELS if name in set(probes["label"])]
    definitions = list(dict.fromkeys(probes["definition"]))
    colours = dict(zip(C.PARTS, ("C0", "C1", "C2")))
    fig, axes = plt.subplots(1, len(labels), figsize=(2.9 * len(labels), 2.8), sharey=True)
    for ax, name in zip(np.atleast_1d(axes), labels):
        rows = probes[probes["label"] == name]
        for part in C.PARTS:
            for definition, style in zip(definitions, ("-", "--")):
                line = rows[(rows["part"] == part) & (rows["definition"] == definition)].sort_values("layer")
                ax.plot(line["layer"], line["accuracy"], style, marker="o", ms=3, color=colours[part],
                        label=f"{part}, {definition}")
        if "random_control" in tables:
            rand = tables["random_control"]
            for definition, style in zip(definitions, ("-", "--")):
                line = rand[(rand["label"] == name) & (rand["definition"] == definition)].sort_values("layer")
                ax.plot(line["layer"], line["accuracy"], style, marker="x", ms=3, color="0.55",
                        label=f"random router's control, {definition}")
        chance = rows.groupby("layer")["chance"].first()
        ax.plot(chance.index, chance.to_numpy(), "k:", label="chance")
        ax.set(title=name, xlabel="routed layer", ylim=(0, 1.02), xticks=sorted(set(rows["layer"])))
    np.atleast_1d(axes)[0].set_ylabel("held-out accuracy")
    np.atleast_1d(axes)[-1].legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1, 0.5))
    if title:
        fig.suptitle(title, y=1.02)
    fig.tight_layout()
    return fig


__all__ = ["capture", "cluster_table", "CLUSTER_LABELS", "CLUSTER_PARTS", "ControlContentConfig", "DEFINITIONS",
           "held_out_windows", "plot_probes", "probe_table", "PROBE_LABELS", "quarters", "random_control",
           "random_control_lines", "run", "RouterInputs", "share_table", "variance_shares", "verdicts"]
