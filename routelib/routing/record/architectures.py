"""Which Hugging Face MoE architectures routelib serves, proven on tiny random models.

Driven by transformers' own registry: every causal-LM model type
(``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) whose config declares routed experts (a config field, here
or in a sub-config, whose name mentions experts). For each, :func:`tiny_model` builds a random model
offline from the config's own defaults, shrunk by a generic rule (:func:`shrink`) plus a small
per-architecture override table (:data:`OVERRIDES`); :func:`check_type` then

1. collects the routing of a prompt and a few generated tokens with :func:`routelib.routing.record.collect.collect`
   while forward hooks on every experts module record what the experts actually received in that
   same pass (the ids and gate weights the model handed them, see :class:`ExpertInputs`), and
   compares the trace, token by token and layer by layer, with those; then collects again with
   ``full_distribution`` and checks the stored distribution against the recorded score kind;
2. reads the weights with :func:`routelib.routing.analyse.weights.moe_weights` and checks that they
   reproduce each expert's output, computed by the model's own experts module with that expert
   alone at gate weight 1.

A future transformers that adds a type adds a row, with no change here. Architectures that cannot
be served are listed with the reason (:data:`UNSERVED_COLLECTION`, :data:`UNSERVED_WEIGHTS`); the
library raises an error naming them, and the test expects exactly that error.

On 2 CPU cores with one thread, all 66 types of transformers 5.24 take about 20 s.

``python -m routelib.routing.record.architectures [--readme docs/04_mixtral_routing_collection.md]`` prints the table (and writes it into
README between the marker comments); ``tests/test_routing_record_architectures.py`` runs the same checks.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from routelib.errors import RoutelibError

# ----------------------------------------------------------------------------------------------
# the registry and tiny configs

EXPERT_FIELD = re.compile(r"expert", re.IGNORECASE)  # a config field naming experts declares an MoE
LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layers", "n_layer")
TINY_LAYERS = 2  # decoder layers of every tiny model (more where its layer types need more)
# (field-name pattern, tiny value): integers above the value are set to it; None expert fields get it
SIZES = (
    (r"hidden_size|d_model|n_embd", 64),
    (r"\w+_hidden_size|hidden_size_\w+", 16),  # router MLPs, per-layer inputs
    (r"\w*(intermediate_size|ffn_hidden_size|ffn_dim)", 24),  # 2 x 24 != 64: fused layouts stay readable
    (r"num_hidden_layers|num_layers|n_layers|n_layer", TINY_LAYERS),
    (r"\w*(num_attention_heads|n_heads|n_head|index_n_heads|indexer_n_heads)", 4),
    (r"\w*(num_key_value_heads|kv_n_heads|num_kv_heads|indexer_kv_heads)", 2),
    (r"qk_rope_head_dim|qk_nope_head_dim", 8),
    (r"\w*head_dim", 16),
    (r"kv_lora_rank|q_lora_rank", 16),
    (r"num_local_experts|num_experts|n_routed_experts|moe_num_experts", 8),
    (r"num_experts_per_tok|moe_topk|top_k_experts|num_experts_per_token|moe_top_k", 2),
    (r"n_shared_experts|num_shared_experts|moe_num_shared_experts", 1),
    (r"n_group|num_expert_group", 2),
    (r"zero_expert_num", 2),
    (r"topk_group", 1),
    (r"max_position_embeddings|max_seq_len", 256),
    (r"\w*vocab_size\w*", 8192),
)
# set to the tiny value even when smaller (a 1-expert or top-1 default would not exercise routing)
EXACT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
              "moe_topk", "top_k_experts", "num_experts_per_token", "moe_top_k")
MOE_SWITCHES = re.compile(r"is_moe|enable_moe_block|use_moe")  # booleans that turn the experts on

# Per-architecture fields the generic shrinker cannot guess (dotted keys reach sub-configs).
OVERRIDES: dict[str, dict[str, Any]] = {
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},  # no defaults for these
    "jamba": {"attn_layer_offset": 0, "attn_layer_period": 2, "expert_layer_offset": 1, "expert_layer_period": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"],  # default: no attention layer
                         "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 16},
    **dict.fromkeys(("qwen4_exp", "qwen4_exp_text"), {  # its indexed-attention layers need all five fields
        "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
        "indexer_compress_ratio": 2}),
}


def moe_model_types() -> dict[str, str]:
    """{model_type: causal-LM class name} for every causal-LM model type of the installed transformers
    whose config declares experts (a field, or a sub-config's field, whose name mentions experts)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = {}
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        config_class = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None
        if config_class is not None and any(EXPERT_FIELD.search(k) for k in _field_names(config_class)):
            found[model_type] = class_name
    return found


def _field_names(config_class) -> list[str]:
    """Field names of a config class and of its sub-configs (from the class, no instance needed)."""
    import dataclasses
    import inspect

    names = []
    classes = [config_class, *getattr(config_class, "sub_configs", {}).values()]
    for cls in classes:
        if dataclasses.is_dataclass(cls):
            names += [f.name for f in dataclasses.fields(cls)]
        names += list(inspect.signature(cls.__init__).parameters)
    return names


def shrink(config, depth: int = 0):
    """``config`` made tiny in place (and returned): every integer field matching :data:`SIZES` is
    capped at its tiny value (expert fields left None get it), MoE switches are turned on, per-layer
    lists are cut to the tiny depth keeping every distinct layer type, dense-prefix counts and
    layer-index lists keep at least one MoE layer, out-of-vocabulary special ids are clamped;
    sub-configs are shrunk the same way."""
    depth_before = _layer_count(config)
    for key, value in list(vars(config).items()):
        if key.startswith("_"):
            continue
        if hasattr(value, "to_dict") and depth < 2:
            shrink(value, depth + 1)
            continue
        if isinstance(value, bool) or value is None:
            if value is False and MOE_SWITCHES.fullmatch(key):
                setattr(config, key, True)
            if value is None and (EXPERT_FIELD.search(key) or key == "head_dim" or key.startswith("moe_")):
                tiny = _tiny_value(key)
                if tiny is not None:
                    setattr(config, key, tiny)
            continue
        if isinstance(value, int):
            tiny = _tiny_value(key)
            if tiny is not None and (value > tiny or key in EXACT_KEYS or "vocab_size" in key):
                setattr(config, key, tiny)
    depth_after = _layer_count(config)
    if depth_before and depth_after:
        _cut_layer_lists(config, depth_before, depth_after)
    own = vars(config)  # stored fields only (some configs refuse global reads of per-layer fields)
    if isinstance(own.get("kv_lora_rank"), int):  # multi-head latent attention
        rope, nope = own.get("qk_rope_head_dim"), own.get("qk_nope_head_dim")
        if isinstance(rope, int) and "head_dim" in own:
            config.head_dim = rope  # its rotary embedding covers the rope part only
        if isinstance(rope, int) and isinstance(nope, int) and "qk_head_dim" in own:
            config.qk_head_dim = rope + nope
        if isinstance(own.get("num_key_value_heads"), int):
            config.num_key_value_heads = own["num_attention_heads"]  # one latent KV per query head
    if isinstance(getattr(config, "first_k_dense_replace", None), int):
        config.first_k_dense_replace = min(config.first_k_dense_replace, 1)
    vocab = getattr(config, "vocab_size", None)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(vocab, int) and isinstance(value, int) and value >= vocab:
            setattr(config, key, vocab - 1)
        elif isinstance(vocab, int) and isinstance(value, list):
            setattr(config, key, [min(v, vocab - 1) for v in value])
    return config


def _tiny_value(key: str) -> int | None:
    for pattern, tiny in SIZES:
        if re.fullmatch(pattern, key):
            return tiny
    return None


def _layer_count(config) -> int | None:
    return next((getattr(config, k) for k in LAYER_COUNT_KEYS if isinstance(getattr(config, k, None), int)), None)


def _cut_layer_lists(config, before: int, after: int) -> None:
    """Per-layer lists (length ``before``) cut to ``after`` layers, keeping every distinct string
    (layer type) at the end -- the depth grows if there are more types than layers; lists of layer
    indices (``mlp_only_layers``) keep only indices below the last layer, so the last one is MoE."""
    for key, value in list(vars(config).items()):
        if key.startswith("_") or not isinstance(value, list):
            continue
        if len(value) == before and before != after:
            kinds = list(dict.fromkeys(v for v in value if isinstance(v, str)))
            depth = max(after, len(kinds))
            cut = value[:depth]
            missing = [k for k in kinds if k not in cut]
            if missing:
                cut = cut[:depth - len(missing)] + missing
            setattr(config, key, cut)
            if depth > after:
                for k in LAYER_COUNT_KEYS:
                    if isinstance(getattr(config, k, None), int):
                        setattr(config, k, depth)
                after = depth
        elif key.endswith("_layers") and value and all(isinstance(v, int) for v in value):
            setattr(config, key, [v for v in value if v < after - 1])


def tiny_config(model_type: str):
    """The config of a tiny random ``model_type`` model: the config class's own defaults, shrunk
    (:func:`shrink`), then :data:`OVERRIDES`; a composite config whose causal-LM class takes the
    text config alone gives that text config."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    config = shrink(CONFIG_MAPPING[model_type]())
    if not isinstance(config, cls.config_class) and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key, value in OVERRIDES.get(model_type, {}).items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    return cls, config


def tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    """A tiny random ``model_type`` causal LM in eval mode (float32, eager attention, offline)."""
    cls, config = tiny_config(model_type)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    std = float(getattr(config, "initializer_range", None) or 0.02)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised routers (AFMoE) would tie every expert: give them random rows
        for name, p in model.named_parameters():
            if p.ndim == 2 and re.search(r"(^|\.)(router|gate)(\.|$)", name) and not p.any():
                p.normal_(0.0, std, generator=gen)
        for name, b in model.named_buffers():  # an all-zero token -> expert table (DeepSeek-V4's hash routing)
            if b.ndim == 2 and not b.is_floating_point() and not b.any() and re.search(r"(^|\.)(router|gate)\.", name):
                experts = int(getattr(config, "num_local_experts", None) or getattr(config, "n_routed_experts", 8))
                b.copy_(torch.stack([torch.randperm(experts, generator=gen)[: b.shape[1]] for _ in range(b.shape[0])]))
    return model


# ----------------------------------------------------------------------------------------------
# ground truth: what the experts modules received

PROMPT = "def add(a, b):\n    return a + b\n\nprint(add(2,"  # a short prompt (bpe8k: 16 tokens)
NEW_TOKENS = 4  # generated tokens per check


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every experts module (a module named ``experts``), in model order."""
    return [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "experts"]


class ExpertInputs:
    """Forward pre-hooks on every experts module keeping, per call, the expert ids (int, (N, k)) and
    the gate weights (float, (N, k)) the module was called with -- the routing as the model applied it.

    Experts called with their inputs already scaled (Llama-4: one (E*N, H) block per expert, expert
    e's rows = its gate weight x the token's hidden state) are read from those inputs: a pre-hook on
    the MoE block keeps the hidden states (N, H); expert e received token t at weight s when its
    block row is s x h_t (s = 0: not routed)."""

    def __init__(self, model: nn.Module):
        self.modules = experts_modules(model)
        named = dict(model.named_modules())
        order = {n: i for i, n in enumerate(named)}
        # JetMoE: no module receives per-token routing; its routers' own grouped outputs are read instead
        self.grouped = [(n, m) for n, m in named.items() if n.rsplit(".", 1)[-1] == "router"
                        and type(m).__name__.endswith("TopKGating")]
        self.modules = sorted(self.modules + self.grouped, key=lambda item: order[item[0]])
        self.parents = [named[n.rsplit(".", 1)[0] if "." in n else ""] for n, _ in self.modules]
        self.calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.modules]
        self._hidden: list[torch.Tensor | None] = [None for _ in self.modules]
        self._handles = []

    def __enter__(self):
        grouped = {n for n, _ in self.grouped}
        for i, (name, module) in enumerate(self.modules):
            if name in grouped:
                self._handles.append(module.register_forward_hook(self._grouped_hook(i)))
                continue
            self._handles.append(self.parents[i].register_forward_pre_hook(self._parent_hook(i), with_kwargs=True))
            self._handles.append(module.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def _grouped_hook(self, i: int):
        def hook(module, args, output):
            _, token_index, gates, expert_sizes, logits = output  # assignments in expert order
            n = logits.shape[0]
            expert_of = torch.repeat_interleave(torch.arange(len(expert_sizes)), torch.as_tensor(list(expert_sizes)))
            order = torch.argsort(token_index * len(expert_sizes) + expert_of, stable=True)  # by token, then expert
            ids = expert_of[order].view(n, -1)  # (N, k)
            weights = gates[order].view(n, -1)  # (N, k)
            self.calls[i].append((ids.clone(), weights.detach().float().clone()))
        return hook

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _parent_hook(self, i: int):
        def hook(module, args, kwargs):
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            self._hidden[i] = None if first is None else first.detach().reshape(-1, first.shape[-1])  # (N, H)
        return hook

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            ids = next((t for t in tensors if not t.is_floating_point() and t.ndim == 2), None)
            weights = next((t for t in tensors if ids is not None and t.is_floating_point() and t.shape == ids.shape),
                           None)
            if ids is None and len(tensors) == 1 and self._hidden[i] is not None:
                ids, weights = self._from_scaled_inputs(tensors[0], self._hidden[i])
            if ids is None or weights is None:
                raise RoutelibError(f"experts module {self.modules[i][0]} ({type(module).__name__}) was called "
                                    f"without (ids, weights) of one shape: cannot read what it received")
            self.calls[i].append((ids.detach().clone(), weights.detach().float().clone()))
        return hook

    @staticmethod
    def _from_scaled_inputs(routed_in: torch.Tensor, hidden: torch.Tensor):
        """(ids (N, k), weights (N, k)) from per-expert scaled copies of the hidden states."""
        n = hidden.shape[0]
        if routed_in.ndim != 2 or routed_in.shape[0] % n:
            return None, None
        blocks = routed_in.float().view(-1, n, hidden.shape[1])  # (E, N, H)
        h = hidden.float()  # (N, H)
        scale = (blocks * h).sum(-1) / (h * h).sum(-1).clamp_min(1e-30)  # (E, N): least-squares s in s * h_t
        routed = (blocks != 0).any(-1)  # (E, N)
        k = int(routed.sum(0).max())
        if k == 0 or not bool((routed.sum(0) == k).all()):
            return None, None
        weights, ids = torch.topk(torch.where(routed, scale, torch.full_like(scale, -torch.inf)).T, k, dim=-1)
        return ids, weights

    def arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (N, L, k), weights (N, L, k)) over all calls, one row per token routed."""
        used = [calls for calls in self.calls if calls]  # experts modules never called (JetMoE's MoA) drop out
        ids = torch.stack([torch.cat([c[0] for c in calls]) for calls in used], dim=1)
        weights = torch.stack([torch.cat([c[1] for c in calls]) for calls in used], dim=1)
        return ids, weights


# ----------------------------------------------------------------------------------------------
# the checks

# Architectures routelib cannot serve, with the transformers-side reason (the library raises an
# error saying so); the coverage test expects that error and lists them in the README table.
_DOGE = ("product-key routing inside DogeCDMoE's forward: no module exposes its expert ids or weights, and the "
         "key logits it returns are mixed across tokens in a full forward (transformers' own comment)")
UNSERVED_COLLECTION: dict[str, str] = {"doge": _DOGE}
UNSERVED_WEIGHTS: dict[str, str] = {"doge": _DOGE}

EXACT, UNSERVED, WRONG, ERROR = "exact", "not served", "wrong", "error"


@dataclass
class Coverage:
    model_type: str  # transformers model_type
    architecture: str  # the causal-LM class
    collection: str  # EXACT, UNSERVED (a routelib error naming it), WRONG (a mismatch) or ERROR (a crash)
    collection_note: str  # what was checked, or the error / mismatch
    weights: str  # the same statuses for moe_weights
    weights_note: str
    tokens: int = 0  # tokens checked (prompt + generated)
    layers: int = 0  # MoE layers checked


def _tokenizer():
    from routelib.data.tokenizer import load_tokenizer

    return load_tokenizer("bpe8k")


def check_collection(model: nn.Module, tokenizer) -> tuple[int, int, float]:
    """Collect the routing of :data:`PROMPT` + :data:`NEW_TOKENS` generated tokens with
    :func:`collect` while :class:`ExpertInputs` records what the experts received; raises
    AssertionError on any difference. Returns (tokens, MoE layers, largest gate-weight difference)."""
    import tempfile

    import numpy as np

    from routelib.routing.record.collect import collect
    from routelib.routing.record.traces import load_traces, trace_arrays, trace_info

    run = dict(dataset="coverage", max_new_tokens=NEW_TOKENS, batch_size=1, stop_at_eos=False, progress=False)
    with tempfile.TemporaryDirectory() as out, ExpertInputs(model) as received:
        collect(model, tokenizer, {"p": PROMPT}, out, **run)
        df = load_traces(out)
    traces = trace_arrays(df)
    ids, weights = received.arrays()  # (N, L, k) each, the experts' own inputs
    if traces.experts.shape != tuple(ids.shape):
        raise AssertionError(f"trace holds {traces.experts.shape} (tokens, layers, k), the experts received "
                             f"{tuple(ids.shape)}")
    if (df["phase"] == "generated").sum() != NEW_TOKENS:
        raise AssertionError(f"{(df['phase'] == 'generated').sum()} generated tokens, expected {NEW_TOKENS}")
    order_t = np.argsort(traces.experts, axis=-1, kind="stable")  # compare slots as sets: sort by id
    order_r = torch.argsort(ids, dim=-1, stable=True)
    got_ids = np.take_along_axis(traces.experts, order_t, -1)
    got_w = np.take_along_axis(traces.weights, order_t, -1)
    want_ids = torch.gather(ids, -1, order_r).numpy()
    want_w = torch.gather(weights, -1, order_r).numpy()
    bad = np.argwhere((got_ids != want_ids).any(-1))
    if len(bad):
        t, layer = bad[0]
        raise AssertionError(f"{len(bad)} (token, layer) cells with other experts than the experts received; "
                             f"first: token {t}, layer {layer}: {got_ids[t, layer]} vs {want_ids[t, layer]}")
    diff = float(np.abs(got_w - want_w).max())
    if not np.allclose(got_w, want_w, rtol=1e-5, atol=1e-6):
        raise AssertionError(f"gate weights differ from what the experts received by up to {diff:.3g}")
    info = trace_info(df.attrs["manifest"])
    kinds = list(info.router_scores)
    note = f"router scores: {'/'.join(dict.fromkeys(kinds))}"
    note += _check_full_distribution(model, tokenizer, run, kinds, traces.experts)
    zero = info.zero_computation_experts
    note += f"; ids {zero[0]}-{zero[-1]} are zero-computation experts (in the layout)" if zero else ""
    return int(ids.shape[0]), int(ids.shape[1]), diff, note


def _check_full_distribution(model, tokenizer, run: dict, kinds: list[str], experts) -> str:
    """Collect again with ``full_distribution``: the same experts, and probs of the recorded kind
    (in [0, 1]; summing to 1 for softmax and probabilities); for scores of unknown kind, the refusal
    must name the model. Returns a note for the table ("" when the distribution is stored)."""
    import tempfile

    import numpy as np

    from routelib.routing.record.collect import collect
    from routelib.routing.record.traces import load_traces, trace_arrays

    with tempfile.TemporaryDirectory() as out:
        try:
            collect(model, tokenizer, {"p": PROMPT}, out, full_distribution=True, **run)
        except RoutelibError as err:
            if "unknown" in kinds and type(model).__name__ in str(err):
                return " (kind not told from the data: full_distribution refused)"
            raise
        again = trace_arrays(load_traces(out))
    if not np.array_equal(again.experts, experts):
        raise AssertionError("full_distribution changed the recorded experts")
    probs = again.probs.astype(np.float32)  # (N, L, E)
    if not (np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1 + 1e-3):
        raise AssertionError(f"full distribution of {kinds} router scores is not in [0, 1]")
    for layer, kind in enumerate(kinds * (probs.shape[1] if len(kinds) == 1 else 1)):
        if kind in ("softmax", "probabilities") and not np.allclose(probs[:, layer].sum(-1), 1, atol=1e-2):
            raise AssertionError(f"full distribution of {kind} router scores (layer {layer}) does not sum to 1")
    return ""


def check_weights(model: nn.Module, seed: int = 0) -> tuple[int, float]:
    """Every expert's output computed from :func:`moe_weights` equals the model's own experts module
    called with that expert alone (gate weight 1) on random inputs. Returns (layers, largest error)."""
    from routelib.routing.analyse.weights import moe_weights

    w = moe_weights(model)
    named = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for layer in w.layers:
        experts = named[layer.experts_name]
        x = torch.randn(5, w.hidden_size, generator=gen)  # (T, H)
        alone = (len(inspect.signature(experts.forward).parameters) == 1  # Llama-4: (E*T, H) in expert blocks
                 and not hasattr(experts, "input_linear"))
        for e in range(layer.num_experts):
            with torch.no_grad():
                if alone:
                    ref = experts(x.repeat(layer.num_experts, 1)).view(layer.num_experts, 5, -1)[e]  # (T, H)
                else:
                    ref = _alone(experts, x, e)  # (T, H)
                ours = layer.expert_output(e, x)
                ref = ref.reshape(ours.shape)  # DBRX returns (T, 1, H)
            err = float((ours - ref).abs().max())
            worst = max(worst, err)
            if not torch.allclose(ours, ref, rtol=1e-4, atol=1e-5):
                raise AssertionError(f"layer {layer.index}, expert {e}: output from the read weights differs "
                                     f"from {type(experts).__name__} by {err:.3g}")
    notes = []
    if any(layer.router is None for layer in w.layers):
        notes.append("no router matrix (the router is an MLP): experts only")
    notes += [f"{name} skipped: {why}" for name, why in list(w.skipped.items())[:1]]
    return len(w.layers), worst, "; ".join(notes)


def _alone(experts: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """(T, H): the experts module's output with every token of ``x`` (T, H) sent to expert ``e`` alone
    at gate weight 1 -- in one slot, or (LongCat-Flash, whose loop squeezes a k = 1 mask away) in the
    first of two slots with the second slot at weight 0."""
    t = x.shape[0]
    if hasattr(experts, "input_linear") and not hasattr(experts, "experts"):  # JetMoE: the block's own expert
        sizes = [0] * experts.input_linear.weight.shape[0]  # modules, composed as its forward composes them
        sizes[e] = t
        gate, up = experts.input_linear(x, sizes).chunk(2, dim=-1)
        return experts.output_linear(experts.activation(gate) * up, sizes)
    try:
        return experts(x, torch.full((t, 1), e), torch.ones(t, 1))
    except ValueError:
        return experts(x, torch.tensor([[e, (e + 1) % int(getattr(experts, "num_experts", e + 2))]]).repeat(t, 1),
                       torch.tensor([[1.0, 0.0]]).repeat(t, 1))


def _status(fn, *args) -> tuple[str, str, Any]:
    try:
        return EXACT, "", fn(*args)
    except AssertionError as err:
        return WRONG, str(err), None
    except RoutelibError as err:
        return UNSERVED, str(err), None
    except Exception as err:  # a crash inside transformers or routelib: reported, never hidden
        return ERROR, f"{type(err).__name__}: {err}", None


def check_type(model_type: str, tokenizer=None) -> Coverage:
    """Both checks on a tiny random ``model_type`` model (see the module docstring)."""
    tokenizer = tokenizer or _tokenizer()
    cls, _ = tiny_config(model_type)
    model = tiny_model(model_type)
    c_status, c_note, c_out = _status(check_collection, model, tokenizer)
    w_status, w_note, w_out = _status(check_weights, model)
    tokens, layers = (c_out[0], c_out[1]) if c_out else (0, 0)
    if c_status == EXACT:
        c_note = c_out[3]  # anything the layout records beyond ids and weights
    if w_status == EXACT:
        w_note = w_out[2]  # what is not read, if anything
    return Coverage(model_type, cls.__name__, c_status, c_note, w_status, w_note, tokens, layers)


def run_all(model_types=None, progress: bool = False) -> list[Coverage]:
    """:func:`check_type` for every type of :func:`moe_model_types` (or the given ones)."""
    tokenizer = _tokenizer()
    results = []
    for model_type in model_types or moe_model_types():
        results.append(check_type(model_type, tokenizer))
        if progress:
            r = results[-1]
            print(f"{model_type}: collection {r.collection}, weights {r.weights}", flush=True)
    return results


# ----------------------------------------------------------------------------------------------
# the README table

TABLE_BEGIN = "<!-- moe-coverage:begin (generated by python -m routelib.routing.record.architectures --readme docs/04_mixtral_routing_collection.md) -->"
TABLE_END = "<!-- moe-coverage:end -->"


def _cell(status: str) -> str:
    return "yes" if status == EXACT else f"**{status}**"


def coverage_table(results: list[Coverage]) -> str:
    """The markdown table: one row per model type, sorted by model type."""
    import transformers

    rows = [f"Every causal-LM model type of transformers {transformers.__version__} whose config declares experts "
            f"({len(results)} types), as a tiny random model: collection served = the recorded top-k ids and gate "
            f"weights of the prompt and {NEW_TOKENS} generated tokens equal what the experts modules received; "
            f"weights served = `moe_weights` reproduces every expert's output.",
            "",
            "| model type | architecture | collection | weights | note |",
            "|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r.model_type):
        notes = []
        if r.collection != EXACT:
            notes.append("collection: " + _one_line(r.collection_note))
        elif r.collection_note:
            notes.append(_one_line(r.collection_note))
        if r.weights_note and r.weights_note != r.collection_note:
            notes.append("weights: " + _one_line(r.weights_note))
        elif r.weights_note:
            notes[-1] = "collection and weights: " + _one_line(r.weights_note)
        rows.append(f"| `{r.model_type}` | {r.architecture} | {_cell(r.collection)} | {_cell(r.weights)} | "
                    f"{'; '.join(notes)} |")
    served = sum(r.collection == EXACT for r in results), sum(r.weights == EXACT for r in results)
    rows += ["", f"Collection served: {served[0]} of {len(results)}; weights served: {served[1]} of {len(results)}."]
    return "\n".join(rows)


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def readme_table(readme_text: str) -> str:
    """The text between the README's coverage markers (ValueError if they are missing)."""
    try:
        start = readme_text.index(TABLE_BEGIN) + len(TABLE_BEGIN)
        end = readme_text.index(TABLE_END, start)
    except ValueError:
        raise ValueError(f"README has no {TABLE_BEGIN!r} ... {TABLE_END!r} markers") from None
    return readme_text[start:end].strip("\n")


def write_readme_table(readme_path, table: str) -> None:
    """Replace the text between the README's coverage markers by ``table``."""
    from pathlib import Path

    path = Path(readme_path)
    text = path.read_text()
    readme_table(text)  # a clear error when the markers are missing
    start = text.index(TABLE_BEGIN) + len(TABLE_BEGIN)
    end = text.index(TABLE_END, start)
    path.write_text(text[:start] + "\n" + table + "\n" + text[end:])


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m routelib.routing.record.architectures", description=__doc__.split("\n\n")[0])
    p.add_argument("--readme", default=None, help="write the table into this README between the markers")
    p.add_argument("--types", default=None, help="comma-separated model types (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    types = args.types.split(",") if args.types else None
    table = coverage_table(run_all(types, progress=True))
    print(table)
    if args.readme:
        write_readme_table(args.readme, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
