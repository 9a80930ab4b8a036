"""Find and read the routers of any Hugging Face MoE causal LM: the tools every routing module shares.

:func:`find_routers` locates each MoE layer's router, :class:`RoutingRecorder` hooks them and returns
every token's top-k experts and gate weights (and optionally the full distribution),
:func:`split_router_output` reads one router output of any supported kind, :func:`model_info`
identifies a model by its config and router weights, and :func:`load_model` loads a local folder or
Hub model for this. The collection run built on them is :mod:`routelib.routing.record.collect`.

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from routelib.errors import ModelNotFoundError, RoutelibError
from routelib.routing.record import traces as T



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
    from routelib.data.hub import require_hub
    from routelib.subject.build import model_folder

    folder = model_folder(name_or_path)
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
