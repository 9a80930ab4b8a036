"""Pathway-routed MLPs in a pretrained LLM: fine-tune, perplexity, monosemanticity against controls
(notebook 01).

The pathway-routing project that notebook 01 tests splits the MLP of every other layer of a small LM into 16 pathways, lets a
router pick 4 per token, trains with a Global Load Balancing Loss and reports that pathways become
"monosemantic" (purity = 1 - H/H_max of the tokens each pathway sees). Its base was a 1M-parameter
TinyStories model, its test sentences were training sentences, and its purity had no control.
This study measures the same things on a real pretrained model, SmolLM2-135M (Allal et al., 2025),
with :mod:`routelib.models.pathways` (pathways = neuron groups of the pretrained MLP, as in
MoEfication, Zhang et al. 2022; GLBL with momentum global frequencies, Qiu et al. 2025):

1. the base model's perplexity per domain on held-out text (the baseline);
2. the routed model with the *untrained* router (what routing alone costs) -- its routing is
   recorded on the same held-out windows: the untrained-router control;
3. a fine-tune with LM loss + GLBL through :func:`routelib.train.train` (resumable, hashed
   checkpoint folder), training the routers only, the routers and the routed MLPs, or everything;
4. the fine-tuned routed model's perplexity and routing on the same windows, in one pass;
5. purity, utilisation and load balance (:mod:`routelib.metrics`) for the fine-tuned router next to
   three controls of the same sparsity k/N: the untrained router, a uniformly random top-k router,
   and the fine-tuned router's own choices permuted across positions (identical per-pathway loads,
   token association destroyed); purity per domain; pathways characterised with example contexts.

Which neurons form a pathway is a parameter (``grouping``, :mod:`routelib.models.grouping`): contiguous
blocks of the pretrained MLP (the default, as before), or MoEfication's groups -- a balanced k-means of
the neurons' activation patterns on held-out text ("coactivation") or of their input weights
("weights"), the MLP's neurons permuted so that each group is a contiguous pathway;
:func:`grouping_error` compares the groupings per layer before any fine-tuning. The **reference run**
(docs/design.md §7) is :mod:`routelib.studies.pathways.reference`: ``python -m routelib.studies.pathways reference``.

Which layers are routed matters more than anything else here: on SmolLM2 the first MLP is nearly
irreplaceable (routing layer 0 alone with an untrained router multiplies perplexity by ~100 --
notebook 01 measures it), the middle layers cost little. ``routed_layers`` / ``first_routed_layer``
/ ``last_routed_layer`` choose them; the GPU parameters route every even layer as the original project did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from routelib.device import resolve_device
from routelib import metrics, paths
from routelib.data import TokenWindows, eval_batches, load_pretrained, token_stream
from routelib.data.corpus import DOMAINS, check_domains, check_split
from routelib.errors import ConfigError
from routelib.models.grouping import GROUPINGS, inverse_order, mlp_hidden, neuron_groups, permute_neurons
from routelib.models.pathways import (
    IMPLS,
    ROUTER_INITS,
    RoutedLLM,
    RoutingConfig,
    bench_pathway_mlp,
    decoder_layers,
    pathway_mlp_flops_per_token,
)
from routelib.train import TrainConfig, TrainResult, train

TRAIN_SCOPES = ("router", "router+mlp", "full")
#: Names of the routers compared in every monosemanticity table, trained one first.
ROUTERS = ("fine-tuned", "untrained", "random top-k", "permuted")


@dataclass
class PathwayStudyConfig:
    # --- the model and its routing ---
    model_name: str = "smollm2-135m"  # load_pretrained name: "smollm2-135m" (offline), a directory or a Hub name
    num_pathways: int = 16  # N neuron groups per routed MLP (the original project: 16)
    top_k_pathways: int = 4  # k pathways active per token (the original project: 4)
    route_every_n_layers: int = 2  # route layers first, first+n, first+2n, ... (the original project: every other layer)
    first_routed_layer: int = 0  # lowest decoder layer that is routed
    last_routed_layer: int = -1  # highest decoder layer that may be routed (-1: the model's last layer)
    routed_layers: str = ""  # explicit comma-separated layer indices ("12,16,20"); overrides the three above
    gate_scale: float = 1.0  # RoutingConfig.gate_scale: 1 = a uniform router sums the k chosen pathways
    router_init: str = "normal"  # RoutingConfig.router_init: "normal" (N(0, std) weights) or "zeros"
    router_init_std: float = 0.02  # std of the initial router weights ("normal")
    glbl_weight: float = 0.01  # weight of the Global Load Balancing loss (mean over routed layers)
    switch_weight: float = 0.0  # weight of the per-batch Switch loss (0: logged only)
    momentum: float = 0.9  # EMA momentum of the global selection frequencies in GLBL
    impl: str = "sparse"  # pathway computation: "sparse" (grouped GEMM, k/N of the FLOPs) or "dense_masked"
    grouping: str = "contiguous"  # which neurons form a pathway: "contiguous" (blocks in the base model's
    # order), "coactivation" (balanced k-means of the neurons' activation patterns, MoEfication) or
    # "weights" (balanced k-means of their input weights); routelib.models.grouping
    grouping_windows: int = 8  # windows per domain of grouping_split whose activations "coactivation" clusters
    grouping_split: str = "test"  # corpus split of those windows: neither trained on nor evaluated
    grouping_iters: int = 30  # balanced k-means iterations at most (stops earlier when no label changes)
    grouping_top_fraction: float = 0.1  # "coactivation": a neuron is active on a token when its |activation|
    # is among the token's top this fraction (0: cluster the magnitudes themselves)
    compare_switch: bool = False  # also fine-tune a second arm with the Switch loss instead of GLBL
    unrouted_control: bool = False  # also fine-tune the same parameters with routing off (mode "all"):
    # how much of the fine-tune's gain is adaptation to the corpus rather than recovery from routing
    # --- fine-tuning (LM loss + load balancing, routelib.train) ---
    train_scope: str = "router+mlp"  # trained parameters: "router", "router+mlp" (routers + routed MLPs) or "full"
    domains: str = "code,math,fiction,encyclopedic,news"  # corpus domains for training and evaluation
    seq_len: int = 64  # tokens per training and evaluation window
    batch_size: int = 8  # windows per optimizer step
    steps: int = 30  # optimizer steps
    lr: float = 1e-3  # peak learning rate (AdamW, warm-up + cosine)
    warmup_steps: int = 3  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW decay on matrices (0: do not pull pretrained weights to zero)
    seed: int = 0  # router initialisation, data order, controls
    ckpt_every: int = 0  # checkpoint every this many steps (0: only at the end)
    out_dir: str = "runs/01_train_pathway_llm"  # checkpoints and metrics (relative to the repo root)
    # --- evaluation, analysis, benchmark ---
    eval_windows: int = 8  # held-out (validation) windows per domain: perplexity and routing analysis
    eval_batch_size: int = 8  # windows per evaluation forward pass
    probe_windows: int = 5  # held-out windows (domains in turn) for the per-layer sensitivity and
    # pathway-subset error analyses; 0 skips both
    paper_claims: bool = True  # sections 8-9 (paths, control and content: tables, no dashboard); False skips them
    min_load: float = 0.01  # a pathway counts as used when it gets >= this share of a layer's selections
    top_tokens: int = 10  # tokens listed per pathway
    bench_tokens: int = 4096  # tokens through one pathway MLP in the sparse vs dense benchmark
    bench_min_time_s: float = 0.2  # time each benchmarked call for at least this long
    device: str = "auto"  # "auto" (cuda when available) or "cpu"

    def __post_init__(self):
        if self.train_scope not in TRAIN_SCOPES:
            raise ConfigError(f"PathwayStudyConfig.train_scope={self.train_scope!r}: choose one of {TRAIN_SCOPES}")
        if self.router_init not in ROUTER_INITS:
            raise ConfigError(f"PathwayStudyConfig.router_init={self.router_init!r}: choose one of {ROUTER_INITS}")
        if self.impl not in IMPLS:
            raise ConfigError(f"PathwayStudyConfig.impl={self.impl!r}: choose one of {IMPLS}")
        if self.grouping not in GROUPINGS:
            raise ConfigError(f"PathwayStudyConfig.grouping={self.grouping!r}: choose one of {GROUPINGS}")
        check_split(self.grouping_split)
        if not 0 <= self.grouping_top_fraction < 1:
            raise ConfigError(f"PathwayStudyConfig.grouping_top_fraction must be in [0, 1), got {self.grouping_top_fraction}")
        for name in ("grouping_windows", "grouping_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"PathwayStudyConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seq_len", "batch_size", "steps", "eval_windows", "eval_batch_size", "bench_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"PathwayStudyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.probe_windows < 0:
            raise ConfigError(f"PathwayStudyConfig.probe_windows must be >= 0, got {self.probe_windows}")
        if self.first_routed_layer < 0:
            raise ConfigError(f"PathwayStudyConfig.first_routed_layer must be >= 0, got {self.first_routed_layer}")
        self.domain_list()
        self.explicit_layers()
        self.routing_config([])  # validates N, k, weights, momentum

    def domain_list(self) -> tuple[str, ...]:
        """The domains as a tuple, in the given order; ConfigError for an unknown one."""
        names = [d.strip() for d in self.domains.split(",") if d.strip()]
        if not names:
            raise ConfigError(f"PathwayStudyConfig.domains={self.domains!r}: name at least one of {DOMAINS}")
        return check_domains(names)

    def explicit_layers(self) -> tuple[int, ...] | None:
        """``routed_layers`` parsed ("" -> None)."""
        if not self.routed_layers.strip():
            return None
        try:
            layers = tuple(int(v) for v in self.routed_layers.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"PathwayStudyConfig.routed_layers={self.routed_layers!r}: expected comma-separated "
                              f"layer indices like '12,16,20'") from None
        if not layers or min(layers) < 0:
            raise ConfigError(f"PathwayStudyConfig.routed_layers={self.routed_layers!r}: need non-negative indices")
        return layers

    def layers(self, num_layers: int) -> list[int]:
        """The decoder layers to route in a model of ``num_layers`` layers."""
        explicit = self.explicit_layers()
        if explicit is not None:
            bad = [i for i in explicit if i >= num_layers]
            if bad:
                raise ConfigError(f"routed_layers {bad} out of range: the model has {num_layers} layers")
            return sorted(set(explicit))
        last = num_layers - 1 if self.last_routed_layer < 0 else self.last_routed_layer
        if not self.first_routed_layer <= last < num_layers:
            raise ConfigError(f"need 0 <= first_routed_layer ({self.first_routed_layer}) <= last_routed_layer "
                              f"({self.last_routed_layer} -> {last}) < {num_layers} layers")
        return list(range(self.first_routed_layer, last + 1, self.route_every_n_layers))

    def routing_config(self, layers: list[int]) -> RoutingConfig:
        """The RoutingConfig routing exactly ``layers`` (an empty list only validates the fields)."""
        return RoutingConfig(
            num_pathways=self.num_pathways, top_k_pathways=self.top_k_pathways,
            route_every_n_layers=self.route_every_n_layers, routed_layers=tuple(layers) or None,
            gate_scale=self.gate_scale, glbl_weight=self.glbl_weight, switch_weight=self.switch_weight,
            momentum=self.momentum, router_init=self.router_init, router_init_std=self.router_init_std,
            impl=self.impl)

    def run_dir(self) -> Path:
        out = Path(self.out_dir)
        return out if out.is_absolute() else paths.REPO_ROOT / out

    def device_(self) -> torch.device:
        return resolve_device(self.device)


# ------------------------------------------------------------------------------------ model + data
def load_base(cfg: PathwayStudyConfig):
    """(pretrained model in eval mode on cfg's device, its own tokenizer): the corpus is tokenised
    with the model's tokenizer, so every id has an embedding."""
    model, tok = load_pretrained(cfg.model_name, device=cfg.device_())
    if len(tok) > model.config.vocab_size:
        raise ConfigError(f"{cfg.model_name!r}: its tokenizer has {len(tok)} tokens but the model only "
                          f"{model.config.vocab_size} embeddings")
    return model, tok


def grouping_sample(cfg: PathwayStudyConfig, tokenizer) -> torch.Tensor:
    """(W, T) token windows whose MLP activations the "coactivation" grouping clusters:
    ``grouping_windows`` windows spread over each domain's ``grouping_split``, domains in turn."""
    data = {d: eval_batches(token_stream(d, cfg.grouping_split, tokenizer), cfg.seq_len, cfg.eval_batch_size,
                            max_windows=cfg.grouping_windows) for d in cfg.domain_list()}
    return probe_batch(data, sum(x.shape[0] for b in data.values() for x, _ in b))[0]


def apply_grouping(model: torch.nn.Module, cfg: PathwayStudyConfig, layers: list[int],
                   tokenizer=None, orders: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Reorder the neurons of each of ``layers``' MLPs in place so that cfg.grouping's groups are the
    contiguous pathways (:mod:`routelib.models.grouping`); the model computes the same function.
    Returns {layer: order} (new neuron j = old neuron order[j]); {} for "contiguous". "coactivation"
    clusters the activations of the un-routed model on :func:`grouping_sample` (needs ``tokenizer``).
    ``orders`` (e.g. a run's stored grouping) are applied instead of computing them."""
    blocks = decoder_layers(model)
    if orders is not None:
        if cfg.grouping == "contiguous" or sorted(orders) != sorted(layers):
            raise ConfigError(f"apply_grouping: orders for layers {sorted(orders)} do not fit grouping "
                              f"{cfg.grouping!r} of layers {sorted(layers)}")
        for i in layers:
            permute_neurons(blocks[i].mlp, orders[i])
        return dict(orders)
    if cfg.grouping == "contiguous":
        return {}
    hidden = {}
    if cfg.grouping == "coactivation":
        if tokenizer is None:
            raise ConfigError("grouping='coactivation' needs the tokenizer (build_routed(..., tokenizer=tok)) "
                              "to read the text sample it clusters activations on")
        hidden = mlp_hidden(model, layers, grouping_sample(cfg, tokenizer))  # {layer: (n, I)}
    orders = {}
    for i in layers:
        orders[i] = neuron_groups(blocks[i].mlp, cfg.num_pathways, cfg.grouping, hidden=hidden.get(i),
                                  iters=cfg.grouping_iters, seed=cfg.seed + i, top_fraction=cfg.grouping_top_fraction)
        permute_neurons(blocks[i].mlp, orders[i])
        hidden.pop(i, None)
    return orders


def save_orders(path: Path, orders: dict[int, torch.Tensor]) -> None:
    """A run's neuron grouping, {layer: order (I,)}, as a small npz (int16 orders, layer keys "L<i>")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{f"L{i}": o.numpy().astype(np.int16) for i, o in sorted(orders.items())})


def load_orders(path: str | Path) -> dict[int, torch.Tensor]:
    """:func:`save_orders`' file back as {layer: int64 order}."""
    with np.load(path) as z:
        return {int(k[1:]): torch.from_numpy(z[k].astype(np.int64)) for k in z.files}


def build_routed(model: torch.nn.Module, cfg: PathwayStudyConfig, seed: int | None = None,
                 tokenizer=None, orders: dict[int, torch.Tensor] | None = None) -> RoutedLLM:
    """Wrap ``model`` (edited in place) so that cfg's layers are routed, after grouping their neurons
    by cfg.grouping (:func:`apply_grouping`; ``tokenizer`` needed for "coactivation", ``orders`` reuses
    a stored grouping); router weights
    drawn from ``seed`` (default cfg.seed), so two calls give the same untrained routers. The orders
    are kept as ``routed.neuron_orders``; :func:`unroute` gives back the model as it was."""
    layers = cfg.layers(len(decoder_layers(model)))
    orders = apply_grouping(model, cfg, layers, tokenizer, orders)
    torch.manual_seed(cfg.seed if seed is None else seed)
    routed = RoutedLLM(model, cfg.routing_config(layers))
    routed.neuron_orders = orders
    return routed


def unroute(routed: RoutedLLM) -> torch.nn.Module:
    """Undo :func:`build_routed`: the original MLPs back in place, their neurons in the original order."""
    model = routed.unwrap()
    blocks = decoder_layers(model)
    for i, order in getattr(routed, "neuron_orders", {}).items():
        permute_neurons(blocks[i].mlp, inverse_order(order))
    routed.neuron_orders = {}
    return model


def set_trainable(routed: RoutedLLM, scope: str) -> int:
    """Freeze everything but ``scope``: "router" (the routers), "router+mlp" (routers and the routed
    MLPs' weights) or "full" (every parameter). Returns the number of trainable parameters. Layers
    below the first routed one receive no gradient under the first two scopes, so the backward pass
    stops there."""
    if scope not in TRAIN_SCOPES:
        raise ConfigError(f"train scope {scope!r}: choose one of {TRAIN_SCOPES}")
    for p in routed.parameters():
        p.requires_grad_(scope == "full")
    if scope != "full":
        for mlp in routed.pathway_mlps().values():
            for p in (mlp.parameters() if scope == "router+mlp" else mlp.router.parameters()):
                p.requires_grad_(True)
    return sum(p.numel() for p in routed.parameters() if p.requires_grad)


def training_batches(cfg: PathwayStudyConfig, tokenizer) -> TokenWindows:
    """Random windows over the train split of cfg's domains (their natural mixture)."""
    return TokenWindows(token_stream(cfg.domain_list(), "train", tokenizer), cfg.seq_len, cfg.batch_size,
                        seed=cfg.seed)


def domain_eval_data(cfg: PathwayStudyConfig, tokenizer, split: str = "validation") -> dict[str, list]:
    """Held-out (x, y) batches per domain: ``eval_windows`` non-overlapping windows spread over the
    domain's split, the same for every model evaluated."""
    return {d: eval_batches(token_stream(d, split, tokenizer), cfg.seq_len, cfg.eval_batch_size,
                            max_windows=cfg.eval_windows) for d in cfg.domain_list()}


def probe_batch(eval_data: dict[str, list], windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``windows`` held-out windows taken from the domains in turn (first windows first) -> (x, y),
    each (windows, T): a small mixed-domain batch for the per-layer analyses."""
    xs = [torch.cat([x for x, _ in b]) for b in eval_data.values()]  # per domain: (W_d, T)
    ys = [torch.cat([y for _, y in b]) for b in eval_data.values()]  # per domain: (W_d, T)
    order = [(d, j) for j in range(max(map(len, xs))) for d in range(len(xs)) if j < len(xs[d])]
    if not 1 <= windows <= len(order):
        raise ConfigError(f"probe_batch: need 1 <= windows <= {len(order)} held-out windows, got {windows}")
    pick = order[:windows]
    return torch.stack([xs[d][j] for d, j in pick]), torch.stack([ys[d][j] for d, j in pick])  # (W, T) each


# ------------------------------------------------------------------- what routing costs, per layer
def _nll(model, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = model(input_ids=x, use_cache=False).logits.float()  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


@torch.no_grad()
def layer_sensitivity(model: torch.nn.Module, cfg: PathwayStudyConfig, x: torch.Tensor, y: torch.Tensor,
                      layers: list[int], tokenizer=None) -> pd.DataFrame:
    """Mean next-token NLL on (x, y) with *one* layer routed at a time by an untrained router
    (cfg's N, k, gates and init seed), for each of ``layers``; ``delta_nll`` is the increase over
    the un-routed model (``attrs["base_nll"]``) and ``ppl_ratio`` = exp(delta_nll). ``model`` is
    wrapped and unwrapped in place, and comes back unchanged."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    base = _nll(model, x, y)
    rows = []
    for layer in layers:
        routed = build_routed(model, dataclasses.replace(cfg, routed_layers=str(layer)), tokenizer=tokenizer)
        try:
            nll = _nll(routed, x, y)
        finally:
            unroute(routed)
        rows.append({"layer": layer, "nll": nll, "delta_nll": nll - base, "ppl_ratio": math.exp(nll - base)})
    df = pd.DataFrame(rows)
    df.attrs["base_nll"] = base
    return df


@torch.no_grad()
def selection_error(routed: RoutedLLM, x: torch.Tensor, seed: int = 0) -> pd.DataFrame:
    """How well k of N pathways stand in for the whole MLP, per routed layer, on the exact inputs of
    the un-routed forward pass (``mode="all"``): the relative error ||y - y_S|| / ||y|| of the MLP's
    output y (bias excluded), mean over tokens, when only the pathways S are kept --

    - ``router``: the router's choice, weighted by its gates (what the routed model computes);
    - ``random``: k pathways drawn uniformly, unit weights (the random top-k control);
    - ``best_k``: the k largest marginal scores 2<o_p, y> - ||o_p||^2, unit weights: the best
      k-subset if the pathway outputs o_p were orthogonal (a near-oracle the router could aim at).

    Pathway outputs are computed from the output projection's input, so any supported MLP works."""
    mlps = routed.pathway_mlps()
    modes = {i: m.mode for i, m in mlps.items()}
    hidden, hooks = {}, []
    for i, m in mlps.items():
        out_proj = getattr(m.mlp, m.out_name)
        hooks.append(out_proj.register_forward_pre_hook(lambda mod, args, i=i: hidden.__setitem__(i, args[0])))
    was = routed.training
    routed.eval().set_mode("all")
    try:
        routed(input_ids=x.to(next(routed.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for i, m in mlps.items():
            m.mode = modes[i]
        routed.train(was)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, m in mlps.items():
        npw, size, k = m.cfg.num_pathways, m.pathway_size, m.cfg.top_k_pathways
        h = hidden[i].reshape(-1, npw, size).float()  # (n, N, P)
        n = h.shape[0]
        blocks = h.new_zeros(n, npw, npw, size)  # (n, N, N, P): pathway p keeps only its own neurons
        blocks[:, torch.arange(npw), torch.arange(npw)] = h
        out_proj = getattr(m.mlp, m.out_name)
        o = out_proj(blocks.view(n, npw, npw * size).to(hidden[i].dtype)).float()  # (n, N, H)
        if getattr(out_proj, "bias", None) is not None:
            o = o - out_proj.bias.float()
        y = o.sum(dim=1)  # (n, H) the whole MLP (bias excluded)
        norm = y.norm(dim=-1).clamp_min(1e-12)  # (n,)

        def err(idx, w=None):
            kept = torch.gather(o, 1, idx.unsqueeze(-1).expand(-1, -1, o.shape[-1]))  # (n, k, H)
            if w is not None:
                kept = kept * w.unsqueeze(-1)
            return ((y - kept.sum(dim=1)).norm(dim=-1) / norm).mean().item()

        last = m.last
        chosen = last.indices.reshape(n, k).to(o.device)  # (n, k)
        gates = last.weights.reshape(n, k).to(o.device).float()  # (n, k)
        rand = torch.argsort(torch.rand(n, npw, generator=gen), dim=1)[:, :k].to(o.device)  # (n, k)
        best = (2 * (o * y.unsqueeze(1)).sum(-1) - o.pow(2).sum(-1)).topk(k, dim=1).indices  # (n, k)
        rows.append({"layer": i, "router": err(chosen, gates), "random": err(rand), "best_k": err(best)})
    return pd.DataFrame(rows).set_index("layer")


@torch.no_grad()
def grouping_error(model: torch.nn.Module, cfg: PathwayStudyConfig, x: torch.Tensor, tokenizer=None,
                   groupings: tuple[str, ...] = ("contiguous", "coactivation")) -> pd.DataFrame:
    """:func:`selection_error` of cfg's routed layers, before any fine-tuning, for each neuron grouping:
    how much of each MLP's output the best k of N pathways (``best_k``), the untrained router's k
    (``router``) and k random ones (``random``) leave out, on the held-out windows ``x`` (W, T).
    Rows: layers; columns: (grouping, measure). ``model`` is routed and un-routed in place per
    grouping, and comes back unchanged (the permutations are undone exactly)."""
    frames = {}
    for grouping in groupings:
        routed = build_routed(model, dataclasses.replace(cfg, grouping=grouping), tokenizer=tokenizer)
        try:
            frames[grouping] = selection_error(routed, x, seed=cfg.seed)
        finally:
            unroute(routed)
    return pd.concat(frames, axis=1, names=["grouping", "measure"])


# ------------------------------------------------------------------------------------- fine-tuning
def routed_lm_loss(model, x: torch.Tensor, y: torch.Tensor):
    """``loss_fn`` for :func:`routelib.train.train`: next-token cross-entropy + the RoutedLLM's
    weighted aux loss; logs the LM loss, the unweighted GLBL and Switch losses (mean over routed
    layers) and the busiest pathway's share of a layer's selections in this batch (max over layers)."""
    out = model(input_ids=x, use_cache=False)
    lm = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)  # ()
    max_load = torch.stack([r.frequency.max() for r in out.routing]).max()  # ()
    return lm + out.aux_loss.to(lm.dtype), {"lm_loss": lm.detach(), "glbl": out.glbl.detach(),
                                            "switch": out.switch.detach(), "max_load": max_load}


def run_hash(cfg: PathwayStudyConfig, routing: RoutingConfig, tcfg: TrainConfig) -> str:
    """8 hex digits over everything that shapes a fine-tune (not stop_step, device or the bar)."""
    train_fields = {k: v for k, v in dataclasses.asdict(tcfg).items()
                    if k not in ("stop_step", "out_dir", "device", "progress")}
    identity = [cfg.model_name, cfg.domain_list(), cfg.seq_len, cfg.batch_size, cfg.train_scope,
                dataclasses.asdict(routing), train_fields]
    if cfg.grouping != "contiguous":  # contiguous runs keep the hashes they had before groupings existed
        identity.append([cfg.grouping, cfg.grouping_windows, cfg.grouping_split, cfg.grouping_iters, cfg.seed,
                         cfg.grouping_top_fraction])
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]


def fine_tune(routed: RoutedLLM, cfg: PathwayStudyConfig, batch_fn, name: str = "glbl",
              stop_step: int | None = None, callbacks=(), *, eval_data=None, eval_every: int = 0,
              log_every: int | None = None) -> TrainResult:
    """Fine-tune ``routed`` in place (cfg.train_scope) with :func:`routed_lm_loss`, in whatever mode
    it is in ("all" = routing off: the un-routed control). Checkpoints go to
    ``out_dir/checkpoints/<name>-<hash>``: an interrupted run resumes where it stopped, a finished
    one is loaded instead of retrained, other parameters start afresh. ``stop_step`` ends early with
    the schedule unchanged (run the rest later). ``eval_data`` (``eval_fn(model) -> {name: value}``
    or (x, y) batches) is evaluated every ``eval_every`` steps and at ``stop_step``; ``log_every``
    (default: 30 records per run) sets the history's density."""
    n_trainable = set_trainable(routed, cfg.train_scope)
    if n_trainable == 0:
        raise ConfigError("fine_tune: nothing to train (no routed layers?)")
    tcfg = TrainConfig(
        max_steps=cfg.steps, stop_step=stop_step, lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, cfg.steps),
        weight_decay=cfg.weight_decay, seed=cfg.seed, log_every=log_every or max(1, cfg.steps // 30),
        eval_every=eval_every, ckpt_every=cfg.ckpt_every, device=cfg.device,
        save_frozen=False)  # the frozen base comes from the asset package: store only what training changes
    tcfg.out_dir = str(cfg.run_dir() / "checkpoints" / f"{name}-{run_hash(cfg, routed.routing_config, tcfg)}")
    routed.train()
    try:
        return train(routed, batch_fn, tcfg, eval_data=eval_data, loss_fn=routed_lm_loss, callbacks=callbacks,
                     resume=True)
    finally:
        routed.eval()


def switch_arm(cfg: PathwayStudyConfig) -> PathwayStudyConfig:
    """The comparison arm: the Switch loss (per-batch frequencies, no momentum, no global batch) at
    the weight GLBL had, and no GLBL."""
    return dataclasses.replace(cfg, glbl_weight=0.0, switch_weight=cfg.glbl_weight + cfg.switch_weight)


# -------------------------------------------------------------------------------------- evaluation
@dataclass
class RoutingSample:
    """Routing of every held-out position, flattened in (domain, window, position) order."""

    tokens: np.ndarray  # (n,) int64 input token id at each position
    domains: np.ndarray  # (n,) str domain of each position
    seq_ids: np.ndarray  # (n,) int64 window index: contexts never cross windows
    selections: dict[int, np.ndarray] = field(default_factory=dict)  # {layer: (n, k) int64 chosen pathways}

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class EvalResult:
    """Held-out perplexity per domain (and ``overall``, token-weighted) and, for a routed model,
    the routing of every position."""

    perplexity: dict[str, float]  # {domain: exp(mean next-token NLL)} + "overall"
    sample: RoutingSample | None  # None for a model without routed layers


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_data: dict[str, list]) -> EvalResult:
    """One no-grad pass over ``eval_data`` ({domain: [(x, y), ...]}): perplexity per domain and,
    when ``model`` is a :class:`RoutedLLM`, the pathways chosen at every position and routed layer."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    routed = isinstance(model, RoutedLLM)
    ppl, loss_total, n_total = {}, 0.0, 0
    tokens, domains, seqs, sel = [], [], [], {}
    n_seq = 0
    try:
        for domain, batches in eval_data.items():
            loss_sum, n = 0.0, 0
            for x, y in batches:
                out = model(input_ids=x.to(device), use_cache=False)
                logits = out.logits.float()  # (B, T, V)
                loss_sum += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
                n += y.numel()
                if routed:
                    b, t = x.shape
                    tokens.append(x.reshape(-1).numpy().astype(np.int64))  # (B*T,)
                    domains.append(np.full(b * t, domain, dtype=object))
                    seqs.append(np.repeat(np.arange(n_seq, n_seq + b), t))  # (B*T,)
                    n_seq += b
                    for r in out.routing:
                        sel.setdefault(r.layer, []).append(r.indices.reshape(b * t, -1).cpu().numpy())  # (B*T, k)
            if n == 0:
                raise ConfigError(f"evaluate: no held-out tokens for domain {domain!r}")
            ppl[domain] = math.exp(loss_sum / n)
            loss_total, n_total = loss_total + loss_sum, n_total + n
    finally:
        model.train(was)
    ppl["overall"] = math.exp(loss_total / n_total)
    sample = None
    if routed:
        sample = RoutingSample(np.concatenate(tokens), np.concatenate(domains).astype(str), np.concatenate(seqs),
                               {layer: np.concatenate(v).astype(np.int64) for layer, v in sel.items()})
    return EvalResult(ppl, sample)


def perplexity_table(results: dict[str, EvalResult]) -> pd.DataFrame:
    """{model name: EvalResult} -> DataFrame indexed by model, columns ``ppl_<domain>`` (the form
    :func:`routelib.plots.plot_perplexity_by_domain` draws) and ``ratio_to_base`` on the overall value
    (the first entry is the base)."""
    rows = {name: {f"ppl_{d}": v for d, v in r.perplexity.items()} for name, r in results.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    table["ratio_to_base"] = table["ppl_overall"] / table["ppl_overall"].iloc[0]
    return table


# -------------------------------------------------------------------------------- monosemanticity
def control_selections(trained: RoutingSample, untrained: RoutingSample, num_pathways: int,
                       seed: int = 0) -> dict[str, dict[int, np.ndarray]]:
    """{router name (:data:`ROUTERS`): {layer: (n, k) selections}} on the same positions: the
    fine-tuned router, the untrained router, a uniformly random top-k router and the fine-tuned
    choices permuted across positions (same per-pathway loads, no token association)."""
    if not np.array_equal(trained.tokens, untrained.tokens) or trained.selections.keys() != untrained.selections.keys():
        raise ConfigError("control_selections: the two samples must cover the same positions and layers")
    random, permuted = {}, {}
    for j, (layer, idx) in enumerate(sorted(trained.selections.items())):
        random[layer] = metrics.random_topk(len(trained), num_pathways, idx.shape[1], seed=seed + j)
        permuted[layer] = metrics.permuted_routing(idx, seed=seed + j)
    return dict(zip(ROUTERS, (dict(sorted(trained.selections.items())), dict(sorted(untrained.selections.items())),
                              random, permuted)))


def layer_metrics(sample: RoutingSample, selections: dict[int, np.ndarray], num_pathways: int, vocab_size: int,
                  min_load: float = 0.01, top_n: int = 10) -> dict[int, metrics.PathwayMetrics]:
    """{layer: :class:`routelib.metrics.PathwayMetrics`} of one router on the sample's tokens."""
    return {layer: metrics.pathway_metrics(sample.tokens, idx, num_pathways, vocab_size, top_n=top_n,
                                           min_load=min_load)
            for layer, idx in selections.items()}


def router_metrics(sample: RoutingSample, routers: dict[str, dict[int, np.ndarray]], num_pathways: int,
                   vocab_size: int, min_load: float = 0.01, top_n: int = 10) -> dict[str, dict[int, metrics.PathwayMetrics]]:
    """:func:`layer_metrics` of every router: {router: {layer: PathwayMetrics}}."""
    return {name: layer_metrics(sample, sel, num_pathways, vocab_size, min_load, top_n) for name, sel in routers.items()}


def summary_table(per_router: dict[str, dict[int, metrics.PathwayMetrics]]) -> pd.DataFrame:
    """One row per (router, layer): :meth:`PathwayMetrics.summary` (mean purity, utilisation, load
    balance...)."""
    rows = [{"router": name, "layer": layer, **m.summary()} for name, by_layer in per_router.items()
            for layer, m in by_layer.items()]
    return pd.DataFrame(rows)


def pathway_purities(per_router: dict[str, dict[int, metrics.PathwayMetrics]]) -> pd.DataFrame:
    """One row per (router, layer, pathway): load, selections, purity (H_max = log V) and the original
    project's purity_distinct."""
    rows = [{"router": name, "layer": layer, "pathway": p, "load": float(m.load[p]),
             "selections": int(m.selections[p]), "purity": float(m.purity[p]),
             "purity_distinct": float(m.purity_distinct[p])}
            for name, by_layer in per_router.items() for layer, m in by_layer.items() for p in range(m.num_pathways)]
    return pd.DataFrame(rows)


def headline_purity(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean over layers of each router's headline numbers (rows: routers in their given order)."""
    cols = ["mean_purity", "mean_purity_distinct", "utilisation", "load_balance", "max_load"]
    order = list(dict.fromkeys(summary["router"]))
    return summary.groupby("router", sort=False)[cols].mean().loc[order]


def purity_excess(sample: RoutingSample, routers: dict[str, dict[int, np.ndarray]], num_pathways: int,
                  vocab_size: int, seed: int = 0) -> pd.DataFrame:
    """Per (router, layer): mean purity, the mean purity of the *same* router's choices permuted
    across positions, and ``excess`` = the difference. The permutation keeps every pathway's load,
    so the plug-in entropy's bias (fewer selections look purer) cancels: what remains is the
    association between tokens and pathways. ~0 for a random router by construction."""
    rows = []
    for name, sel in routers.items():
        for j, (layer, idx) in enumerate(sel.items()):
            own = metrics.pathway_metrics(sample.tokens, idx, num_pathways, vocab_size, top_n=0).mean_purity
            shuffled = metrics.pathway_metrics(sample.tokens, metrics.permuted_routing(idx, seed=seed + j),
                                               num_pathways, vocab_size, top_n=0).mean_purity
            rows.append({"router": name, "layer": layer, "mean_purity": own, "permuted_purity": shuffled,
                         "excess": own - shuffled})
    return pd.DataFrame(rows)


def purity_per_domain(sample: RoutingSample, routers: dict[str, dict[int, np.ndarray]], num_pathways: int,
                      vocab_size: int) -> pd.DataFrame:
    """Load-weighted mean purity of each router's pathways on each domain's tokens, averaged over
    routed layers: rows = domain, columns = routers (:func:`routelib.metrics.purity_by_domain`)."""
    rows = []
    for name, sel in routers.items():
        for layer, idx in sel.items():
            df = metrics.purity_by_domain(sample.tokens, idx, sample.domains, num_pathways, vocab_size)
            df = df[df["selections"] > 0]
            for domain, g in df.groupby("domain"):
                rows.append({"router": name, "layer": layer, "domain": domain,
                             "purity": float(np.sum(g["load"] * g["purity"]) / g["load"].sum())})
    long = pd.DataFrame(rows)
    return long.groupby(["domain", "router"], sort=False)["purity"].mean().unstack("router")[list(routers)]


def specialised_pathways(per_router: dict[str, dict[int, metrics.PathwayMetrics]], decode, n: int = 10,
                         router: str = "fine-tuned", control: str = "permuted") -> pd.DataFrame:
    """The ``n`` pathways of ``router`` whose purity exceeds most that of the same pathway under
    ``control`` (the permuted control has the same load per pathway, so the same sampling bias),
    with their load, purity, top tokens and most enriched tokens with their lift over the corpus
    (``decode(id) -> str``)."""
    rows = []
    for layer, m in per_router[router].items():
        ref = per_router[control][layer]
        for p in range(m.num_pathways):
            if m.selections[p] == 0:
                continue
            enriched = m.enriched_tokens(p, n=5)
            rows.append({"layer": layer, "pathway": p, "load": float(m.load[p]), "purity": float(m.purity[p]),
                         f"purity_{control}": float(ref.purity[p]),
                         "excess": float(m.purity[p] - ref.purity[p]),
                         "top_tokens": " ".join(repr(decode(t)) for t, _ in m.top_tokens[p][:6]),
                         "enriched": " ".join(f"{decode(t)!r}({lift:.0f}x)" for t, _, lift in enriched)})
    if not rows:
        raise ConfigError(f"specialised_pathways: router {router!r} selected no pathway")
    return pd.DataFrame(rows).sort_values("excess", ascending=False).head(n).reset_index(drop=True)


def pathway_domains(sample: RoutingSample, layer: int, num_pathways: int) -> pd.DataFrame:
    """Share of each pathway's selections coming from each domain at ``layer``, and its lift over
    the domain's share of positions (:func:`routelib.metrics.domain_specialisation`)."""
    return metrics.domain_specialisation(sample.selections[layer], sample.domains, num_pathways).set_index("pathway")


def pathway_contexts(sample: RoutingSample, layer: int, pathway: int, decode_ids, n_examples: int = 4,
                     window: int = 12, seed: int = 0) -> list[dict]:
    """Random held-out positions routed to ``pathway`` at ``layer``: [{"domain", "context" (the
    ``window`` tokens before, decoded), "token" (the routed token, decoded)}]. ``decode_ids(list of
    ids) -> str``."""
    out = []
    for pos, ids in metrics.pathway_examples(sample.selections[layer], pathway, n_examples, seed=seed,
                                             seq_ids=sample.seq_ids, window=window, token_ids=sample.tokens):
        ids = [int(t) for t in ids]
        out.append({"domain": str(sample.domains[pos]), "context": decode_ids(ids[:-1]), "token": decode_ids(ids[-1:])})
    return out


# ------------------------------------------------------------------------------------- speed + claims
def pathway_speed(cfg: PathwayStudyConfig, hidden_size: int, intermediate_size: int) -> pd.DataFrame:
    """The original dense MLP, ``dense_masked`` and ``sparse`` pathways (k of N) of one MLP of the
    model's shape on ``bench_tokens`` tokens, forward only, timed in one run on cfg's device
    (:func:`routelib.models.pathways.bench_pathway_mlp`); adds the analytic FLOP share."""
    rcfg = cfg.routing_config([])
    df = bench_pathway_mlp(hidden_size, intermediate_size, rcfg, n_tokens=cfg.bench_tokens,
                           device=str(cfg.device_()), min_time_s=cfg.bench_min_time_s)
    dense, sparse = pathway_mlp_flops_per_token(hidden_size, intermediate_size, rcfg)
    df.attrs["flop_share_sparse"] = sparse / dense
    return df


def seed_claims(table: pd.DataFrame, headline: pd.DataFrame, speed: pd.DataFrame, cfg: PathwayStudyConfig,
                routed: list[int], num_layers: int) -> pd.DataFrame:
    """The original project's claims beside this run: ``table`` from :func:`perplexity_table` (rows base,
    untrained, fine-tuned), ``headline`` from :func:`headline_purity` (with a ``purity_excess``
    column from :func:`purity_excess` when there is one), ``speed`` from :func:`pathway_speed`."""
    s = speed.set_index("name")
    ft, un, rnd, perm = (headline.loc[r] for r in ROUTERS)
    base, before, after = table["ppl_overall"].iloc[:3]
    rows = [
        ("routing every other layer, 16 pathways, top-4", "layers 0, 2, 4, ... of 8",
         f"{len(routed)} of {num_layers} layers routed ({', '.join(map(str, routed))}), "
         f"{cfg.num_pathways} pathways, top-{cfg.top_k_pathways}"),
        ("~75 % less MLP compute (never measured)", "4 of 16 pathways",
         f"{100 * (1 - speed.attrs['flop_share_sparse']):.0f} % fewer FLOPs per routed MLP; measured "
         f"sparse vs dense-masked {s.loc['sparse', 'speedup']:.2f}x, vs the original MLP "
         f"{s.loc['dense_mlp', 'median_ms'] / s.loc['sparse', 'median_ms']:.2f}x ({speed['device'].iloc[0]}, "
         f"{cfg.bench_tokens} tokens)"),
        ("GLBL prevents pathway collapse", "utilisation ~1",
         f"utilisation {ft.utilisation:.2f} (untrained {un.utilisation:.2f}), load balance "
         f"{ft.load_balance:.3f}, busiest pathway {100 * ft.max_load:.1f} % of selections (uniform "
         f"{100 / cfg.num_pathways:.2f} %)"),
        ("pathways become monosemantic (purity)", "average purity reported alone",
         f"mean purity {ft.mean_purity:.3f} vs untrained {un.mean_purity:.3f}, random top-k "
         f"{rnd.mean_purity:.3f}, permuted {perm.mean_purity:.3f} (H_max = log V)"
         + (f"; excess over own permutation: fine-tuned {ft.purity_excess:+.4f}, untrained "
            f"{un.purity_excess:+.4f}, random {rnd.purity_excess:+.4f}" if "purity_excess" in headline else "")),
        ("routing keeps the model working", "not measured against the base",
         f"perplexity {base:.2f} base -> {before:.2f} routed (untrained) -> {after:.2f} fine-tuned"),
    ]
    return pd.DataFrame(rows, columns=["claim", "original project", "this run"]).set_index("claim")


__all__ = [
    "apply_grouping",
    "build_routed",
    "control_selections",
    "domain_eval_data",
    "EvalResult",
    "evaluate",
    "fine_tune",
    "grouping_error",
    "grouping_sample",
    "headline_purity",
    "layer_metrics",
    "layer_sensitivity",
    "load_base",
    "load_orders",
    "pathway_contexts",
    "pathway_domains",
    "pathway_purities",
    "pathway_speed",
    "PathwayStudyConfig",
    "perplexity_table",
    "probe_batch",
    "purity_excess",
    "purity_per_domain",
    "routed_lm_loss",
    "router_metrics",
    "ROUTERS",
    "RoutingSample",
    "run_hash",
    "save_orders",
    "seed_claims",
    "selection_error",
    "set_trainable",
    "specialised_pathways",
    "summary_table",
    "switch_arm",
    "TRAIN_SCOPES",
    "training_batches",
    "unroute",
]
