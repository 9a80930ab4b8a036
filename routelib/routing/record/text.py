"""Plain text cut into token windows, for recording routing without generation.

:func:`routelib.routing.record.collect.collect_text` (``python -m routelib.routing.record.collect --text ...``
or ``--text_file ...``) feeds each window through the model once and records the routing of every token
(phase ``prompt``). This module makes the windows:

- :func:`corpus_windows` -- a domain of routelib's offline corpus (``code``, ``math``, ``fiction``,
  ``encyclopedic``, ``news``; :mod:`routelib.data.corpus`), by default its held-out ``validation``
  split. Several splits may be given in order (``("validation", "test", "train")``): each split's
  stream is cut on its own, so no window mixes splits, and the next split is read only while
  ``max_tokens`` is not reached. Problem ids are ``<domain>/<split>/<window index in that split>``.
- :func:`file_windows` -- a user file of texts (:func:`read_texts`): JSON lines, one object per line
  with a string ``"text"`` field, or plain text whose documents are separated by blank lines.
  Problem ids are ``<name>/<window index>``.

The stream is the one the subject was trained on (:func:`routelib.data.batching.token_stream`): every
document encoded with the model's own tokenizer without special tokens and followed by the separator
(``<|endoftext|>`` where the vocabulary has it, else EOS). Windows are consecutive, non-overlapping
slices of ``window`` tokens of that stream, at most ``max_tokens`` tokens per source; a remainder
shorter than a window is dropped. No BOS is added: a window starts wherever the stream does, as the
subject's training windows did.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from routelib.errors import ConfigError
from routelib.io import sha256_file

DEFAULT_SPLITS = ("validation",)  # the held-out split: text the subject never trained on
JSONL_SUFFIXES = (".jsonl", ".ndjson")  # read as JSON lines whatever their first line looks like
TEXT_FORMATS = ("auto", "jsonl", "plain")
STREAM_RULE = ("each document encoded with the model's tokenizer without special tokens and followed by the "
               "separator; windows are consecutive, non-overlapping slices of that stream (a remainder shorter "
               "than a window is dropped); no BOS added")


class TextInputError(ConfigError):
    """A text source cannot be read: missing, empty, or neither JSON lines nor plain text."""


@dataclass
class TextWindows:
    """The windows of one text source, ready for :func:`~routelib.routing.record.collect.collect_text`."""

    dataset: str  # the name the traces give this source (the domain, or the file's name)
    problem_ids: list[str]  # one per window: "<domain>/<split>/<k>" or "<name>/<k>"
    tokens: np.ndarray  # (windows, window) int64 token ids, one row per window, in stream order
    source: str  # one line: where the text came from
    info: dict = field(default_factory=dict)  # the manifest's "text" entry: source, window, counts

    @property
    def window(self) -> int:
        """Tokens per window."""
        return int(self.tokens.shape[1])


def check_window(window: int, max_tokens: int | None) -> None:
    """ConfigError unless ``window >= 2`` and ``max_tokens`` (when given) holds at least one window."""
    if window < 2:
        raise ConfigError(f"window {window}: must be >= 2 tokens (a window of one token has no context to route)")
    if max_tokens is not None and max_tokens < window:
        raise ConfigError(f"max_tokens {max_tokens} is less than one window of {window} tokens")


def separator(tokenizer) -> int:
    """The id that ends every document of the stream (:func:`routelib.data.tokenizer.separator_id`
    for fast tokenizers, else EOS)."""
    if hasattr(tokenizer, "backend_tokenizer"):
        from routelib.data.tokenizer import separator_id

        return separator_id(tokenizer)
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ConfigError(f"{type(tokenizer).__name__} has no eos_token to separate documents")
    return int(tokenizer.eos_token_id)


def document_stream(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """The token stream of ``texts``: each encoded without special tokens, followed by :func:`separator`
    (what :func:`routelib.data.batching.token_stream` builds for the corpus). 1-D int64."""
    sep = separator(tokenizer)
    if hasattr(tokenizer, "backend_tokenizer"):
        encoded = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    else:
        encoded = [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    parts = [np.asarray([*ids, sep], dtype=np.int64) for ids in encoded]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def cut(stream: np.ndarray, window: int, max_tokens: int | None) -> np.ndarray:
    """(n, window) consecutive non-overlapping windows from the start of ``stream``, n * window <= max_tokens."""
    limit = len(stream) if max_tokens is None else min(len(stream), max_tokens)
    n = limit // window
    return np.asarray(stream[: n * window], dtype=np.int64).reshape(n, window)


def _no_window(what: str, tokens: int, window: int) -> TextInputError:
    return TextInputError(f"{what} has {tokens:,} tokens, fewer than one window of {window}: use a smaller "
                          f"--window or more text")


# ----------------------------------------------------------------------------------------------
# the corpus


def _corpus_stream(tokenizer, domain: str, split: str) -> np.ndarray:
    from routelib.data.batching import token_stream
    from routelib.data.corpus import load_corpus

    if hasattr(tokenizer, "backend_tokenizer"):
        return np.asarray(token_stream(domain, split, tokenizer), dtype=np.int64)  # cached, the training stream
    return document_stream(tokenizer, [d.text for d in load_corpus(domain, split)])


def corpus_windows(tokenizer, domain: str, window: int, max_tokens: int | None = None,
                   splits: Sequence[str] = DEFAULT_SPLITS) -> TextWindows:
    """Windows of corpus ``domain`` read from ``splits`` in order (module docstring)."""
    from routelib.data.corpus import CORPUS_VERSION, DOMAINS, SPLITS, sources_fingerprint

    check_window(window, max_tokens)
    if domain not in DOMAINS:
        raise ConfigError(f"unknown corpus domain {domain!r}; the corpus has {', '.join(DOMAINS)}")
    splits = list(splits)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits or len(set(splits)) != len(splits):
        raise ConfigError(f"splits {splits}: give one or more of {', '.join(SPLITS)}, each once")
    rows, ids, split_tokens, split_windows = [], [], {}, {}
    for split in splits:
        left = None if max_tokens is None else max_tokens - len(rows) * window
        if left is not None and left < window:
            break
        stream = _corpus_stream(tokenizer, domain, split)
        part = cut(stream, window, left)
        split_tokens[split], split_windows[split] = int(len(stream)), int(len(part))
        rows.extend(part)
        ids.extend(f"{domain}/{split}/{k}" for k in range(len(part)))
    if not rows:
        raise _no_window(f"corpus domain {domain} ({', '.join(splits)})", sum(split_tokens.values()), window)
    tokens = np.stack(rows)
    info = {"kind": "corpus", "domain": domain, "splits": splits, "split_tokens": split_tokens,
            "split_windows": split_windows, "corpus_version": CORPUS_VERSION,
            "corpus_sources_fingerprint": sources_fingerprint(), **_counts(tokenizer, tokens, window, max_tokens)}
    source = f"routelib.data.corpus: domain {domain}, split(s) {', '.join(s for s in split_windows)}"
    return TextWindows(domain, ids, tokens, source, info)


# ----------------------------------------------------------------------------------------------
# a file of texts


def read_texts(path: str | os.PathLike, text_format: str = "auto") -> tuple[str, list[str]]:
    """(format, documents) of a text file.

    ``jsonl``: one JSON object per non-blank line with a string ``"text"`` field (other fields are
    ignored; objects with an empty text are skipped). ``plain``: UTF-8 text, documents separated by
    one or more blank (empty or whitespace-only) lines, each document's lines kept as they are.
    ``auto``: ``.jsonl``/``.ndjson`` files and files whose first non-blank line starts with ``{`` are
    JSON lines, everything else plain text. TextInputError when the file is missing, empty (no
    document), not UTF-8 text, or read as JSON lines with a line that is not such an object.
    """
    path = Path(path)
    if text_format not in TEXT_FORMATS:
        raise ConfigError(f"text format {text_format!r}: choose one of {', '.join(TEXT_FORMATS)}")
    if not path.is_file():
        raise TextInputError(f"text file {path} not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise TextInputError(f"{path} is neither JSON lines nor plain text: not UTF-8 (byte {err.start})") from None
    if "\x00" in text:
        raise TextInputError(f"{path} is neither JSON lines nor plain text: it holds NUL bytes (a binary file?)")
    if not text.strip():
        raise TextInputError(f"{path} is empty: no text to route")
    lines = text.splitlines()
    fmt = text_format
    if fmt == "auto":
        first = next(line for line in lines if line.strip())
        fmt = "jsonl" if path.suffix.lower() in JSONL_SUFFIXES or first.lstrip().startswith("{") else "plain"
    docs = _jsonl_texts(path, lines, sniffed=text_format == "auto") if fmt == "jsonl" else _plain_texts(lines)
    if not docs:
        raise TextInputError(f"{path} is empty: its {fmt} records hold no text")
    return fmt, docs


def _jsonl_texts(path: Path, lines: list[str], sniffed: bool) -> list[str]:
    hint = " (or pass --text_format plain to read it as plain text)" if sniffed else ""
    docs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TextInputError(f"{path}:{number}: not JSON ({err.msg}); the file is neither JSON lines nor plain "
                                 f"text{hint}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TextInputError(f"{path}:{number}: not a JSON object with a string \"text\" field; the file is "
                                 f"neither JSON lines nor plain text{hint}")
        if record["text"]:
            docs.append(record["text"])
    return docs


def _plain_texts(lines: list[str]) -> list[str]:
    docs, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    return docs


def file_windows(tokenizer, path: str | os.PathLike, window: int, max_tokens: int | None = None,
                 name: str | None = None, text_format: str = "auto") -> TextWindows:
    """Windows of the texts of ``path`` (:func:`read_texts`); ``name``: the dataset name in the traces
    (default: the file's stem, characters other than letters, digits, '_' and '.' replaced by '_')."""
    check_window(window, max_tokens)
    path = Path(path)
    fmt, docs = read_texts(path, text_format)
    dataset = name or re.sub(r"[^A-Za-z0-9_.]", "_", path.stem) or "text"
    stream = document_stream(tokenizer, docs)
    tokens = cut(stream, window, max_tokens)
    if not len(tokens):
        raise _no_window(str(path), len(stream), window)
    info = {"kind": "file", "file": str(path), "file_bytes": path.stat().st_size, "file_sha256": sha256_file(path),
            "format": fmt, "documents": len(docs), "stream_tokens": int(len(stream)),
            **_counts(tokenizer, tokens, window, max_tokens)}
    return TextWindows(dataset, [f"{dataset}/{k}" for k in range(len(tokens))], tokens,
                       f"file {path} ({fmt}, {len(docs)} documents, sha256 {info['file_sha256'][:16]}...)", info)


def _counts(tokenizer, tokens: np.ndarray, window: int, max_tokens: int | None) -> dict:
    return {"window": int(window), "max_tokens": max_tokens, "windows": int(tokens.shape[0]),
            "tokens": int(tokens.size), "separator_id": separator(tokenizer), "stream": STREAM_RULE}
