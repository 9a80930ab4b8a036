"""Routing traces as arrays for next-layer expert prediction, and the hidden states the routers read (notebook 05).

:class:`RoutingData` holds a trace directory (:mod:`routelib.routing.record.traces`) as arrays, one row per
token: the top-k experts and gate weights of every MoE layer, the token, its problem, position and
phase; :func:`load_routing` reads (and validates) one. The prediction task (:mod:`.predictors`) pairs
a source layer l with a *hop* h >= 1: rank the experts of layer ``l + h`` from what is known once
layer l's router has run; :func:`check_pair` and :func:`layer_pairs` say which pairs the traces
allow. A token's *journey* is its id and the expert set of every layer (:func:`journeys`;
:func:`repetition_table` counts how often a model repeats them).

The hidden state: for each MoE layer l, the input of its router (for Mixtral the residual stream after
layer l's attention, normalised by ``post_attention_layernorm``). It exists at the moment layer l's
routing is decided -- the same moment the routing-history predictors have their whole input -- so a
prediction for layer l+1 can overlap layer l's expert computation and layer l+1's attention (the
"speculative expert loading" of Eliseev & Mazur 2023, "Fast Inference of Mixture-of-Experts Language
Models with Offloading"; Fate, Fang et al. 2025). :func:`attach_hidden_states` recomputes it with one
forward pass per problem over the traced tokens (positions 0..n-1) and checks that the routers then
choose exactly the traced experts. If the model that routed the traces cannot be loaded,
:class:`HiddenStatesUnavailable` says so.

The pre-attention state (``pre_attention=True``): for each MoE layer l, the residual stream entering
its decoder block, before that block's attention (for block 0 the token embeddings; for block l > 0 the
output of block l - 1). At a decoding step it exists as soon as block l - 1 has finished -- before
layer l's attention, so one attention earlier than layer l's router input. It depends on the current
and earlier tokens only (causal attention), never on a later token or a later layer. The pre-attention
predictor (:mod:`.pre_attention`) reads it.

:class:`PredictorError` is the error of the whole prediction package (:mod:`.expert_metrics`,
:mod:`.splits` and :mod:`.predictors` raise it too); it lives here, in the module they all build on.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from routelib.device import resolve_device
from routelib.errors import RoutelibError
from routelib.routing.record.traces import load_traces, resolve_trace_dir, trace_arrays, trace_info


class PredictorError(RoutelibError, ValueError):
    """A bad request to a predictor or an evaluation: a hop beyond the last layer, an empty split,
    an unknown predictor name, a predictor used before fit."""


class HiddenStatesUnavailable(PredictorError):
    """The hidden-state predictors need the model that routed the traces, and it cannot be used."""


# ----------------------------------------------------------------------------------------------
# the data


@dataclass
class HiddenStates:
    """What each MoE layer's router read, recomputed from the model (see :func:`attach_hidden_states`)."""

    x: np.ndarray  # (N, L, H) float16: the input of the router of MoE layer l, per token
    routers: list  # the router modules, MoE-layer order (they score a hidden state: zero-shot)
    model_name: str  # name or path of the model
    agreement: float  # fraction of (token, layer) whose recomputed top-k set equals the traced one
    model: nn.Module | None = field(default=None, repr=False)  # the model itself (its MoE blocks are timed)
    pre_attention: np.ndarray | None = field(default=None, repr=False)  # (N, L, H) float16: the residual
    # stream entering the decoder block of MoE layer l, before its attention; None: not captured

    def take(self, rows: np.ndarray) -> "HiddenStates":
        pre = self.pre_attention[rows] if self.pre_attention is not None else None
        return dataclasses.replace(self, x=self.x[rows], pre_attention=pre)


@dataclass
class RoutingData:
    """Routing traces as arrays, one row per token (rows of a trace directory, in its order)."""

    experts: np.ndarray  # (N, L, k) int64 (int16 memory-mapped): top-k expert ids per MoE layer, highest weight first
    weights: np.ndarray  # (N, L, k) float32: their gate weights
    token_id: np.ndarray  # (N,) int64 (int32 memory-mapped): the token
    problem: np.ndarray  # (N,) int64 (int32 memory-mapped): index into ``problems`` (one sequence each)
    position: np.ndarray  # (N,) int64 (int32 memory-mapped): 0-based position in the sequence
    generated: np.ndarray  # (N,) bool: phase "generated" (else "prompt")
    problems: list  # (dataset, problem_id) of each problem index
    num_experts: int  # E
    vocab_size: int  # token ids are < vocab_size
    manifest: dict = field(repr=False)  # the trace manifest
    hidden: HiddenStates | None = field(default=None, repr=False)  # router inputs, once attached

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    def __len__(self) -> int:
        return self.experts.shape[0]

    @property
    def dataset(self) -> np.ndarray:
        """(N,) the dataset name of every row."""
        names = np.array([d for d, _ in self.problems], dtype=object)
        return names[self.problem] if len(self.problems) else np.array([], dtype=object)

    def take(self, rows: np.ndarray | slice) -> "RoutingData":
        """The rows ``rows`` (indices or a boolean mask: copies; a slice: views, so memory-mapped
        arrays stay mapped), hidden states included."""
        if not isinstance(rows, slice):
            rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        return dataclasses.replace(
            self, experts=self.experts[rows], weights=self.weights[rows], token_id=self.token_id[rows],
            problem=self.problem[rows], position=self.position[rows], generated=self.generated[rows],
            hidden=self.hidden.take(rows) if self.hidden is not None else None)

    @classmethod
    def from_frame(cls, df: pd.DataFrame, manifest: dict | None = None) -> "RoutingData":
        """From a :func:`load_traces` DataFrame (``df.attrs["manifest"]`` or ``manifest`` gives the layout)."""
        manifest = manifest if manifest is not None else df.attrs.get("manifest")
        arrays = trace_arrays(df, manifest)
        info = trace_info(manifest)
        keys = pd.MultiIndex.from_arrays([df["dataset"].to_numpy(), df["problem_id"].to_numpy()])
        codes, uniques = pd.factorize(keys, sort=False)
        vocab = info.vocab_size or max(int(df["token_id"].max()) + 1 if len(df) else 1, 1)
        return cls(experts=arrays.experts.astype(np.int64), weights=arrays.weights.astype(np.float32),
                   token_id=df["token_id"].to_numpy(np.int64), problem=np.asarray(codes, np.int64),
                   position=df["position"].to_numpy(np.int64), generated=(df["phase"] == "generated").to_numpy(),
                   problems=[tuple(u) for u in uniques], num_experts=info.num_experts, vocab_size=int(vocab),
                   manifest=manifest)


    @classmethod
    def from_columns(cls, cols) -> "RoutingData":
        """From :func:`routelib.routing.record.columns.open_columns`: the arrays stay memory-mapped (no copy)."""
        manifest = cols.manifest
        info = trace_info(manifest)
        vocab = info.vocab_size or _max_plus_one(cols.token_id)
        return cls(experts=cols.experts, weights=cols.weights, token_id=cols.token_id, problem=cols.problem,
                   position=cols.position, generated=cols.generated, problems=list(cols.problems),
                   num_experts=info.num_experts, vocab_size=int(vocab), manifest=manifest)


def _max_plus_one(values: np.ndarray, chunk: int = 1 << 22) -> int:
    """1 + the largest value (at least 1), read in chunks (a memory-mapped column stays unmapped)."""
    return max([1] + [int(values[i:i + chunk].max()) + 1 for i in range(0, len(values), chunk)])


def load_routing(trace_dir: str | os.PathLike, datasets: Sequence[str] | None = None, *,
                 memory_map: bool = False) -> RoutingData:
    """Read (and validate) a trace directory into :class:`RoutingData`. memory_map: the arrays are
    memory-mapped ``.npy`` columns (:func:`routelib.routing.record.columns.open_columns`: built once from the
    shards, Arrow -> numpy without pandas; for traces of millions of tokens), expert ids int16."""
    if memory_map:
        from routelib.routing.record.columns import open_columns

        return RoutingData.from_columns(open_columns(resolve_trace_dir(trace_dir), datasets=datasets))
    columns = ["dataset", "problem_id", "position", "phase", "token_id", "experts", "weights"]
    return RoutingData.from_frame(load_traces(resolve_trace_dir(trace_dir), datasets=datasets, columns=columns))


def repetition_table(data: RoutingData) -> pd.DataFrame:
    """How repetitive the traces are, per dataset and phase: tokens, distinct token ids, distinct
    journeys (token id + expert sets of every layer) and the share of tokens repeating an earlier
    journey of the same group (a model looping on its own output drives it towards 1)."""
    journey = journeys(data)
    rows = []
    for dataset in sorted(set(data.dataset)):
        for phase, flag in (("prompt", False), ("generated", True)):
            mask = (data.dataset == dataset) & (data.generated == flag)
            if mask.any():
                distinct = len(np.unique(journey[mask]))
                rows.append({"dataset": dataset, "phase": phase, "tokens": int(mask.sum()),
                             "distinct_tokens": len(np.unique(data.token_id[mask])), "distinct_journeys": distinct,
                             "repeated_share": 1 - distinct / mask.sum()})
    return pd.DataFrame(rows)


def gate_vectors(experts: np.ndarray, weights: np.ndarray, num_experts: int) -> np.ndarray:
    """(N, k) expert ids and gate weights -> (N, E) gate vectors, renormalised to sum to 1 (models
    that do not renormalise their top-k, e.g. Qwen2-MoE, give vectors summing to less)."""
    out = np.zeros((experts.shape[0], num_experts), np.float32)  # (N, E)
    np.put_along_axis(out, experts, weights, axis=1)
    total = out.sum(1, keepdims=True)
    return out / np.where(total > 0, total, 1.0)


def sequences(data: RoutingData) -> list[np.ndarray]:
    """Row indices of each problem's tokens in position order, one array per problem present."""
    order = np.lexsort((data.position, data.problem))
    starts = np.flatnonzero(np.r_[True, np.diff(data.problem[order]) != 0])
    return np.split(order, starts[1:]) if len(order) else []


def check_pair(num_layers: int, layer: int, hop: int) -> None:
    """PredictorError unless layer l + hop h is a MoE layer of traces with ``num_layers`` of them."""
    if not isinstance(hop, (int, np.integer)) or hop < 1:
        raise PredictorError(f"hop must be an integer >= 1 (predict layer l+h from layer l), got {hop!r}")
    if not 0 <= layer < num_layers:
        raise PredictorError(f"source layer {layer} is not a MoE layer: the traces have {num_layers} "
                             f"(0..{num_layers - 1})")
    if layer + hop >= num_layers:
        raise PredictorError(f"hop {hop} from layer {layer} targets layer {layer + hop}, beyond the last MoE layer "
                             f"{num_layers - 1} of these traces")


def layer_pairs(num_layers: int, hops: Sequence[int]) -> list[tuple[int, int]]:
    """Every (source layer l, hop h) with l + h < L, hop by hop."""
    hops = list(hops)
    if not hops:
        raise PredictorError("no hops given")
    for h in hops:
        check_pair(num_layers, 0, h)
    return [(layer, h) for h in hops for layer in range(num_layers - h)]


def row_keys(cols: np.ndarray) -> np.ndarray:
    """(N, C) integers -> (N,) opaque byte-string keys, equal exactly when the rows are equal; they
    sort, so ``np.unique`` and ``np.searchsorted`` work on them."""
    cols = np.ascontiguousarray(cols, dtype=np.int64)
    return cols.view(np.dtype((np.void, cols.itemsize * cols.shape[1]))).ravel()


def journeys(data: RoutingData) -> np.ndarray:
    """(N,) keys of each token's whole journey: its id and the expert set of every layer."""
    return row_keys(np.concatenate([data.token_id[:, None], np.sort(data.experts, 2).reshape(len(data), -1)], 1))


# ----------------------------------------------------------------------------------------------
# the hidden states the routers read


def _load_model(model, manifest: dict, device: str | None = None):
    """The model object: given, or loaded from a path/name (default: the manifest's model); with a
    ``device`` other than "cpu", loaded with ``device_map="auto"`` (spread over the GPUs)."""
    if isinstance(model, nn.Module):
        return model
    from routelib.routing.record.routers import load_model

    name = model or trace_info(manifest).model
    if not name:
        raise HiddenStatesUnavailable("the trace manifest names no model: pass model=<local path> (CLI: --model) "
                                      "for the hidden-state predictors, or leave hidden_router/hidden_probe/pre_attn_probe out")
    local = resolve_trace_dir(name)
    try:
        device_map = "auto" if device not in (None, "cpu") and torch.cuda.is_available() else None
        return load_model(str(local) if local.exists() else str(name), device_map=device_map)[0]
    except (OSError, ValueError, ImportError, RoutelibError) as err:
        raise HiddenStatesUnavailable(
            f"the hidden-state predictors need the model that routed these traces, {name!r}, and it cannot be "
            f"loaded here ({type(err).__name__}: {' '.join(str(err).split())[:200]}). Pass model=<local path> (CLI: --model), or "
            f"leave hidden_router/hidden_probe/pre_attn_probe out of the predictors.") from None


def decoder_blocks(model: nn.Module, router_names: Sequence[str]) -> list[nn.Module]:
    """The decoder block (transformer layer) holding each router: the module named by the router's name
    up to its layer index (``model.layers.3.block_sparse_moe.gate`` -> ``model.layers.3``)."""
    blocks = []
    for name in router_names:
        m = re.match(r"^(.*?\.\d+)(?:\.|$)", name)
        if m is None:
            raise HiddenStatesUnavailable(f"router {name!r}: its name holds no layer index, so the decoder block "
                                          f"whose input is the pre-attention state cannot be found")
        blocks.append(model.get_submodule(m.group(1)))
    return blocks


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder block is called with (positional or ``hidden_states=``)."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(x, torch.Tensor):
        raise HiddenStatesUnavailable("a decoder block was called without a hidden-states tensor; the "
                                      "pre-attention state cannot be read from this architecture")
    return x


@torch.no_grad()
def attach_hidden_states(data: RoutingData, model=None, *, batch_tokens: int = 8192, device: str | None = None,
                         progress: bool = True, pre_attention: bool = False) -> HiddenStates:
    """Recompute what every MoE router read for every traced token and attach it as ``data.hidden``.

    One forward pass per problem over its token ids (positions 0..n-1; sequences batched by length,
    right-padded, padding masked), with forward hooks on the routers (found as the collection finds
    them). model: a loaded model, a path or hub name, or None for the manifest's ``name_or_path``.
    Raises :class:`HiddenStatesUnavailable` when the model cannot be loaded or its router weights
    differ from the manifest's ``router_weights_sha256``; ``agreement`` (the fraction of (token,
    layer) pairs whose recomputed top-k set equals the traced one) must then be ~1. ``pre_attention``:
    also keep the input of each MoE layer's decoder block (forward pre-hooks on the blocks,
    :func:`decoder_blocks`) as ``pre_attention``.
    """
    from routelib.progress import progress_bar
    from routelib.routing.record.routers import find_routers, model_info, split_router_output

    given = model  # a path or name (reported as given), or a model object
    model = _load_model(model, data.manifest, device)
    routers = find_routers(model)
    if len(routers.modules) != data.num_layers:
        raise HiddenStatesUnavailable(f"the model has {len(routers.modules)} MoE routers, the traces {data.num_layers} "
                                      f"MoE layers: not the model that routed them")
    want = trace_info(data.manifest).router_weights_sha256
    if want and model_info(model, routers)["router_weights_sha256"] != want:
        raise HiddenStatesUnavailable("the model's router weights differ from the ones that routed these traces "
                                      "(manifest router_weights_sha256): another checkpoint")
    if device is not None and not hasattr(model, "hf_device_map"):
        model.to(resolve_device(device))
    dev = next(model.parameters()).device
    seqs = sequences(data)
    for rows in seqs:
        if not np.array_equal(data.position[rows], np.arange(len(rows))):
            raise PredictorError(f"problem {data.problems[data.problem[rows[0]]]}: positions are not 0..n-1; hidden "
                                 f"states need whole sequences (attach them before splitting by token)")
    hidden_size = None
    x_all: np.ndarray | None = None
    ids_all = np.zeros_like(data.experts)
    captured: list[list] = [[] for _ in routers.modules]
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: captured[i].append((args[0], out)))
             for i, m in enumerate(routers.modules)]
    blocks_in: list[list] = [[] for _ in routers.modules]
    pre_all: np.ndarray | None = None
    if pre_attention:
        hooks += [b.register_forward_pre_hook(lambda mod, args, kwargs, i=i: blocks_in[i].append(_block_input(args, kwargs)),
                                              with_kwargs=True)
                  for i, b in enumerate(decoder_blocks(model, routers.names))]
    base = getattr(model, "base_model", model)
    seqs.sort(key=len)
    batches, cur = [], []
    for rows in seqs:
        if cur and (len(cur) + 1) * len(rows) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(rows)
    batches += [cur] if cur else []
    bar = progress_bar(progress, total=len(seqs), desc="hidden states")
    try:
        for batch in batches:
            length = max(len(r) for r in batch)
            ids = torch.zeros(len(batch), length, dtype=torch.long)  # (B, T), right-padded
            mask = torch.zeros(len(batch), length, dtype=torch.long)  # (B, T)
            for j, rows in enumerate(batch):
                ids[j, :len(rows)] = torch.from_numpy(data.token_id[rows])
                mask[j, :len(rows)] = 1
            for store in captured + blocks_in:
                store.clear()
            base(input_ids=ids.to(dev), attention_mask=mask.to(dev))
            keep = mask.flatten().bool().to(dev)  # (B*T,)
            target = np.concatenate(batch)
            for layer, store in enumerate(captured):
                (inp, out), = store
                x = inp.reshape(-1, inp.shape[-1])[keep]  # (n, H)
                if x_all is None:
                    hidden_size = x.shape[-1]
                    x_all = np.zeros((len(data), data.num_layers, hidden_size), np.float16)
                x_all[target, layer] = x.float().cpu().numpy()
                logits, _, chosen = split_router_output(out)
                if chosen is None:
                    chosen = torch.topk(logits.float(), data.top_k, dim=-1).indices
                ids_all[target, layer] = chosen.reshape(-1, chosen.shape[-1])[keep][:, :data.top_k].cpu().numpy()
                if pre_attention:
                    (block_x,) = blocks_in[layer]  # (B, T, H): the block's input, before its attention
                    if pre_all is None:
                        pre_all = np.zeros((len(data), data.num_layers, block_x.shape[-1]), np.float16)
                    pre_all[target, layer] = block_x.reshape(-1, block_x.shape[-1])[keep].float().cpu().numpy()
            bar.update(len(batch))
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    if x_all is None:
        raise PredictorError("attach_hidden_states: the traces hold no tokens")
    agreement = float((np.sort(ids_all, 2) == np.sort(data.experts, 2)).all(2).mean())
    name = str(given if isinstance(given, str) and given else  # as the caller / manifest names it, not
               trace_info(data.manifest).model or getattr(model, "name_or_path", ""))  # resolved
    data.hidden = HiddenStates(x_all, list(routers.modules), name, agreement, model, pre_all)
    return data.hidden


def need_hidden(data: RoutingData, who: str) -> HiddenStates:
    if data.hidden is None:
        raise HiddenStatesUnavailable(f"{who} needs the hidden states of the model that routed the traces: call "
                                      f"attach_hidden_states(data) on the full traces before splitting")
    return data.hidden


def need_pre_attention(data: RoutingData, who: str) -> np.ndarray:
    """(N, L, H) the pre-attention states of ``data``, or a clear error saying how to attach them."""
    hidden = need_hidden(data, who)
    if hidden.pre_attention is None:
        raise HiddenStatesUnavailable(f"{who} needs the pre-attention states (each MoE layer's decoder-block input): "
                                      f"call attach_hidden_states(data, pre_attention=True) on the full traces")
    return hidden.pre_attention
