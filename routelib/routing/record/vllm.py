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

A multi-GPU node: :class:`EngineOptions` passes vLLM's parallelism and memory settings through
(``--tensor_parallel_size 4 --pipeline_parallel_size 2 --enable_expert_parallel true ...`` on the
command line), checked before the engine starts. Written against the engine arguments vLLM documents
for its offline ``LLM`` class from 0.8 to 0.14 (``tensor_parallel_size``, ``pipeline_parallel_size``,
``data_parallel_size``, ``enable_expert_parallel``, ``distributed_executor_backend``,
``gpu_memory_utilization``, ``max_model_len``, ``max_num_seqs``, ``enforce_eager``, ``quantization``,
``kv_cache_dtype``, ``trust_remote_code``); ``enable_return_routed_experts`` is newer than most of
them. Offline data parallelism in vLLM runs one engine per data-parallel rank, each started by its
own process with vLLM's rank environment; ``data_parallel_size`` is passed through as given.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
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


EXECUTOR_BACKENDS = ("mp", "ray", "uni", "external_launcher")  # vLLM's distributed_executor_backend values


@dataclass
class EngineOptions:
    tensor_parallel_size: int = 1  # GPUs each layer is split over
    pipeline_parallel_size: int = 1  # stages the layers are split into (GPUs or nodes)
    data_parallel_size: int = 1  # engine replicas (vLLM starts one per data-parallel rank)
    enable_expert_parallel: bool = False  # spread a MoE layer's experts over the GPUs instead of slicing each
    distributed_executor_backend: str = ""  # mp | ray | uni | external_launcher ("": vLLM's choice)
    gpu_memory_utilization: float = 0.9  # share of each GPU's memory vLLM may take
    max_model_len: int = 0  # context length to reserve for (0: the model's)
    max_num_seqs: int = 0  # sequences decoded at once (0: vLLM's default)
    enforce_eager: bool = False  # no CUDA graphs (slower; less memory, easier debugging)
    quantization: str = ""  # e.g. fp8, awq, gptq ("": as the checkpoint says)
    kv_cache_dtype: str = ""  # e.g. fp8 ("": the model's dtype)
    trust_remote_code: bool = False  # run a model repository's own code

    def __post_init__(self):
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)}: need >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu_memory_utilization {self.gpu_memory_utilization}: must lie in (0, 1]")
        if self.distributed_executor_backend and self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ConfigError(f"--distributed_executor_backend {self.distributed_executor_backend!r}: choose from "
                              f"{', '.join(EXECUTOR_BACKENDS)}")
        if self.max_model_len < 0 or self.max_num_seqs < 0:
            raise ConfigError("--max_model_len and --max_num_seqs: need >= 0 (0: vLLM's default)")

    def gpus_per_engine(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def check_devices(self, visible: int | None) -> None:
        """Refuse, before an engine starts, a layout that needs more GPUs on this node than are visible
        (pipeline stages on other nodes come with ray: then only the tensor-parallel group must fit)."""
        if visible is None:
            return
        needed = self.tensor_parallel_size if self.distributed_executor_backend == "ray" else self.gpus_per_engine()
        if needed > visible:
            raise ConfigError(f"tensor x pipeline parallel = {needed} GPUs per engine, but {visible} visible here "
                              f"(CUDA_VISIBLE_DEVICES / torch.cuda.device_count())")

    def llm_kwargs(self) -> dict[str, Any]:
        """The settings that differ from vLLM's defaults, as ``LLM(...)`` keyword arguments."""
        defaults = EngineOptions()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(defaults, f.name)}


def visible_gpus() -> int | None:
    """GPUs this process can use (None when it cannot tell: no CUDA build of torch)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.device_count() if torch.version.cuda else None


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
    llm_kwargs = dict(llm_kwargs or {})
    raw = requests_dir(out_dir)
    raw.mkdir(parents=True, exist_ok=True)
    llm = vllm.LLM(model=model, dtype=dtype, enable_return_routed_experts=True, **llm_kwargs)
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
               "engine": llm_kwargs, "generation": generation, "requests_dir": str(raw)}
    manifest, _ = import_vllm([raw], out_dir, num_experts=num_experts, model=model, command=command,
                              extra_source=backend)
    return manifest
