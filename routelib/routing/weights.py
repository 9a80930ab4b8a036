"""Router and expert weights of any supported MoE language model, layer by layer.

A model-agnostic view for weight-geometry studies (the seed's OLMoE router study, 002, built on
nnterp): :func:`moe_weights` finds each MoE layer's router (with
:func:`routelib.routing.collect.find_routers`, the same search the trace collection uses) and the
experts module beside it, and returns plain tensors -- router (E, H) and, per expert, the SwiGLU
weights gate (I, H), up (I, H), down (H, I). No tracing library is needed: the weights are
parameters, read once; activations come from the collection hooks.

=====================  =====================================  =====================================
architecture           router                                 experts
=====================  =====================================  =====================================
Mixtral (and our       ``layers[i].mlp.gate`` (transformers   fused ``experts.gate_up_proj``
export)                5; ``block_sparse_moe`` in 4.x)        (E, 2I, H) + ``down_proj`` (E, H, I);
                                                              4.x: ``experts[e].w1/w3/w2``
OLMoE                  ``layers[i].mlp.gate``                 fused, as Mixtral; 4.x:
                                                              ``experts[e].gate/up/down_proj``
Qwen2-MoE / Qwen3-MoE  ``layers[i].mlp.gate`` (MoE layers     fused, as Mixtral (Qwen2-MoE's shared
                       only; ``mlp_only_layers`` are dense)   expert is not one of the E experts and
                                                              is left out)
=====================  =====================================  =====================================

Anything else raises :class:`UnsupportedMoEError` naming the architecture and the module found.
Checkpoints of ``routelib.models.LM`` (notebook 03's training run) are turned into the equivalent
transformers Mixtral in memory by :func:`hf_from_checkpoint`, so every analysis has one code path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from routelib.errors import RoutelibError
from routelib.routing.collect import find_routers


class UnsupportedMoEError(RoutelibError, ValueError):
    """A model whose router or experts this module cannot read (names the architecture)."""


@dataclass
class MoELayer:
    index: int  # decoder-layer index of this MoE layer
    router_name: str  # qualified name of the router module
    router: torch.Tensor  # (E, H) router weight: logits = hidden @ router.T
    gate: torch.Tensor  # (E, I, H) SwiGLU gate projection (the SiLU branch) of every expert
    up: torch.Tensor  # (E, I, H) SwiGLU up projection
    down: torch.Tensor  # (E, H, I) down projection back to the residual stream
    experts_name: str = ""  # qualified name of the experts module
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu  # the activation on the gate branch

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    def expert_output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """(T, H): expert ``e`` applied to ``x`` (T, H) from these weights alone: down(act(gate x) * up x)."""
        return (self.act(x @ self.gate[e].T) * (x @ self.up[e].T)) @ self.down[e].T

    def expert_input(self) -> torch.Tensor:
        """(E, 2I, H): each expert's read-in matrix, gate and up rows stacked (what it reads from H)."""
        return torch.cat([self.gate, self.up], dim=1)


@dataclass
class MoEWeights:
    architecture: str  # the model class name (e.g. MixtralForCausalLM)
    model_type: str  # config.model_type
    top_k: int  # experts per token
    layers: list[MoELayer]  # the MoE layers in order

    @property
    def num_experts(self) -> int:
        return self.layers[0].router.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.layers[0].router.shape[1]

    def routers(self) -> torch.Tensor:
        """(L, E, H) every MoE layer's router weight."""
        return torch.stack([layer.router for layer in self.layers])


def _fused(experts: nn.Module, hidden: int) -> tuple[torch.Tensor, ...] | None:
    """(gate, up, down) from transformers 5's fused experts: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return None
    if gate_up.ndim != 3 or gate_up.shape[2] != hidden or down.shape[1] != hidden:
        raise UnsupportedMoEError(f"{type(experts).__name__}: fused expert weights of shapes "
                                  f"{tuple(gate_up.shape)}, {tuple(down.shape)} are not (E, 2I, {hidden}), (E, {hidden}, I)")
    gate, up = gate_up.detach().chunk(2, dim=1)  # (E, I, H) each: the forward splits the output in this order
    return gate, up, down.detach()


_PER_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))  # Mixtral 4.x; OLMoE/Qwen 4.x


def _per_expert(experts: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """(gate, up, down) from a ModuleList of per-expert MLPs (transformers 4.x layouts)."""
    if not isinstance(experts, nn.ModuleList) or len(experts) == 0:
        return None
    for names in _PER_EXPERT_NAMES:
        if all(hasattr(experts[0], n) for n in names):
            parts = [torch.stack([getattr(e, n).weight.detach() for e in experts]) for n in names]
            return tuple(parts)
    return None


def moe_weights(model: nn.Module) -> MoEWeights:
    """Router and expert weights of every MoE layer of a transformers MoE causal LM (see the table
    in the module docstring). Tensors are detached views of the parameters (no copy)."""
    routers = find_routers(model)
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    arch = type(model).__name__
    named = dict(model.named_modules())
    layers = []
    for name, module, index in zip(routers.names, routers.modules, routers.moe_layers):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != hidden:
            raise UnsupportedMoEError(f"{arch}: router {name} ({type(module).__name__}) has no (experts, "
                                      f"hidden={hidden}) weight; supported: Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE")
        parent = named[name.rsplit(".", 1)[0]] if "." in name else model
        experts = getattr(parent, "experts", None)
        parts = None if experts is None else (_fused(experts, hidden) or _per_expert(experts))
        if parts is None:
            raise UnsupportedMoEError(f"{arch}: cannot read the experts beside router {name} "
                                      f"({type(experts).__name__}); supported: fused gate_up_proj/down_proj "
                                      f"(transformers 5) or per-expert w1/w3/w2 or gate/up/down_proj modules")
        gate, up, down = parts
        if gate.shape[0] != weight.shape[0]:
            raise UnsupportedMoEError(f"{arch}: router {name} scores {weight.shape[0]} experts but "
                                      f"{gate.shape[0]} experts sit beside it")
        experts_name = f"{name.rsplit('.', 1)[0]}.experts" if "." in name else "experts"
        layers.append(MoELayer(index, name, weight.detach(), gate, up, down, experts_name,
                               getattr(experts, "act_fn", F.silu)))
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    return MoEWeights(arch, str(getattr(config, "model_type", "")), top_k, layers)


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
    import transformers

    from routelib.models.export import mixtral_config
    from routelib.models.lm import LM, LMConfig
    from routelib.train import load_checkpoint

    state = json.loads((Path(path) / "state.json").read_text())
    if "model_config" not in state:
        raise UnsupportedMoEError(f"{path}/state.json has no model_config: not a routelib.models.LM checkpoint")
    lm = LM(LMConfig(**state["model_config"]))
    load_checkpoint(path, lm)
    if not lm.config.is_moe:
        raise UnsupportedMoEError(f"{path}: a dense routelib LM (num_experts=0) has no routers")
    hf_config = mixtral_config(lm.config)
    hf_config.pop("architectures", None)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**hf_config))
    missing, unexpected = model.load_state_dict(lm.hf_state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and lm.config.tie_embeddings)]
    if missing or unexpected:
        raise UnsupportedMoEError(f"{path}: weights do not map onto Mixtral (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if lm.config.tie_embeddings:
        model.tie_weights()
    return model.eval()
