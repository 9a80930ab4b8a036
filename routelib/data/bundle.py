"""An offline data bundle: the corpus already tokenised and the benchmark prompts in one small folder,
so that code reading them runs where the asset packages are not installed (a lent GPU machine,
docs/design.md §8).

With ``ROUTELIB_DATA_BUNDLE=<folder>`` set, :func:`routelib.data.token_stream` reads the streams of
the bundled tokenizers (train, validation and test split of every domain) from the folder, and
:func:`routelib.data.load_humaneval` / :func:`routelib.data.load_gsm8k` (test split) read their records
from it; everything else -- other tokenizers, SmolLM2's weights -- still needs its asset package.
The streams are those of the machine that made the bundle (its code domain is that Python's standard
library), so a run reads the same tokens wherever it runs.

Layout (written by :func:`routelib.gpu.bundle.write_data_bundle`; ``python -m routelib.gpu --bundle`` packs
it)::

    data.json                                  what it holds: tokenizers by fingerprint, tokens per
                                               stream, prompts, the corpus fingerprint, Python version
    tokens/<tokenizer fingerprint>/<domain>-<split>.npy
    prompts/<name>.json                        humaneval, gsm8k-test (the loaders' records)
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from routelib.errors import ConfigError, MissingAssetError

ENV = "ROUTELIB_DATA_BUNDLE"  # environment variable naming the bundle folder
INDEX = "data.json"  # the bundle's table of contents
SPLITS = ("train", "validation", "test")  # the splits a bundle holds for every domain
PROMPTS = ("humaneval", "gsm8k-test")  # the benchmark records a bundle holds


def bundle_dir() -> Path | None:
    """The folder ``ROUTELIB_DATA_BUNDLE`` names, or None when it is unset; a clear error when it names
    something that is not a data bundle."""
    value = os.environ.get(ENV)
    if not value:
        return None
    folder = Path(value)
    if not (folder / INDEX).is_file():
        raise MissingAssetError(f"{ENV}={value}: no {INDEX} there, so it is not a data bundle; make one with "
                                f"`python -m routelib.gpu --bundle FILE` or unset {ENV}")
    return folder


@lru_cache(maxsize=64)
def _load_array(path: str) -> np.ndarray:
    return np.load(path)


def bundled_tokens(domain: str, split: str | None, tokenizer_key: str) -> np.ndarray | None:
    """The bundle's token stream (1-D) of ``domain`` and ``split`` for the tokenizer with fingerprint
    ``tokenizer_key``; None without a bundle, for ``split`` None (all splits) or a stream it lacks."""
    folder = bundle_dir()
    if folder is None or split is None:
        return None
    path = folder / "tokens" / tokenizer_key / f"{domain}-{split}.npy"
    return _load_array(str(path)) if path.is_file() else None


def bundled_records(name: str) -> list[dict] | None:
    """The bundle's records of benchmark ``name`` (one of :data:`PROMPTS`); None without a bundle or when
    it lacks them."""
    if name not in PROMPTS:
        raise ConfigError(f"unknown bundled benchmark {name!r}; known: {list(PROMPTS)}")
    folder = bundle_dir()
    path = None if folder is None else folder / "prompts" / f"{name}.json"
    return json.loads(path.read_text()) if path is not None and path.is_file() else None
