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
from routelib.routing.collect import config_value, find_routers


class UnsupportedMoEError(RoutelibError, ValueError):
    """A model whose router or experts this module cannot read (names the architecture)."""


@dataclass
class MoELayer:
    index: int  # decoder-layer index of this MoE layer
    router_name: str  # qualified name of the router module
    router: torch.Tensor  # (E, H) router weight: logits = hidden @ router.T
    gate: torch.Tensor | None  # (E, I, H) SwiGLU gate projection (the SiLU branch); None: plain MLP experts
    up: torch.Tensor  # (E, I, H) SwiGLU up projection
    down: torch.Tensor  # (E, H, I) down projection back to the residual stream
    experts_name: str = ""  # qualified name of the experts module
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu  # the activation on the gate branch

    @property
    def num_experts(self) -> int:
        return self.up.shape[0]

    def expert_output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """(T, H): expert ``e`` applied to ``x`` (T, H) from these weights alone: down(act(gate x) * up x),
        or down(act(up x)) for plain MLP experts."""
        if self.gate is None:
            return self.act(x @ self.up[e].T) @ self.down[e].T
        return (self.act(x @ self.gate[e].T) * (x @ self.up[e].T)) @ self.down[e].T

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

    @property
    def num_experts(self) -> int:
        return self.layers[0].router.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.layers[0].router.shape[1]

    def routers(self) -> torch.Tensor:
        """(L, E, H) every MoE layer's router weight."""
        return torch.stack([layer.router for layer in self.layers])


def _fused(experts: nn.Module, hidden: int) -> tuple[torch.Tensor | None, ...] | None:
    """(gate, up, down) from transformers 5's fused experts: gate_up_proj (E, 2I, H) and down_proj
    (E, H, I), or their transposes (E, H, 2I) / (E, I, H) (Aria, Llama-4), or non-gated up_proj +
    down_proj (Nemotron-H). Experts with biases or an interleaved gate/up layout are refused by name."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    up_only = getattr(experts, "up_proj", None)
    if not isinstance(down, torch.Tensor) or not isinstance(gate_up if gate_up is not None else up_only, torch.Tensor):
        return None
    biases = [n for n, _ in experts.named_parameters(recurse=False) if "bias" in n]
    if biases:
        raise UnsupportedMoEError(f"{type(experts).__name__}: experts with biases ({', '.join(biases)}) and their own "
                                  f"activation are not SwiGLU or plain MLPs; this reader returns bias-free weights only")
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
    if read_in.shape[2] != hidden or down.shape[1] != hidden:
        raise UnsupportedMoEError(f"{type(experts).__name__}: expert weights {tuple(read_in.shape)}, "
                                  f"{tuple(down.shape)} do not read from / write to hidden size {hidden}")
    if gate_up is None:
        return None, read_in, down  # plain MLP experts: down(act(up x))
    gate, up = read_in.chunk(2, dim=1)  # (E, I, H) each: the forward splits the output in this order
    return gate, up, down


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
    hidden = config_value(config, ("hidden_size", "d_model"))
    arch = type(model).__name__
    named = dict(model.named_modules())
    layers = []
    for name, module, index in zip(routers.names, routers.modules, routers.moe_layers):
        found = router_matrix(module, hidden)
        if found is None:
            raise UnsupportedMoEError(f"{arch}: router {name} ({type(module).__name__}) has no single (experts, "
                                      f"hidden={hidden}) linear map (a router MLP or none): its scores are not "
                                      f"hidden @ W.T, so there is no router matrix to return")
        weight, _ = found
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = named[parent_name]
        experts = getattr(parent, "experts", None)
        parts = None if experts is None else (_fused(experts, hidden) or _per_expert(experts))
        if parts is None:
            raise UnsupportedMoEError(f"{arch}: cannot read the experts beside router {name} "
                                      f"({type(experts).__name__}); supported: fused gate_up_proj/down_proj "
                                      f"(transformers 5) or per-expert w1/w3/w2 or gate/up/down_proj modules")
        gate, up, down = parts
        if up.shape[0] != weight.shape[0]:
            extra = weight.shape[0] - up.shape[0]
            zero = config_value(config, ("zero_expert_num",)) or 0
            if extra == zero and zero:  # LongCat-Flash: rows after the real experts score identity experts
                weight = weight[: up.shape[0]]
            else:
                raise UnsupportedMoEError(f"{arch}: router {name} scores {weight.shape[0]} experts but "
                                          f"{up.shape[0]} experts sit beside it")
        experts_name = f"{parent_name}.experts" if parent_name else "experts"
        layers.append(MoELayer(index, name, weight, gate, up, down, experts_name,
                               getattr(experts, "act_fn", F.silu)))
    top_k = int(config_value(config, ("num_experts_per_tok", "moe_top_k", "top_k_experts", "moe_topk",
                                       "num_experts_per_token")) or 0)
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
