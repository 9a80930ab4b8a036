"""Hugging Face Mixtral checkpoints from routelib LMs, and routelib LMs from Mixtral checkpoints.

``export_hf(model, tokenizer, out_dir)`` writes a folder that
``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` opens offline as a
``MixtralForCausalLM`` computing the same logits and the same routing as the routelib model:

    config.json              MixtralConfig (transformers v5 fields, plus v4's rope_theta/torch_dtype)
    generation_config.json   bos / eos / pad ids
    model.safetensors        the weights, in the model's dtype or ``dtype=``
    routelib.json            the LMConfig (router options Mixtral has no field for)
    tokenizer files          ``tokenizer.save_pretrained(out_dir)``, when a tokenizer is given

Format decisions:

- **Weight names**: the per-expert layout ``model.layers.{i}.block_sparse_moe.experts.{e}.w1/w2/w3
  .weight`` + ``block_sparse_moe.gate.weight`` -- what the Mixtral hub checkpoints use and what
  transformers 5.x itself writes from ``save_pretrained`` (it reverses its fused ``gate_up_proj`` /
  ``down_proj`` on save and fuses them again on load), so transformers 4.x and 5.x and vLLM all
  read it. ``load_hf`` reads this layout and the fused v5 one (``mlp.experts.gate_up_proj``).
- **Dense models** (``num_experts = 0``) export as Mixtral with ``num_local_experts = 1`` and
  ``num_experts_per_tok = 1``: the router's softmax over a single expert is 1.0 (renormalised:
  1.0) whatever its logit, so the block *is* the dense SwiGLU ``w2(silu(w1 x) * w3 x)``; the router
  weight is written as zeros. One architecture for both arms keeps one loader and lets the routing
  collection code run unchanged on the baseline (every token "chooses" expert 0).
- **Tied embeddings**: ``tie_word_embeddings = true`` and no ``lm_head.weight`` tensor (as
  transformers writes it); transformers ties the head to ``model.embed_tokens.weight`` on load.
- **dtype**: the tensors keep the model's parameter dtype (``dtype=torch.bfloat16`` casts them);
  ``config.json`` records it as ``dtype`` (v5) and ``torch_dtype`` (v4).
- **Router loss coefficient**: routelib adds ``aux_loss_coef * L_l`` for every layer l, where
  ``L_l = E * sum_i f_i P_i`` with f counted per token-slot (1.0 when balanced);
  transformers adds ``router_aux_loss_coef * E * sum_i f'_i P_i`` once, pooled over layers, with
  f' counted per token (k when balanced). ``router_aux_loss_coef = aux_loss_coef * L / k`` makes the
  two totals equal for balanced routers (approximately equal otherwise). The z-loss, capacity and
  jitter options live in ``routelib.json``.
- Mixtral cannot express ``normalize_topk=False`` (export refuses) or capacity dropping (export
  warns: transformers computes the dropless model). ``sliding_window`` is written as null.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from routelib.config import from_params
from routelib.errors import ConfigError
from routelib.models.lm import LM, LMConfig

ROUTELIB_CONFIG = "routelib.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def mixtral_config(cfg: LMConfig, dtype: torch.dtype = torch.float32, tokenizer=None) -> dict:
    """The ``config.json`` dict of the Mixtral equivalent of ``cfg`` (see the module docstring)."""
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        ids = {k: getattr(tokenizer, k, None) for k in ids}
    experts, k = (cfg.num_experts, cfg.top_k) if cfg.is_moe else (1, 1)
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "num_local_experts": experts,
        "num_experts_per_tok": k,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},  # transformers 5.x
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "router_aux_loss_coef": cfg.aux_loss_coef * cfg.num_layers / k if cfg.is_moe else 0.0,
        "router_jitter_noise": cfg.router_jitter if cfg.is_moe else 0.0,
        "output_router_logits": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": _dtype_name(dtype),  # transformers 5.x
        "torch_dtype": _dtype_name(dtype),  # transformers 4.x
        **ids,
    }


def mixtral_tensors(model: LM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under per-expert Mixtral names, in ``dtype`` (default: the parameters'
    own), as fresh contiguous CPU tensors sharing no storage (``safetensors.torch.save_file`` refuses
    shared storage), so each expert slice is copied."""
    out = {}
    for name, t in model.hf_state_dict().items():
        t = t.to("cpu", dtype or t.dtype)
        if name.endswith("mlp.gate.weight"):
            out[name.replace(".mlp.", ".block_sparse_moe.")] = t.contiguous()
        elif name.endswith("mlp.experts.gate_up_proj"):  # (E, 2I, H) -> w1, w3 (I, H) per expert
            base = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts.")
            w1, w3 = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{base}{e}.w1.weight"] = w1[e].clone(memory_format=torch.contiguous_format)
                out[f"{base}{e}.w3.weight"] = w3[e].clone(memory_format=torch.contiguous_format)
        elif name.endswith("mlp.experts.down_proj"):  # (E, H, I) -> w2 (H, I) per expert
            base = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts.")
            for e in range(t.shape[0]):
                out[f"{base}{e}.w2.weight"] = t[e].clone(memory_format=torch.contiguous_format)
        else:
            out[name] = t.clone(memory_format=torch.contiguous_format)
    return out


def export_hf(model: LM, tokenizer=None, out_dir: str | os.PathLike = "hf_model",
              dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``, a transformers tokenizer, if given) as a Hugging Face
    Mixtral checkpoint into ``out_dir``; returns its path. See the module docstring for the format."""
    cfg = model.config
    if cfg.is_moe and not cfg.normalize_topk:
        raise ConfigError("LMConfig.normalize_topk=False has no Mixtral equivalent (Mixtral renormalises "
                          "the top-k gates); such a model cannot be exported as Mixtral")
    if cfg.is_moe and cfg.capacity_factor is not None:
        warnings.warn(f"LMConfig.capacity_factor={cfg.capacity_factor}: Mixtral is dropless, so the "
                      f"exported model keeps tokens this model drops when experts overflow")
    if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens, more than LMConfig.vocab_size="
                          f"{cfg.vocab_size}")
    if dtype is not None and dtype not in _DTYPES.values():
        raise ConfigError(f"dtype={dtype}: choose one of {list(_DTYPES.values())}")
    tensors = mixtral_tensors(model, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = out / WEIGHTS_INDEX  # a sharded checkpoint left here would shadow ours
    if stale.exists():
        stale.unlink()
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    hf = mixtral_config(cfg, tensors["model.embed_tokens.weight"].dtype, tokenizer)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    generation = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf[k] is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / ROUTELIB_CONFIG).write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------
# loading


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards a ``model.safetensors.index.json`` names."""
    if (path / WEIGHTS_INDEX).is_file():
        files = sorted(set(json.loads((path / WEIGHTS_INDEX).read_text())["weight_map"].values()))
    elif (path / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise FileNotFoundError(f"no {WEIGHTS} or {WEIGHTS_INDEX} in {path}")
    tensors = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def _fuse_experts(tensors: dict[str, torch.Tensor], num_layers: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert (``block_sparse_moe.experts.{e}.w1/w3/w2``) names -> the fused v5 names the model
    loads (``mlp.gate.weight``, ``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj``)."""
    out = {k: v for k, v in tensors.items() if ".block_sparse_moe." not in k}
    for i in range(num_layers):
        p = f"model.layers.{i}.block_sparse_moe."
        if p + "gate.weight" not in tensors:
            continue  # already fused (or missing: load_hf_state_dict reports it)
        q = f"model.layers.{i}.mlp."
        try:
            out[q + "gate.weight"] = tensors[p + "gate.weight"]
            out[q + "experts.gate_up_proj"] = torch.stack([
                torch.cat((tensors[f"{p}experts.{e}.w1.weight"], tensors[f"{p}experts.{e}.w3.weight"]))
                for e in range(num_experts)])  # (E, 2I, H)
            out[q + "experts.down_proj"] = torch.stack(
                [tensors[f"{p}experts.{e}.w2.weight"] for e in range(num_experts)])  # (E, H, I)
        except KeyError as err:
            raise ConfigError(f"checkpoint lacks {err.args[0]!r}") from None
    return out


def lm_config_from_mixtral(hf: dict, routelib_cfg: dict | None = None) -> LMConfig:
    """An LMConfig from a Mixtral ``config.json`` dict; ``routelib_cfg`` (a ``routelib.json``) adds
    the options Mixtral has no field for. Without it a 1-expert top-1 Mixtral becomes dense."""
    if hf.get("model_type") != "mixtral":
        raise ConfigError(f"not a Mixtral checkpoint: model_type={hf.get('model_type')!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r}: routelib's experts are SwiGLU (silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"rope scaling {rope!r} is not supported, only the default RoPE")
    if hf.get("sliding_window") is not None:
        warnings.warn(f"sliding_window={hf['sliding_window']} is ignored: routelib attends to the full "
                      f"context (identical for inputs shorter than the window)")
    heads = hf.get("num_attention_heads", 32)
    experts, k, layers = hf.get("num_local_experts", 8), hf.get("num_experts_per_tok", 2), hf.get("num_hidden_layers", 32)
    dense = experts == 1 and k == 1
    params = dict(
        vocab_size=hf.get("vocab_size", 32000),
        hidden_size=hf.get("hidden_size", 4096),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        intermediate_size=hf.get("intermediate_size", 14336),
        num_experts=0 if dense else experts,
        top_k=k,
        router_jitter=float(hf.get("router_jitter_noise", 0.0)),
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)) * k / layers,
        max_seq_len=hf.get("max_position_embeddings", 4096 * 32),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e6))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    if routelib_cfg is not None:
        arch = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                "tie_embeddings")
        clash = [n for n in arch if n in routelib_cfg and routelib_cfg[n] != params[n]]
        if clash:
            raise ConfigError(f"{ROUTELIB_CONFIG} disagrees with config.json on {clash}")
        params = {**params, **routelib_cfg}
    return from_params(LMConfig, params)


def load_hf(path: str | os.PathLike, dtype: torch.dtype | None = None) -> LM:
    """A routelib :class:`LM` from a Mixtral checkpoint folder: one written by :func:`export_hf`, by
    transformers' ``save_pretrained`` (v4 or v5) or downloaded from the hub (e.g. Mixtral-8x7B;
    sharded safetensors are read). ``dtype``: None keeps the checkpoint's. Returns it in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    hf = json.loads((path / "config.json").read_text())
    extra = path / ROUTELIB_CONFIG
    cfg = lm_config_from_mixtral(hf, json.loads(extra.read_text()) if extra.is_file() else None)
    tensors = _fuse_experts(_read_tensors(path), cfg.num_layers, cfg.num_experts or 1)
    if dtype is None:
        dtype = tensors["model.embed_tokens.weight"].dtype
    with torch.device("meta"):
        model = LM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    if cfg.tie_embeddings:  # to_empty re-creates parameters: tie them again
        model.lm_head.weight = model.embed.weight
    model.load_hf_state_dict(tensors)
    return model.eval()
