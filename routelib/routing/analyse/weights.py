"""Router and expert weights of any supported MoE language model, layer by layer.

A model-agnostic view for weight-geometry studies (such as the small public OLMoE router study, built
on nnterp, that notebook 06 starts from): :func:`moe_weights` finds each MoE layer's router (with
:func:`routelib.routing.record.collect.find_routers`, the same search the trace collection uses) and the
experts module beside it, and returns plain tensors -- router (E, H) and, per expert, the SwiGLU
weights gate (I, H), up (I, H), down (H, I). No tracing library is needed: the weights are
parameters, read once; activations come from the collection hooks.

Layouts read (every MoE type of the installed transformers is checked by
``tests/test_routing_record_architectures.py``; the README table lists the result):

- router: the router's own ``weight`` (E, H), or its one linear child (AFMoE ``router.gate``,
  Gemma-4 ``router.proj``, HunYuan ``gate.wg``, DBRX ``router.layer``, LongCat ``router.classifier``);
  rows scoring LongCat-Flash's zero-computation experts are dropped, Inkling's shared-expert rows are
  kept apart (``shared_router``); a router MLP (Zaya) has no matrix: ``router`` is None;
- experts: fused ``gate_up_proj`` (E, 2I, H) + ``down_proj`` (E, H, I) or their transposes (Aria,
  Llama-4, GPT-OSS), gate/up in halves or interleaved (GPT-OSS; found by probing its ``_apply_gate``,
  kept as ``glu``), biases; non-gated ``up_proj`` + ``down_proj`` (Nemotron-H: ``gate`` None); DBRX's
  ``w1/v1/w2``; JetMoE's ``input_linear``/``output_linear`` (its attention-expert routers are skipped,
  ``MoEWeights.skipped`` says so); transformers 4.x per-expert ``w1/w3/w2`` or ``gate/up/down_proj``.

:meth:`MoELayer.expert_output` recomputes an expert from these tensors alone. Anything else raises
:class:`UnsupportedMoEError` naming the architecture and the module found.
Checkpoints of ``routelib.models.LM`` (notebook 03's training run) are turned into the equivalent
transformers Mixtral in memory by :func:`hf_from_checkpoint`, so every analysis has one code path.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from routelib.errors import RoutelibError
from routelib.routing.record.routers import config_value, find_routers


class UnsupportedMoEError(RoutelibError, ValueError):
    """A model whose router or experts this module cannot read (names the architecture)."""


@dataclass
class MoELayer:
    index: int  # decoder-layer index of this MoE layer
    router_name: str  # qualified name of the router module
    router: torch.Tensor | None  # (E, H) router weight: logits = hidden @ router.T; None when the router is
    # not one linear map (Zaya's router MLP)
    gate: torch.Tensor | None  # (E, I, H) SwiGLU gate projection (the SiLU branch); None: plain MLP experts
    up: torch.Tensor  # (E, I, H) SwiGLU up projection
    down: torch.Tensor  # (E, H, I) down projection back to the residual stream
    experts_name: str = ""  # qualified name of the experts module
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu  # the activation on the gate branch
    glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # the experts' own gating
    # function of (gate x, up x) where it is not act(gate) * up (GPT-OSS, MiniMax-M3: clamped, (up + 1))
    gate_bias: torch.Tensor | None = None  # (E, I) biases of the gate projection, where the experts have them
    up_bias: torch.Tensor | None = None  # (E, I)
    down_bias: torch.Tensor | None = None  # (E, H)
    shared_router: torch.Tensor | None = None  # (S, H) router rows that score shared experts (Inkling), apart

    @property
    def num_experts(self) -> int:
        return self.up.shape[0]

    def expert_output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """(T, H): expert ``e`` applied to ``x`` (T, H) from these weights alone: down(act(gate x) * up x)
        (or the experts' own ``glu``), biases added where there are, or down(act(up x)) for plain MLP experts."""
        def lin(w, b):  # (T, I) or (T, H)
            out = x @ w[e].T
            return out if b is None else out + b[e]

        up = lin(self.up, self.up_bias)
        if self.gate is None:
            hidden = self.act(up)
        elif self.glu is not None:
            hidden = self.glu(lin(self.gate, self.gate_bias), up)
        else:
            hidden = self.act(lin(self.gate, self.gate_bias)) * up
        out = hidden @ self.down[e].T
        return out if self.down_bias is None else out + self.down_bias[e]

    def expert_input(self) -> torch.Tensor:
        """(E, 2I, H): each expert's read-in matrix, gate and up rows stacked (what it reads from H);
        (E, I, H), the up rows alone, for plain MLP experts."""
        return self.up if self.gate is None else torch.cat([self.gate, self.up], dim=1)


@dataclass
class MoEWeights:
    architecture: str  # the model class name (e.g. MixtralForCausalLM)
    model_type: str  # config.model_type
    top_k: int  # experts per token
    layers: list[MoELayer]  # the MoE layers in order

    skipped: dict[str, str] = field(default_factory=dict)  # router name -> why its layer is not read

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts

    @property
    def hidden_size(self) -> int:
        return self.layers[0].up.shape[2]

    def routers(self) -> torch.Tensor:
        """(L, E, H) every MoE layer's router weight."""
        missing = [layer.router_name for layer in self.layers if layer.router is None]
        if missing:
            raise UnsupportedMoEError(f"{self.architecture}: routers {missing[:3]} are not one linear map "
                                      f"(no router matrix); only their experts are read")
        return torch.stack([layer.router for layer in self.layers])


@dataclass
class _Experts:
    gate: torch.Tensor | None  # (E, I, H), None for plain MLP experts
    up: torch.Tensor  # (E, I, H)
    down: torch.Tensor  # (E, H, I)
    act: Callable = F.silu
    glu: Callable | None = None
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def _fused(experts: nn.Module, hidden: int) -> _Experts | None:
    """transformers 5's fused experts: gate_up_proj (E, 2I, H) and down_proj (E, H, I), or their
    transposes (E, H, 2I) / (E, I, H) (Aria, Llama-4, GPT-OSS), or non-gated up_proj + down_proj
    (Nemotron-H); biases ``gate_up_proj_bias`` / ``down_proj_bias`` where present; an own gating
    method ``_apply_gate(gate_up)`` (GPT-OSS, MiniMax-M3) is kept, with its column order (halves, or
    gate/up interleaved) found by probing it."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    up_only = getattr(experts, "up_proj", None)
    if not isinstance(down, torch.Tensor) or not isinstance(gate_up if gate_up is not None else up_only, torch.Tensor):
        return None
    read_in = (gate_up if gate_up is not None else up_only).detach()
    down = down.detach()
    if read_in.ndim != 3 or down.ndim != 3:
        raise UnsupportedMoEError(f"{type(experts).__name__}: fused weights of shapes {tuple(read_in.shape)}, "
                                  f"{tuple(down.shape)} are not 3-D")
    # transformers 5's layout is (E, 2I, H) + (E, H, I); Aria and Llama-4 store (E, H, 2I) + (E, I, H).
    # The read-in shape decides unless 2I == H; then the down projection (I != H) decides.
    if read_in.shape[1] != read_in.shape[2]:
        transposed = read_in.shape[1] == hidden
    elif down.shape[1] != down.shape[2]:
        transposed = down.shape[2] == hidden
    else:
        raise UnsupportedMoEError(f"{type(experts).__name__}: cannot tell the layout of square expert weights "
                                  f"{tuple(read_in.shape)}, {tuple(down.shape)}")
    if transposed:
        read_in, down = read_in.transpose(1, 2), down.transpose(1, 2)  # -> (E, 2I, H), (E, H, I)
    if read_in.shape[0] > down.shape[0]:  # LongCat-Flash: gate_up_proj also has (unused) rows for its
        read_in = read_in[: down.shape[0]]  # zero-computation experts, which the forward never reads
    if read_in.shape[2] != hidden or down.shape[1] != hidden:
        raise UnsupportedMoEError(f"{type(experts).__name__}: expert weights {tuple(read_in.shape)}, "
                                  f"{tuple(down.shape)} do not read from / write to hidden size {hidden}")
    bias_in = getattr(experts, "gate_up_proj_bias" if gate_up is not None else "up_proj_bias", None)
    bias_down = getattr(experts, "down_proj_bias", None)
    bias_in = bias_in.detach() if isinstance(bias_in, torch.Tensor) else None  # (E, 2I) or (E, I)
    bias_down = bias_down.detach() if isinstance(bias_down, torch.Tensor) else None  # (E, H)
    act = getattr(experts, "act_fn", F.silu)
    if gate_up is None:
        return _Experts(None, read_in, down, act, up_bias=bias_in, down_bias=bias_down)
    apply_gate = getattr(experts, "_apply_gate", None)
    interleaved = callable(apply_gate) and _interleaved(apply_gate, read_in.shape[1])
    if interleaved:  # columns g0, u0, g1, u1, ...
        gate, up = read_in[:, 0::2], read_in[:, 1::2]
        gb, ub = (bias_in[:, 0::2], bias_in[:, 1::2]) if bias_in is not None else (None, None)
    else:  # the forward splits the output in halves, gate first
        gate, up = read_in.chunk(2, dim=1)
        gb, ub = bias_in.chunk(2, dim=1) if bias_in is not None else (None, None)
    glu = None
    if callable(apply_gate):
        glu = (lambda g, u: apply_gate(torch.stack([g, u], dim=-1).flatten(-2))) if interleaved else \
              (lambda g, u: apply_gate(torch.cat([g, u], dim=-1)))
    elif callable(act) and len(inspect.signature(act.forward if isinstance(act, nn.Module) else act).parameters) == 2:
        glu, act = act, F.silu  # a two-input activation module act(gate, up) (Inkling-2's softcapped SwiGLU)
    return _Experts(gate, up, down, act, glu, gb, ub, bias_down)


def _interleaved(apply_gate: Callable, width: int) -> bool:
    """Whether ``apply_gate`` reads (gate, up) pairs from interleaved columns: changing column 1 moves
    output column 0 when column 1 is up_0 (interleaved), output column 1 when it is gate_1 (halves)."""
    z = torch.randn(1, width, generator=torch.Generator().manual_seed(0)) * 0.5
    bumped = z.clone()
    bumped[0, 1] += 1.0
    with torch.no_grad():
        moved = (apply_gate(bumped) - apply_gate(z)).abs()[0]  # (width / 2,)
    return bool(moved[0] > 0 and moved[1] == 0)


def _parallel(block: nn.Module) -> _Experts | None:
    """JetMoE's MLP experts: ``input_linear.weight`` (E, 2I, H), halves gate then up, and
    ``output_linear.weight`` (E, H, I), with the block's ``activation``."""
    read_in, out = getattr(block, "input_linear", None), getattr(block, "output_linear", None)
    if not isinstance(getattr(read_in, "weight", None), torch.Tensor) or not isinstance(getattr(out, "weight", None),
                                                                                        torch.Tensor):
        return None
    gate, up = read_in.weight.detach().chunk(2, dim=1)
    return _Experts(gate, up, out.weight.detach(), getattr(block, "activation", F.silu))


def _dbrx(experts: nn.Module, hidden: int) -> _Experts | None:
    """DBRX: ``experts.mlp`` holds w1 (gate), v1 (up) and w2 (down, stored transposed) as (E*I, H)."""
    mlp = getattr(experts, "mlp", None)
    if not all(isinstance(getattr(mlp, n, None), torch.Tensor) for n in ("w1", "v1", "w2")):
        return None
    num = int(getattr(mlp, "moe_num_experts"))
    w1, v1, w2 = (getattr(mlp, n).detach().view(num, -1, hidden) for n in ("w1", "v1", "w2"))  # (E, I, H) each
    return _Experts(w1, v1, w2.transpose(1, 2), getattr(mlp, "activation_fn", F.silu))


def router_matrix(module: nn.Module, hidden: int) -> tuple[torch.Tensor, str] | None:
    """(weight (E, H), where) of a router: its own ``weight`` or the one linear map among its children
    that reads the hidden state (AFMoE ``router.gate``, Gemma-4 ``router.proj``, HunYuan ``gate.wg``,
    DBRX ``router.layer``, LongCat-Flash ``router.classifier``); None when there is no single one."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[1] == hidden:
        return weight.detach(), ""
    linears = [(n, m) for n, m in module.named_modules() if n and isinstance(m, nn.Linear) and m.in_features == hidden]
    if len(linears) == 1 and len([m for m in module.modules() if isinstance(m, nn.Linear)]) == 1:
        return linears[0][1].weight.detach(), linears[0][0]
    return None


_PER_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))  # Mixtral 4.x; OLMoE/Qwen 4.x


def _per_expert(experts: nn.Module) -> "_Experts | None":
    """(gate, up, down) from a ModuleList of per-expert MLPs (transformers 4.x layouts)."""
    if not isinstance(experts, nn.ModuleList) or len(experts) == 0:
        return None
    for names in _PER_EXPERT_NAMES:
        if all(hasattr(experts[0], n) for n in names):
            gate, up, down = (torch.stack([getattr(e, n).weight.detach() for e in experts]) for n in names)
            return _Experts(gate, up, down, getattr(experts[0], "act_fn", F.silu))
    return None


def moe_weights(model: nn.Module) -> MoEWeights:
    """Router and expert weights of every MoE layer of a transformers MoE causal LM (see the table
    in the module docstring). Tensors are detached views of the parameters (no copy)."""
    routers = find_routers(model)
    config = getattr(model, "config", None)
    hidden = config_value(config, ("hidden_size", "d_model"))
    arch = type(model).__name__
    named = dict(model.named_modules())
    layers, skipped = [], {}
    for name, module, index in zip(routers.names, routers.modules, routers.moe_layers):
        found = router_matrix(module, hidden)
        weight = found[0] if found is not None else None  # None: a router MLP (Zaya), no matrix
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = named[parent_name]
        if callable(getattr(parent, "map", None)) and callable(getattr(parent, "reduce", None)):
            skipped[name] = "its experts are attention projections (JetMoE's mixture of attention heads)"
            continue
        experts = getattr(parent, "experts", None)
        try:
            parts = (_parallel(parent) if experts is None else
                     (_fused(experts, hidden) or _per_expert(experts) or _dbrx(experts, hidden)))
        except UnsupportedMoEError as err:
            raise UnsupportedMoEError(f"{arch}: {err}") from None
        if parts is None:
            raise UnsupportedMoEError(f"{arch}: cannot read the experts beside router {name} "
                                      f"({type(experts).__name__}); supported: fused gate_up_proj/down_proj "
                                      f"(transformers 5) or per-expert w1/w3/w2 or gate/up/down_proj modules")
        shared = None
        if weight is not None and parts.up.shape[0] != weight.shape[0]:
            extra = weight.shape[0] - parts.up.shape[0]
            zero = config_value(config, ("zero_expert_num",)) or 0
            n_shared = config_value(config, ("n_shared_experts",)) or 0
            if extra == zero and zero:  # LongCat-Flash: rows after the real experts score identity experts
                weight = weight[: parts.up.shape[0]]
            elif extra == n_shared and n_shared and hasattr(module, "n_shared_experts"):
                weight, shared = weight[: parts.up.shape[0]], weight[parts.up.shape[0]:]  # Inkling: shared last
            else:
                raise UnsupportedMoEError(f"{arch}: router {name} scores {weight.shape[0]} experts but "
                                          f"{parts.up.shape[0]} experts sit beside it")
        experts_name = f"{parent_name}.experts" if experts is not None else parent_name
        layers.append(MoELayer(index, name, weight, parts.gate, parts.up, parts.down, experts_name, parts.act,
                               parts.glu, parts.gate_bias, parts.up_bias, parts.down_bias, shared))
    top_k = int(config_value(config, ("num_experts_per_tok", "moe_top_k", "top_k_experts", "moe_topk",
                                       "num_experts_per_token")) or 0)
    if not layers:
        raise UnsupportedMoEError(f"{arch}: no MoE layer with readable experts ({'; '.join(skipped.values())})")
    return MoEWeights(arch, str(getattr(config, "model_type", "")), top_k, layers, skipped)


# ---- checkpoints of routelib.models.LM ---------------------------------------------------------


def checkpoint_steps(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete ``step_*`` checkpoint of a ``routelib.train`` run, by step."""
    run_dir = Path(run_dir)
    found = [(int(p.name[5:]), p) for p in run_dir.glob("step_*") if (p / "state.json").is_file()]
    if not found:
        raise FileNotFoundError(f"no complete checkpoint (step_*/state.json) in {run_dir}")
    return sorted(found)


def hf_from_checkpoint(path: str | Path) -> nn.Module:
    """The transformers Mixtral equivalent of a ``routelib.models.LM`` checkpoint folder (model.safetensors
    + state.json with ``model_config``), built in memory, in eval mode -- what ``export_hf`` would
    write and ``from_pretrained`` read back."""
    from routelib.models.lm import LM, LMConfig
    from routelib.train import load_checkpoint

    state = json.loads((Path(path) / "state.json").read_text())
    if "model_config" not in state:
        raise UnsupportedMoEError(f"{path}/state.json has no model_config: not a routelib.models.LM checkpoint")
    lm = LM(LMConfig(**state["model_config"]))
    load_checkpoint(path, lm)
    return hf_from_lm(lm, str(path))


def hf_from_lm(lm: nn.Module, name: str = "the model") -> nn.Module:
    """The transformers Mixtral equivalent of a ``routelib.models.LM`` MoE model in memory (eval mode)."""
    import transformers

    from routelib.models.export import mixtral_config

    if not lm.config.is_moe:
        raise UnsupportedMoEError(f"{name}: a dense routelib LM (num_experts=0) has no routers")
    hf_config = mixtral_config(lm.config)
    hf_config.pop("architectures", None)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**hf_config))
    missing, unexpected = model.load_state_dict(lm.hf_state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and lm.config.tie_embeddings)]
    if missing or unexpected:
        raise UnsupportedMoEError(f"{name}: weights do not map onto Mixtral (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if lm.config.tie_embeddings:
        model.tie_weights()
    return model.eval()
