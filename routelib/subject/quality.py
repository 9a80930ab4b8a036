"""Language-model quality across tokenizers: bits per byte (and per character) on the same text.

Perplexity per token cannot compare models with different tokenizers (a token of SmolLM2's 49k-word
vocabulary carries more text than one of the 8k ``bpe8k``). Bits per byte can: each model is scored on
the same held-out text, cut into the same chunks; every chunk is tokenised by the model's own tokenizer,
preceded by its document separator, and every text token is predicted. Then

    bits per byte = sum over chunks of the chunk's negative log-likelihood (nats) / (ln 2 x its UTF-8 bytes)

(Gao et al. 2020, "The Pile", §4: the tokenizer-independent measure), and per character likewise.
Chunks are the first ``chunk_chars`` characters of held-out documents, cut at a whitespace, up to
``chunks`` per domain, in document order: deterministic, the same for every model.

:func:`routing_matters` measures held-out loss of an MoEfied model with its router's experts, with the
same number of random experts, and with the best k (the oracle that keeps the k largest outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from routelib.errors import ConfigError


@dataclass(frozen=True)
class TextSample:
    """Which held-out text the models are scored on."""

    chunks: int = 24  # chunks per domain
    chunk_chars: int = 1200  # characters per chunk, at most (cut back to a whitespace)
    split: str = "validation"  # corpus split the documents come from


def text_chunks(sample: TextSample = TextSample()) -> dict[str, list[str]]:
    """{domain: [chunk, ...]} of the corpus's held-out documents (see the module docstring)."""
    from routelib.data.corpus import DOMAINS, load_corpus

    out = {}
    for domain in DOMAINS:
        chunks = []
        for doc in load_corpus(domain, sample.split):
            text = doc.text[: sample.chunk_chars]
            if len(doc.text) > sample.chunk_chars and " " in text:
                text = text[: text.rindex(" ")]
            if text.strip():
                chunks.append(text)
            if len(chunks) == sample.chunks:
                break
        if not chunks:
            raise ConfigError(f"no {sample.split} text in domain {domain!r}")
        out[domain] = chunks
    return out


def chunk_nll(model, tokenizer, text: str, max_len: int | None = None) -> tuple[float, int]:
    """(negative log-likelihood in nats, tokens) of every token of ``text`` under ``model``, the first
    predicted from the tokenizer's document separator. Texts longer than ``max_len`` tokens raise."""
    from routelib.data.tokenizer import separator_id

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([[separator_id(tokenizer), *ids]])  # (1, n + 1)
    if max_len is not None and x.shape[1] > max_len:
        raise ConfigError(f"a chunk of {x.shape[1]} tokens exceeds the model's context {max_len}; use shorter chunks")
    with torch.no_grad():
        logits = model(x[:, :-1]).logits  # (1, n, V)
        return float(torch.nn.functional.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum")), len(ids)


def bits_per_byte(model, tokenizer, chunks: dict[str, list[str]], max_len: int | None = None) -> pd.DataFrame:
    """Per domain and overall: bits per byte, bits per character, tokens, bytes, characters, nats."""
    rows = []
    for domain, texts in chunks.items():
        scored = [chunk_nll(model, tokenizer, t, max_len) for t in texts]  # each chunk tokenised once
        nll, tokens = sum(n for n, _ in scored), sum(k for _, k in scored)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        chars = sum(len(t) for t in texts)
        rows.append(dict(domain=domain, nats=nll, bytes=nbytes, chars=chars, tokens=tokens))
    table = pd.DataFrame(rows)
    total = table[["nats", "bytes", "chars", "tokens"]].sum()
    table = pd.concat([table, pd.DataFrame([dict(domain="overall", **total.to_dict())])], ignore_index=True)
    table["bits_per_byte"] = table["nats"] / (math.log(2) * table["bytes"])
    table["bits_per_char"] = table["nats"] / (math.log(2) * table["chars"])
    return table.set_index("domain")


def routing_matters(model, batches: list, seeds: tuple[int, ...] = (0, 1, 2)) -> pd.DataFrame:
    """Held-out loss (nats/token) of an MoEfied model (Llama with :class:`~routelib.subject.moefy.MoEfiedMLP`
    MLPs) on ``batches`` ((x, y) pairs) with the router's experts, k random experts (one row per seed)
    and the oracle's best k, all gated by the router's renormalised probabilities (the model's own
    function with other experts); per batch, so that intervals over batches can be formed. Restores router
    mode with Mixtral gating afterwards."""
    from routelib.subject.train import moe_layers

    layers = moe_layers(model)
    if not layers:
        raise ConfigError("routing_matters: the model has no MoEfied layers")
    rows = []
    runs = [("router", "softmax", 0), ("oracle", "softmax", 0)] + [("random", "softmax", s) for s in seeds]
    try:
        for mode, gating, seed in runs:
            for i, moe in enumerate(layers):
                moe.set_mode(mode, gating, seed=seed * 1000 + i)
            with torch.no_grad():
                for b, (x, y) in enumerate(batches):
                    logits = model(x).logits
                    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
                    rows.append(dict(mode=mode, seed=seed, batch=b, loss=float(loss)))
    finally:
        for moe in layers:
            moe.set_mode("router", "softmax")
    return pd.DataFrame(rows)


__all__ = ["TextSample", "bits_per_byte", "chunk_nll", "routing_matters", "text_chunks"]
