"""Collection with vLLM (``python -m routelib.routing.record.collect --backend vllm ...``): for users with GPUs.

vLLM returns the experts every token was routed to when its engine is started with
``LLM(model, enable_return_routed_experts=True)``: each ``CompletionOutput.routed_experts`` is an
array [seq_len, layers, top_k] over the prompt and the generated tokens. This backend generates
every prompt of every dataset with one engine, saves each request as a ``.npz`` file in a folder
beside the traces (``<out>.vllm-requests/<dataset>-<index>.npz``; kept, so that the import can be
re-run) and imports them with :func:`routelib.routing.record.convert.import_vllm` -- the same checks and
manifest as any import (``source.kind == "vllm"``, plus the backend's generation settings).

Limits, said plainly: vLLM is an optional dependency (``pip install vllm``, a GPU build); it returns
routed experts only where its Model Runner V2 runs, which needs Triton (no CPU backend), so this path
is tested up to the engine boundary with a stand-in ``vllm`` module and **has not yet run on a GPU**.
vLLM returns no gate weights: the traces get weight 1/k per slot (``weights_source`` in the layout).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Mapping

from routelib.errors import ConfigError, RoutelibError
from routelib.routing.record.convert import import_vllm, save_vllm_output

#: The config fields that give the number of routed experts per MoE layer, by model family.
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


class VLLMUnavailable(RoutelibError, ImportError):
    """vLLM is not installed (or cannot be imported) here."""


def require_vllm():
    """The ``vllm`` module, or :class:`VLLMUnavailable` saying how to get it."""
    try:
        return importlib.import_module("vllm")
    except ImportError as err:
        raise VLLMUnavailable(f"--backend vllm needs vLLM, which is not importable here ({err}): pip install vllm "
                              f"(a GPU build; routed experts need its Model Runner V2), or use the default "
                              f"--backend transformers") from None


def num_experts_of(model: str) -> int:
    """Experts per MoE layer from the model's transformers config (local folder or Hub id)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    config = getattr(config, "text_config", None) or config
    for name in EXPERT_COUNT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"{model}: its config names no expert count ({', '.join(EXPERT_COUNT_FIELDS)}); pass "
                      f"--num_experts")


def requests_dir(out_dir: str | os.PathLike) -> Path:
    """Where the backend keeps the raw request files of ``out_dir``."""
    out = Path(out_dir)
    return out.with_name(out.name + ".vllm-requests")


def collect_vllm(model: str, prompts: Mapping[str, Mapping[str, str]], out_dir: str | os.PathLike, *,
                 max_new_tokens: Mapping[str, int], greedy: bool = True, dtype: str = "auto",
                 num_experts: int | None = None, llm_kwargs: Mapping[str, Any] | None = None,
                 command: str | None = None, sampling: Mapping[str, float] | None = None,
                 seed: int | None = None) -> dict:
    """Generate ``prompts`` ({dataset: {problem_id: prompt}}) with one vLLM engine and write their
    routing to ``out_dir`` (a new folder); returns the manifest. Not ``greedy``: vLLM samples with
    ``sampling`` (temperature, top_p) and ``seed`` (vLLM's per-request seed)."""
    vllm = require_vllm()
    num_experts = num_experts or num_experts_of(model)
    raw = requests_dir(out_dir)
    raw.mkdir(parents=True, exist_ok=True)
    llm = vllm.LLM(model=model, dtype=dtype, enable_return_routed_experts=True, **dict(llm_kwargs or {}))
    generation = {}
    for dataset, items in prompts.items():
        settings = {"temperature": 0.0} if greedy else {**dict(sampling or {}), **({"seed": seed} if seed is not None else {})}
        params = vllm.SamplingParams(max_tokens=max_new_tokens[dataset], **settings)
        outputs = llm.generate(list(items.values()), params)  # one RequestOutput per prompt, in order
        if len(outputs) != len(items):
            raise RoutelibError(f"vLLM returned {len(outputs)} outputs for {len(items)} {dataset} prompts")
        for index, (problem_id, output) in enumerate(zip(items, outputs)):
            save_vllm_output(raw / f"{dataset}-{index:05d}.npz", output, dataset=dataset, problem_id=problem_id)
        generation[dataset] = {"max_new_tokens": max_new_tokens[dataset], "greedy": greedy, "problems": len(items),
                               **({} if greedy else settings)}
    backend = {"backend": "vllm", "vllm_version": getattr(vllm, "__version__", None), "dtype": dtype,
               "generation": generation, "requests_dir": str(raw)}
    manifest, _ = import_vllm([raw], out_dir, num_experts=num_experts, model=model, command=command,
                              extra_source=backend)
    return manifest
