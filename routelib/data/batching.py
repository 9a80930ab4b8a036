"""Token streams and batches for language-model training and evaluation.

- :func:`token_stream` tokenises corpus documents and joins them, each followed by the
  end-of-document token, into one 1-D array (cached under ``CACHE_DIR/tokens``).
- :class:`TokenWindows` is the ``batch_fn(step, rank, world_size) -> (x, y)`` the training loop
  calls: random windows, a pure function of ``(seed, step)``; the step's global batch is split
  across ranks, so one process with batch B sees exactly what W processes see together.
- :func:`eval_batches` gives a fixed list of non-overlapping windows for evaluation.
- :func:`corpus_stats` counts documents, characters and tokens per domain and split.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from routelib.io import atomic_write
from routelib.errors import ConfigError
from routelib.paths import CACHE_DIR

Batch = tuple[torch.Tensor, torch.Tensor]  # x, y: (B, T) int64; y is x shifted left by one token


# ---------------------------------------------------------------------------------- token streams


_MEMO: dict[tuple, np.ndarray] = {}  # (domain, split, tokenizer hash, corpus hash) -> tokens


def _domain_split_tokens(domain: str, split: str | None, tokenizer_key: str, corpus_key: str,
                         tokenizer) -> np.ndarray:
    from routelib.data.corpus import load_corpus
    from routelib.data.tokenizer import separator_id

    key = (domain, split, tokenizer_key, corpus_key)
    if key in _MEMO:
        return _MEMO[key]
    path = CACHE_DIR / "tokens" / f"{tokenizer_key}-{corpus_key}" / f"{domain}-{split or 'all'}.npy"
    if path.is_file():
        _MEMO[key] = np.load(path)
        return _MEMO[key]
    docs = load_corpus(domain, split)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    sep = separator_id(tokenizer)
    encodings = tokenizer.backend_tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    parts = []
    for enc in encodings:
        parts.append(np.asarray(enc.ids, dtype=dtype))
        parts.append(np.asarray([sep], dtype=dtype))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, sync=False) as tmp, open(tmp, "wb") as f:  # a cache: rebuilt when missing
        np.save(f, tokens)
    _MEMO[key] = tokens
    return tokens


def token_stream(domains: str | Sequence[str] | None = None, split: str | None = "train",
                 tokenizer="bpe8k") -> np.ndarray:
    """Tokens of the corpus documents of ``domains`` (None = all, in DOMAINS order) and ``split``,
    each document followed by the separator (``<|endoftext|>``). 1-D uint16 (int32 for
    vocabularies over 65536). Treat it as read-only: it is shared with the in-process cache.
    With ``ROUTELIB_DATA_BUNDLE`` set, a data bundle's streams come first (:mod:`routelib.data.bundle`)."""
    from routelib.data.bundle import bundled_tokens
    from routelib.data.corpus import check_domains, check_split, sources_fingerprint
    from routelib.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    names = check_domains(domains)
    split = check_split(split)
    tok = load_tokenizer(tokenizer)
    tok_key = tokenizer_fingerprint(tok)
    arrays = [bundled_tokens(d, split, tok_key) for d in names]  # a data bundle's streams (ROUTELIB_DATA_BUNDLE)
    if any(a is None for a in arrays):
        corpus_key = sources_fingerprint()
        arrays = [_domain_split_tokens(d, split, tok_key, corpus_key, tok) for d in names]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def domain_streams(domains: str | Sequence[str] | None = None, split: str | None = "validation",
                   tokenizer="bpe8k") -> dict[str, np.ndarray]:
    """``{domain: token_stream(domain, split, tokenizer)}``, e.g. for per-domain evaluation."""
    from routelib.data.corpus import check_domains

    return {d: token_stream(d, split, tokenizer) for d in check_domains(domains)}


# ---------------------------------------------------------------------------------- batches


def _as_numpy(tokens) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ConfigError(f"tokens must be a 1-D integer array, got shape {tokens.shape} {tokens.dtype}")
    return tokens


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    idx = starts[:, None] + np.arange(seq_len + 1)  # (B, T+1)
    w = torch.from_numpy(tokens[idx].astype(np.int64))  # (B, T+1)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T), (B, T)


class TokenWindows:
    """Random training windows from a token stream, deterministic in ``(seed, step, rank)``.

    ``batch_fn(step, rank=0, world_size=1)`` returns ``(x, y)`` of shape
    ``(batch_size // world_size, seq_len)``: rows ``[rank*B/W, (rank+1)*B/W)`` of the step's
    global batch of ``batch_size`` windows, whose start offsets are drawn uniformly with
    ``numpy.random.default_rng([seed, step])`` (the same on every machine).
    """

    def __init__(self, tokens, seq_len: int, batch_size: int, seed: int = 0):
        self.tokens = _as_numpy(tokens)  # (N,)
        self.seq_len = int(seq_len)  # T: tokens per row of x
        self.batch_size = int(batch_size)  # B: rows per step summed over all ranks
        self.seed = int(seed)
        if self.seq_len < 1 or self.batch_size < 1:
            raise ConfigError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if len(self.tokens) < self.seq_len + 1:
            raise ConfigError(f"a stream of {len(self.tokens)} tokens is too short for seq_len={seq_len}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def global_starts(self, step: int) -> np.ndarray:
        """Start offsets (B,) of the global batch of ``step``."""
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        rng = np.random.default_rng([self.seed, int(step)])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)

    def __call__(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if self.batch_size % world_size:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by world_size={world_size}")
        per_rank = self.batch_size // world_size
        starts = self.global_starts(step)[rank * per_rank:(rank + 1) * per_rank]
        return _windows(self.tokens, starts, self.seq_len)

    def __repr__(self) -> str:
        return (f"TokenWindows(tokens={len(self.tokens)}, seq_len={self.seq_len}, "
                f"batch_size={self.batch_size}, seed={self.seed})")


def eval_batches(tokens, seq_len: int, batch_size: int, max_windows: int | None = None) -> list[Batch]:
    """Non-overlapping windows ``tokens[k*T : k*T + T + 1]`` in batches of ``batch_size`` (the last
    may be smaller). With ``max_windows``, that many windows spread evenly over the stream."""
    tokens = _as_numpy(tokens)
    n = (len(tokens) - 1) // seq_len  # full windows (each needs T+1 tokens)
    if n < 1:
        raise ConfigError(f"a stream of {len(tokens)} tokens is too short for seq_len={seq_len}")
    k = np.arange(n)
    if max_windows is not None and max_windows < n:
        k = np.unique(np.linspace(0, n - 1, max_windows).round().astype(np.int64))
    starts = k * seq_len
    return [_windows(tokens, starts[i:i + batch_size], seq_len) for i in range(0, len(starts), batch_size)]


def corpus_stats(tokenizer=None, domains: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Documents, characters (and with ``tokenizer``: tokens, tokens per character) per domain and
    split. ``tokenizer`` is a name or object accepted by :func:`routelib.data.load_tokenizer`;
    token counts exclude the end-of-document separators."""
    from routelib.data.corpus import SPLITS, check_domains, load_corpus

    names = check_domains(domains)
    rows = []
    for domain in names:
        for split in SPLITS:
            docs = load_corpus(domain, split)
            row = dict(domain=domain, split=split, documents=len(docs),
                       chars=sum(len(d.text) for d in docs))
            if tokenizer is not None:
                row["tokens"] = int(len(token_stream(domain, split, tokenizer)) - len(docs))
                row["tokens_per_char"] = round(row["tokens"] / max(row["chars"], 1), 4)
            rows.append(row)
    return pd.DataFrame(rows)
