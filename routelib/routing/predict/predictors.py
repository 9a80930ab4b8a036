"""Next-layer expert prediction: the predictors (notebook 05).

The task. A token has been routed through MoE layers ``0..l``; rank the E experts of layer ``l + h``
(the *hop* h >= 1) before that layer runs, so that their weights can be fetched in time
(expert offloading: Eliseev & Mazur 2023, "Fast Inference of Mixture-of-Experts Language Models
with Offloading"; Pre-gated MoE, Hwang et al., ISCA 2024; Fate, Fang et al. 2025). The Mixtral routing
project that notebook 05 tests reports on Mixtral-8x7B: random 12.5 %, lookup tables 42 %, an MLP 55.6 %
top-1 / 73.2 % top-2 -- measured on a random split over single layer transitions, so transitions of
one token journey sat on both sides. Here every number comes from splits that cannot leak.

Every predictor returns *scores* ``(N, E)`` for layer ``l + h`` (higher = more likely); the metrics
read only the ranking.

Predictors (:data:`PREDICTORS`, :func:`make_predictor`); "history" means what is known when layer
l's router has run:

=================  =================================================================================
``random``         uniform random scores (seeded): the empirical chance level
``prior``          the training frequency of each expert at layer l+h (mean gate weight), per layer
``same``           the experts of layer l again (ties below them broken by the prior)
``lookup``         a table: the set of experts at layer l -> mean gate vector at layer l+h
``ngram``          the sets at layers l-n+1..l as the key, backing off to shorter keys, then the prior
                   (each level smoothed towards the next shorter one, Dirichlet weight ``alpha``)
``prev_token``     the experts the *previous token* used at layer l+h (the Mixtral paper's locality,
                   :mod:`.locality`; an LRU cache of k slots holds exactly these), then the prior
``history``        the n-gram over the current token's layers l-n+1..l, refined by tables whose keys
                   add the previous token's set at layer l+h (backing off to the n-gram)
``mlp_history``    the MLP below, also fed the previous token's experts and gates at layer l+h
``mlp``            an MLP over the routing history (multi-hot experts + gate weights of layers 0..l,
                   source layer and hop one-hot, optionally a token-id embedding), soft cross-entropy
                   against the gate weights of layer l+h; trained with :func:`routelib.train.train`
``hidden_router``  zero-shot, needs the model: layer l+h's own router applied to the hidden state
                   layer l's router reads (the "speculative expert loading" of Eliseev & Mazur; Fate's
                   observation: adjacent layers' gate inputs are close)
``hidden_probe``   a linear probe per (l, h) on that same hidden state, initialised from the router
                   of layer l+h and trained (Pre-gated MoE trains such a "pre-gate")
``pre_attn_probe`` the same probe on the residual stream *entering* layer l's block, before its
                   attention (:mod:`.pre_attention`): known one attention earlier than layer l's
                   router input, so its lead is longer
=================  =================================================================================

*The previous token, leak-free.* At a decoding step the previous token has passed every layer, so
its routing at layer l+h is known before the current token's layer 0 runs. In the prefill all prompt
tokens pass a layer together, so for a prompt token the previous token's layer l+h is not yet known:
``prev_token``, ``history`` and ``mlp_history`` use it only for generated tokens (``history_prompt=True``: for prompt
tokens too, as in a prefill run one token at a time), and never across sequences -- the first token
of a sequence, and a token whose predecessor is not among the rows scored (a token split), get the
fallback (the prior; the n-gram). Training may use every pair of the training rows.

The evaluation over leak-free splits, its tables and command line are in
:mod:`routelib.routing.predict.evaluation`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from routelib.errors import ConfigError
from routelib.io import atomic_write_bytes
from routelib.routing.analyse.locality import previous_rows
from routelib.routing.predict.dataset import (HiddenStatesUnavailable, PredictorError, RoutingData, need_hidden,
                                           check_pair, gate_vectors, row_keys)


#: Every predictor name, in table order; those after "mlp_history" need the model's hidden states.
PREDICTORS = ("random", "prior", "same", "lookup", "ngram", "prev_token", "history", "mlp", "mlp_history",
              "hidden_router", "hidden_probe", "pre_attn_probe")
HIDDEN_PREDICTORS = ("hidden_router", "hidden_probe", "pre_attn_probe")
PRE_ATTENTION_PREDICTORS = ("pre_attn_probe",)  # they also need the pre-attention states



# ----------------------------------------------------------------------------------------------
# predictors


class Predictor:
    """Base class: ``fit(train, pairs)`` then ``predict_scores(data, layer, hop) -> (N, E)``."""

    name = "predictor"

    def fit(self, train: RoutingData, pairs: Sequence[tuple[int, int]]) -> "Predictor":
        """Learn from ``train`` what predicting each (source layer, hop) of ``pairs`` needs."""
        if len(train) == 0:
            raise PredictorError(f"{self.name}: cannot fit on an empty training set")
        for layer, hop in pairs:
            check_pair(train.num_layers, layer, hop)
        self.layout = (train.num_layers, train.top_k, train.num_experts)
        self._fit(train, list(pairs))
        return self

    def _fit(self, train: RoutingData, pairs: list[tuple[int, int]]) -> None:
        pass

    def predict_scores(self, data: RoutingData, layer: int, hop: int = 1) -> np.ndarray:
        """Scores (N, E) for the experts of layer ``layer + hop`` from what is known at ``layer``."""
        if not hasattr(self, "layout"):
            raise PredictorError(f"{self.name}: call fit(...) before predict_scores(...)")
        if (data.num_layers, data.top_k, data.num_experts) != self.layout:
            raise PredictorError(f"{self.name}: fitted on traces with (L, k, E) = {self.layout}, got "
                                 f"{(data.num_layers, data.top_k, data.num_experts)}")
        check_pair(data.num_layers, layer, hop)
        return self._predict(data, layer, hop)

    def _predict(self, data: RoutingData, layer: int, hop: int) -> np.ndarray:
        raise NotImplementedError


class RandomPredictor(Predictor):
    """Uniform random scores, seeded per (layer, hop): the empirical chance level."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _predict(self, data, layer, hop):
        return np.random.default_rng([self.seed, layer, hop]).random((len(data), data.num_experts))


class PriorPredictor(Predictor):
    """The training frequency of each expert at the target layer: its mean gate weight (renormalised
    gate vectors), the same for every token."""

    name = "prior"

    def _fit(self, train, pairs):
        self.prior = np.stack([_mean_gate_vector(train, t) for t in range(train.num_layers)])  # (L, E)

    def _predict(self, data, layer, hop):
        return np.broadcast_to(self.prior[layer + hop], (len(data), data.num_experts)).copy()


class SameExpertPredictor(PriorPredictor):
    """The experts of layer l, by gate weight, predicted again for layer l+h; the other experts
    are ranked below them by the target layer's prior."""

    name = "same"

    def _predict(self, data, layer, hop):
        scores = 0.5 * super()._predict(data, layer, hop)  # (N, E) in [0, 0.5]
        np.put_along_axis(scores, data.experts[:, layer], 1.0 + data.weights[:, layer], axis=1)  # > 1
        return scores


#: Rows per chunk when a fit reads the whole training set (memory-mapped traces of millions of
#: tokens): temporaries stay ~(chunk x E) floats; traces shorter than one chunk are read in one piece.
CHUNK_ROWS = 1 << 20


def _chunks(num_rows: int, size: int | None = None) -> list[slice]:
    """Consecutive row slices of ``size`` (default :data:`CHUNK_ROWS`) covering ``num_rows``."""
    size = size or CHUNK_ROWS
    return [slice(i, min(i + size, num_rows)) for i in range(0, num_rows, size)]


def _mean_gate_vector(data: RoutingData, layer: int) -> np.ndarray:
    """(E,) float32: the mean renormalised gate vector of ``layer`` over all rows, chunk by chunk."""
    parts = [(gate_vectors(data.experts[s, layer], data.weights[s, layer], data.num_experts).mean(0), s.stop - s.start)
             for s in _chunks(len(data))]
    if len(parts) == 1:
        return parts[0][0]
    return (sum(mean.astype(np.float64) * n for mean, n in parts) / len(data)).astype(np.float32)


def target_gates(data: RoutingData, layer: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The renormalised gate vectors of ``layer`` (:func:`gate_vectors`) in sparse form: expert ids
    (n, k) int64 and their values (n, k) float32, computed chunk by chunk (``rows``: a subset)."""
    n = len(data) if rows is None else len(rows)
    ids = np.empty((n, data.top_k), np.int64)  # (n, k)
    vals = np.empty((n, data.top_k), np.float32)  # (n, k)
    for s in _chunks(n):
        part = s if rows is None else rows[s]
        ids[s] = data.experts[part, layer]
        dense = gate_vectors(ids[s], data.weights[part, layer], data.num_experts)  # (c, E)
        vals[s] = np.take_along_axis(dense, ids[s], 1)
    return ids, vals


class _SetCodes:
    """Each layer's top-k expert *set* as a small integer: the index of the set among those seen in
    training (sorted), ``len(vocab)`` for a set never seen. A set is a bit mask of E bits (one uint64
    for E <= 64, else a byte string of E/64 words), so equal sets give equal codes whatever the order."""

    def __init__(self, data: RoutingData):
        self.words = -(-data.num_experts // 64)  # 64-bit words per mask
        self.vocab = [np.unique(np.concatenate([np.unique(self.masks(data, layer, s)) for s in _chunks(len(data))]))
                      for layer in range(data.num_layers)]  # per layer: sorted distinct masks

    def masks(self, data: RoutingData, layer: int, rows: slice) -> np.ndarray:
        """(n,) the set masks of ``layer`` for ``rows``."""
        ids = np.asarray(data.experts[rows, layer], np.int64)  # (n, k)
        bit = np.left_shift(np.uint64(1), (ids % 64).astype(np.uint64))  # (n, k)
        words = [np.bitwise_or.reduce(np.where(ids // 64 == w, bit, np.uint64(0)), axis=1)  # (n,) each
                 for w in range(self.words)]
        return words[0] if self.words == 1 else row_keys(np.stack(words, 1).view(np.int64))

    def codes(self, data: RoutingData, layer: int) -> np.ndarray:
        """(N,) int32 codes of ``layer``'s sets; unseen sets get ``len(vocab[layer])``."""
        vocab = self.vocab[layer]
        out = np.empty(len(data), np.int32)
        for s in _chunks(len(data)):
            masks = self.masks(data, layer, s)
            pos = np.minimum(np.searchsorted(vocab, masks), len(vocab) - 1)
            out[s] = np.where(vocab[pos] == masks, pos, len(vocab))
        return out

    def radix(self, layer: int) -> int:
        return len(self.vocab[layer]) + 1


def _combine(prefix: np.ndarray | None, codes: np.ndarray, radix: int) -> np.ndarray:
    """Keys of one more layer: a row's index in the shorter key's table (-1: not there) times
    ``radix`` plus its set code; -1 where the shorter key is not in its table."""
    if prefix is None:
        return codes.astype(np.int64)
    return np.where(prefix >= 0, prefix.astype(np.int64) * radix + codes, -1)


@dataclass
class _Table:
    keys: np.ndarray  # (U,) sorted unique keys
    sums: np.ndarray  # (U, E) summed target gate vectors
    counts: np.ndarray  # (U,) training rows per key

    @classmethod
    def build(cls, keys: np.ndarray, ids: np.ndarray, values: np.ndarray, num_experts: int,
              min_count: int = 1) -> tuple["_Table", np.ndarray]:
        """The table of ``keys`` (n,) against sparse target gate vectors (``ids``, ``values``: (n, k));
        keys seen fewer than ``min_count`` times are left out, and so are rows whose key is -1.
        Returns the table and each row's index in it (-1: not in the table)."""
        uniq, inv = np.unique(keys, return_inverse=True)
        inv = inv.ravel()
        counts = np.bincount(inv, minlength=len(uniq))
        keep = counts >= min_count
        if uniq.dtype.kind == "i":
            keep &= uniq != -1  # integer keys: -1 marks rows without a key
        new_index = np.where(keep, np.cumsum(keep) - 1, -1)  # old unique index -> kept index
        row_index = new_index[inv]  # (n,)
        u = int(keep.sum())
        sums = np.zeros(u * num_experts, np.float64)
        for s in _chunks(len(keys)):  # sums in row order, as one bincount per expert column would add them
            r, (i, v) = row_index[s], (ids[s], values[s])
            ok = r >= 0
            sums += np.bincount((r[ok, None] * num_experts + i[ok]).ravel(), weights=v[ok].ravel(),
                                minlength=u * num_experts)
        return cls(uniq[keep], sums.reshape(u, num_experts), counts[keep]), row_index

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into the table, found) per key."""
        if len(self.keys) == 0:
            return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return pos, self.keys[pos] == keys


class NGramPredictor(PriorPredictor):
    """Lookup tables on the expert sets of the last ``n`` layers (l-n+1..l) with back-off: the
    longest key seen at least ``min_count`` times in training decides; each level's estimate is
    ``(sum of target gate vectors + alpha * shorter-level estimate) / (count + alpha)``, the
    shortest level backing off to the target layer's prior (interpolated smoothing in the manner of
    Katz back-off / Dirichlet priors). n = 1 is the 1-hop lookup table on layer l's top-k set."""

    name = "ngram"

    def __init__(self, n: int = 3, min_count: int = 1, alpha: float = 1.0):
        if n < 1 or min_count < 1 or alpha < 0:
            raise PredictorError(f"ngram needs n >= 1, min_count >= 1, alpha >= 0; got {n}, {min_count}, {alpha}")
        self.n, self.min_count, self.alpha = n, min_count, alpha

    def _fit(self, train, pairs):
        super()._fit(train, pairs)
        self.sets = _SetCodes(train)
        codes = {layer: self.sets.codes(train, layer) for layer in range(train.num_layers - 1)}  # (N,) each
        self.tables: dict[tuple[int, int], list[_Table]] = {}
        for layer, hop in pairs:
            ids, values = target_gates(train, layer + hop)  # (N, k) each
            tables, prefix = [], None
            for m in range(1, min(self.n, layer + 1) + 1):  # key: the sets of layers l-m+1..l
                keys = _combine(prefix, codes[layer - m + 1], self.sets.radix(layer - m + 1))
                table, prefix = _Table.build(keys, ids, values, train.num_experts, self.min_count)
                tables.append(table)
            self.tables[(layer, hop)] = tables

    def _predict(self, data, layer, hop):
        tables = self.tables.get((layer, hop))
        if tables is None:
            raise PredictorError(f"{self.name}: not fitted for layer {layer}, hop {hop}; fitted pairs "
                                 f"{sorted(self.tables)}")
        scores = super()._predict(data, layer, hop)  # (N, E): the prior, the last resort
        prefix = None
        for m, table in enumerate(tables, start=1):
            keys = _combine(prefix, self.sets.codes(data, layer - m + 1), self.sets.radix(layer - m + 1))
            idx, found = table.lookup(keys)  # keys seen fewer than min_count times are not in the table
            i = idx[found]
            scores[found] = (table.sums[i] + self.alpha * scores[found]) / (table.counts[i, None] + self.alpha)
            prefix = np.where(found, idx, -1)
        return scores


class LookupPredictor(NGramPredictor):
    """The 1-hop lookup table: layer l's expert set -> mean gate vector at layer l+h (then the prior)."""

    name = "lookup"

    def __init__(self, min_count: int = 1, alpha: float = 1.0):
        super().__init__(n=1, min_count=min_count, alpha=alpha)


# ---- the previous token at the target layer ------------------------------------------------------


def known_previous(data: RoutingData, prompt: bool = False) -> np.ndarray:
    """(N,) the row of each token's predecessor in its sequence when its routing at every layer is
    known before the token's own layer 0 runs (a decoding step: generated tokens; ``prompt=True``:
    prompt tokens too), else -1 (sequence start, prefill, or the predecessor not among the rows)."""
    prev = previous_rows(data.problem, data.position)
    return prev if prompt else np.where(data.generated, prev, -1)


class PrevTokenPredictor(PriorPredictor):
    """The experts of the previous token at the target layer, by gate weight; the other experts ranked
    below them by the target layer's prior; the prior alone where the previous token is not known
    (:func:`known_previous`)."""

    name = "prev_token"

    def __init__(self, prompt: bool = False):
        self.prompt = prompt

    def _predict(self, data, layer, hop):
        scores = 0.5 * super()._predict(data, layer, hop)  # (N, E) in [0, 0.5]
        prev = known_previous(data, self.prompt)
        rows = np.flatnonzero(prev >= 0)
        target = layer + hop
        part = scores[rows]
        np.put_along_axis(part, data.experts[prev[rows], target], 1.0 + data.weights[prev[rows], target], axis=1)
        scores[rows] = part
        return scores


class HistoryPredictor(NGramPredictor):
    """What the current token's layers and the previous token's target layer tell together: the
    n-gram over layers l-n+1..l (:class:`NGramPredictor`), then, where the previous token is known,
    tables keyed on (previous token's set at layer l+h, current sets of layers l-m+1..l) for
    m = 1..n, each level smoothed towards the one before (Dirichlet weight ``alpha``). Trained on
    every training row with a predecessor."""

    name = "history"

    def __init__(self, n: int = 3, min_count: int = 1, alpha: float = 1.0, prompt: bool = False):
        super().__init__(n, min_count, alpha)
        self.prompt = prompt

    def _keys(self, data: RoutingData, layer: int, hop: int, rows: np.ndarray, prev: np.ndarray):
        """One key array per level m = 1..n: previous token's set at l+h + the sets of l-m+1..l."""
        before = np.sort(data.experts[prev, layer + hop], 1)  # (M, k)
        for m in range(1, min(self.n, layer + 1) + 1):
            now = np.sort(data.experts[rows, layer - m + 1:layer + 1], 2).reshape(len(rows), -1)  # (M, m*k)
            yield row_keys(np.concatenate([before, now], 1))

    def _fit(self, train, pairs):
        super()._fit(train, pairs)
        prev = previous_rows(train.problem, train.position)
        rows = np.flatnonzero(prev >= 0)
        self.prev_tables: dict[tuple[int, int], list[_Table]] = {}
        for layer, hop in pairs:
            ids, values = target_gates(train, layer + hop, rows)  # (M, k) each
            self.prev_tables[(layer, hop)] = [_Table.build(keys, ids, values, train.num_experts)[0]
                                              for keys in self._keys(train, layer, hop, rows, prev[rows])]

    def _predict(self, data, layer, hop):
        scores = super()._predict(data, layer, hop)  # (N, E): the n-gram, the fallback
        prev = known_previous(data, self.prompt)
        rows = np.flatnonzero(prev >= 0)
        if rows.size == 0:
            return scores
        part = scores[rows]
        for table, keys in zip(self.prev_tables[(layer, hop)], self._keys(data, layer, hop, rows, prev[rows])):
            idx, found = table.lookup(keys)
            found &= table.counts[idx] >= self.min_count
            i = idx[found]
            part[found] = (table.sums[i] + self.alpha * part[found]) / (table.counts[i, None] + self.alpha)
        scores[rows] = part
        return scores


# ---- the MLP over the routing history ------------------------------------------------------------


@dataclass
class MLPConfig:
    hidden_size: int = 128  # width of the hidden layers
    num_layers: int = 2  # hidden layers (Linear -> GELU -> dropout)
    token_dim: int = 16  # width of a token-id embedding added to the input; 0 = no token input
    dropout: float = 0.0  # dropout after each hidden layer (training only)
    steps: int = 1000  # optimizer steps (routelib.train, AdamW, warm-up + cosine)
    batch_size: int = 512  # (token, source layer, hop) examples per step, drawn with replacement
    lr: float = 1e-2  # peak learning rate
    weight_decay: float = 0.01  # AdamW weight decay on matrices
    seed: int = 0  # initialisation and batch order
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    previous: bool = False  # also read the previous token's experts + gates at the target layer, and a "known" flag

    def __post_init__(self):
        if min(self.hidden_size, self.num_layers, self.steps, self.batch_size) < 1 or self.token_dim < 0 \
                or not 0 <= self.dropout < 1 or self.lr <= 0:
            raise ConfigError(f"MLPConfig: sizes and steps must be >= 1, token_dim >= 0, dropout in [0, 1), lr > 0; "
                              f"got {self}")


class RoutingHistoryMLP(nn.Module):
    """logits (B, E) for layer l+h from the routing of layers 0..l (later layers are masked inside
    ``forward``, so no caller can leak them), the source layer, the hop, optionally the token and,
    with ``cfg.previous``, the previous token's routing at layer l+h (B, 2E + 1: multi-hot, gates,
    and 1 where it is known at decode time, else zeros)."""

    def __init__(self, num_layers: int, num_experts: int, vocab_size: int, cfg: MLPConfig):
        super().__init__()
        self.num_layers, self.num_experts = num_layers, num_experts
        self.embed = nn.Embedding(vocab_size, cfg.token_dim) if cfg.token_dim else None
        width = num_layers * 2 * num_experts + num_layers + max(num_layers - 1, 1) + cfg.token_dim
        self.previous = cfg.previous
        width += (2 * num_experts + 1) if cfg.previous else 0
        blocks: list[nn.Module] = []
        for _ in range(cfg.num_layers):
            blocks += [nn.Linear(width, cfg.hidden_size), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = cfg.hidden_size
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_experts)

    def forward(self, history: torch.Tensor, source: torch.Tensor, hop: torch.Tensor,
                token: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        # history (B, L, 2E): multi-hot experts and gate weights per layer; source, hop, token (B,)
        num_layers = self.num_layers
        visible = torch.arange(num_layers, device=history.device) <= source[:, None]  # (B, L): layers 0..l
        parts = [(history * visible[..., None]).flatten(1),  # (B, L*2E)
                 F.one_hot(source, num_layers).float(),  # (B, L)
                 F.one_hot(hop - 1, max(num_layers - 1, 1)).float()]  # (B, L-1)
        if self.embed is not None:
            parts.append(self.embed(token.clamp(0, self.embed.num_embeddings - 1)))  # (B, D)
        if self.previous:
            if previous is None:
                raise PredictorError("this MLP reads the previous token's routing: pass previous (B, 2E+1)")
            parts.append(previous)  # (B, 2E+1)
        return self.head(self.body(torch.cat(parts, 1)))  # (B, E)


def history_features(data: RoutingData, rows: np.ndarray | slice | None = None) -> torch.Tensor:
    """(N, L, 2E) float32: per layer the multi-hot of the top-k experts, then their gate weights
    (``rows``: only these rows, gathered first -- a batch of memory-mapped traces)."""
    experts = np.asarray(data.experts if rows is None else data.experts[rows], np.int64)  # (n, L, k)
    weights = data.weights if rows is None else data.weights[rows]  # (n, L, k)
    onehot = np.zeros((len(experts), data.num_layers, data.num_experts), np.float32)
    np.put_along_axis(onehot, experts, 1.0, axis=2)
    gates = np.zeros_like(onehot)
    np.put_along_axis(gates, experts, weights, axis=2)
    return torch.from_numpy(np.concatenate([onehot, gates], 2))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target distribution (..., E), averaged over the leading dims."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def _fingerprint(*parts: Any) -> str:
    """sha256 (12 hex digits) of JSON values and arrays' bytes; arrays are read in chunks of rows."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            for s in _chunks(len(part)):
                h.update(np.ascontiguousarray(part[s]).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def _train_module(net: nn.Module, batch_fn, loss_fn, *, steps: int, lr: float, weight_decay: float, seed: int,
                  device: str, out_dir: Path | None):
    """Train with routelib.train (progress bar, Ctrl-C checkpoint, resume from ``out_dir``)."""
    from routelib.train import TrainConfig, train

    tcfg = TrainConfig(max_steps=steps, lr=lr, warmup_steps=min(100, steps // 10), weight_decay=weight_decay,
                       log_every=max(1, steps // 50), out_dir=str(out_dir) if out_dir else None, seed=seed,
                       device="auto" if device == "auto" else device)
    return train(net, batch_fn, tcfg, loss_fn=loss_fn, resume=out_dir is not None)


class MLPPredictor(Predictor):
    """An MLP over the routing history (:class:`RoutingHistoryMLP`), one network for every (source
    layer, hop) asked for, trained on soft targets (the target layer's gate weights). With
    ``out_dir`` the run is checkpointed and resumable (``out_dir/checkpoints-<fingerprint>``) and the
    trained network is saved as ``out_dir/mlp.safetensors`` + ``out_dir/mlp.json`` (config, layout,
    pairs, training fingerprint and loss history); :meth:`load` reads it back."""

    name = "mlp"

    def __init__(self, cfg: MLPConfig | None = None, out_dir: str | os.PathLike | None = None):
        self.cfg = cfg or MLPConfig()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.history: list[dict] = []

    def _fit(self, train, pairs):
        cfg = self.cfg
        num_layers, num_experts = train.num_layers, train.num_experts
        self.vocab_size = train.vocab_size
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            self.net = RoutingHistoryMLP(num_layers, num_experts, train.vocab_size, cfg)
        extra = self._previous_features(train)  # (N, L, 2E+1) or None
        pair_t = torch.tensor(pairs, dtype=torch.long)  # (P, 2)
        self.pairs = [tuple(p) for p in pairs]
        self.fingerprint = _fingerprint(dataclasses.asdict(cfg), self.layout, self.pairs, train.vocab_size,
                                        train.experts, train.weights, train.token_id)

        def batch_fn(step: int, rank: int, world: int):
            """One batch of random training rows, its features computed from those rows alone (streamed:
            memory-mapped traces are read B rows at a time)."""
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            rows = torch.randint(0, len(train), (cfg.batch_size,), generator=g)  # (B,)
            which = pair_t[torch.randint(0, len(pair_t), (cfg.batch_size,), generator=g)]  # (B, 2)
            target = which[:, 0] + which[:, 1]  # (B,)
            idx = rows.numpy()
            experts, weights = train.experts[idx], train.weights[idx]  # (B, L, k) each
            b = np.arange(len(idx))
            goal = gate_vectors(np.asarray(experts[b, target.numpy()], np.int64), weights[b, target.numpy()],
                                num_experts)  # (B, E)
            tokens = torch.from_numpy(np.asarray(train.token_id[idx], np.int64))[:, None].float()  # (B, 1)
            parts = [history_features(train, idx).flatten(1), which.float(), tokens]  # (B, L*2E+3)
            parts += [extra[rows, target]] if extra is not None else []  # (B, 2E+1)
            return torch.cat(parts, 1), torch.from_numpy(goal)  # (B, E)

        def loss_fn(net, x, y):
            loss = soft_cross_entropy(self._forward(net, x), y)
            return loss, {"ce": loss.detach()}

        ckpt = self.out_dir / f"checkpoints-{self.fingerprint}" if self.out_dir else None
        result = _train_module(self.net, batch_fn, loss_fn, steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               seed=cfg.seed, device=cfg.device, out_dir=ckpt)
        self.history = result.history
        self.net.eval()
        if self.out_dir is not None:
            self.save(self.out_dir)

    def _previous_features(self, data: RoutingData) -> torch.Tensor | None:
        """(N, L, 2E+1) the previous token's features at every layer, or None: this MLP reads none."""
        return None

    def _forward(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Unpack (B, L*2E + 3 [+ 2E+1]) [history, source, hop, token, previous] and run the network."""
        num_layers, _, num_experts = self.layout
        width = num_layers * 2 * num_experts
        history = x[:, :width].reshape(len(x), num_layers, 2 * num_experts)  # (B, L, 2E)
        source, hop, token = x[:, width:width + 3].long().unbind(1)  # (B,) each; ids < 2**24 are exact in fp32
        previous = x[:, width + 3:] if x.shape[1] > width + 3 else None  # (B, 2E+1)
        return net(history, source, hop, token, previous)

    @torch.no_grad()
    def _predict(self, data, layer, hop):
        if (layer, hop) not in self.pairs:
            raise PredictorError(f"mlp: trained for (layer, hop) pairs {self.pairs}, not ({layer}, {hop})")
        device = next(self.net.parameters()).device
        extra = self._previous_features(data)  # (N, L, 2E+1) or None
        out = []
        for s in _chunks(len(data), 65536):  # features of 64 Ki tokens at a time
            where = torch.tensor([[layer, hop]], dtype=torch.float32).expand(s.stop - s.start, 2)  # (n, 2)
            tokens = torch.from_numpy(np.asarray(data.token_id[s], np.int64))[:, None].float()  # (n, 1)
            parts = [history_features(data, s).flatten(1), where, tokens]  # (n, L*2E+3)
            parts += [extra[s, layer + hop]] if extra is not None else []  # (n, 2E+1)
            out.append(torch.softmax(self._forward(self.net, torch.cat(parts, 1).to(device)), -1).cpu())  # (n, E)
        return torch.cat(out).numpy() if out else np.zeros((0, data.num_experts))

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``mlp.safetensors`` and ``mlp.json`` into ``out_dir``; returns the weights' path."""
        from safetensors.torch import save_model

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_model(self.net, str(out_dir / "mlp.safetensors"))
        meta = {"predictor": "routelib.routing.predict.predictors.MLPPredictor", "config": dataclasses.asdict(self.cfg),
                "layout": dict(zip(("num_layers", "top_k", "num_experts"), self.layout)), "vocab_size": self.vocab_size,
                "pairs": self.pairs, "fingerprint": self.fingerprint, "prompt": getattr(self, "prompt", None),
                "final_loss": self.history[-1]["loss"] if self.history else None, "history": self.history}
        atomic_write_bytes(out_dir / "mlp.json", json.dumps(meta, indent=1).encode())
        return out_dir / "mlp.safetensors"

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "MLPPredictor":
        """A fitted MLPPredictor from a folder written by :meth:`save`."""
        from safetensors.torch import load_model

        out_dir = Path(out_dir)
        if not (out_dir / "mlp.json").is_file():
            raise PredictorError(f"{out_dir} holds no mlp.json: not a saved MLPPredictor")
        meta = json.loads((out_dir / "mlp.json").read_text())
        self = cls(MLPConfig(**meta["config"]))
        lay = meta["layout"]
        self.layout = (lay["num_layers"], lay["top_k"], lay["num_experts"])
        self.vocab_size, self.fingerprint, self.history = meta["vocab_size"], meta["fingerprint"], meta["history"]
        self.pairs = [tuple(p) for p in meta["pairs"]]
        if meta.get("prompt") is not None:
            self.prompt = bool(meta["prompt"])
        self.net = RoutingHistoryMLP(lay["num_layers"], lay["num_experts"], self.vocab_size, self.cfg)
        load_model(self.net, str(out_dir / "mlp.safetensors"))
        self.net.eval()
        return self


class HistoryMLPPredictor(MLPPredictor):
    """:class:`MLPPredictor` that also reads the previous token's routing at the target layer where
    it is known at decode time (:func:`known_previous`; zeros and a 0 flag elsewhere, in training
    too, so that the network learns both cases). Saved and loaded as the MLP is."""

    name = "mlp_history"

    def __init__(self, cfg: MLPConfig | None = None, out_dir: str | os.PathLike | None = None,
                 prompt: bool = False):
        super().__init__(dataclasses.replace(cfg or MLPConfig(), previous=True), out_dir)
        self.prompt = prompt

    def _previous_features(self, data):
        prev = known_previous(data, self.prompt)
        known = np.flatnonzero(prev >= 0)
        out = torch.zeros(len(data), data.num_layers, 2 * data.num_experts + 1)  # (N, L, 2E+1)
        out[known, :, :-1] = history_features(data)[torch.from_numpy(prev[known])]  # (n, L, 2E)
        out[known, :, -1] = 1.0
        return out


# ---- predictors fed with the model's hidden state ------------------------------------------------


def _router_logits(router: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (n, E) of one router module on hidden states (n, H), whatever tuple it returns."""
    from routelib.routing.record.routers import split_router_output

    logits, _, _ = split_router_output(router(x))
    if logits is None:
        raise HiddenStatesUnavailable(f"router {type(router).__name__} returns no logits; it cannot score a "
                                      f"hidden state")
    return logits.reshape(x.shape[0], -1).float()

class HiddenRouterPredictor(Predictor):
    """Zero-shot: softmax of layer l+h's router applied to the hidden state layer l's router read
    (Fate, Fang et al. 2025, feeds the current gate input to the next gate). Needs no training."""

    name = "hidden_router"

    def _fit(self, train, pairs):
        need_hidden(train, self.name)

    @torch.no_grad()
    def _predict(self, data, layer, hop):
        hidden = need_hidden(data, self.name)
        router = hidden.routers[layer + hop]
        param = next(router.parameters())
        x = torch.from_numpy(hidden.x[:, layer]).to(param.device, param.dtype)  # (N, H)
        return torch.softmax(_router_logits(router, x), -1).cpu().numpy()  # (N, E)


@dataclass
class ProbeConfig:
    steps: int = 200  # optimizer steps (routelib.train)
    batch_size: int = 512  # tokens per step; every (layer, hop) probe sees each of them
    lr: float = 3e-3  # peak learning rate
    init_from_router: bool = True  # start each probe at the target layer's router weights (zero-shot)
    seed: int = 0  # batch order
    device: str = "cpu"  # "cpu", "cuda" or "auto"


class LinearProbes(nn.Module):
    """One linear map H -> E per (source layer, hop) pair, applied together."""

    def __init__(self, num_pairs: int, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_pairs, num_experts, hidden_size))  # (P, E, H)
        self.bias = nn.Parameter(torch.zeros(num_pairs, num_experts))  # (P, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, P, H): the hidden state of each pair's source layer
        return torch.einsum("bph,peh->bpe", x, self.weight) + self.bias  # (B, P, E)


class HiddenProbePredictor(Predictor):
    """A trained linear probe per (l, h) on the hidden state layer l's router reads, predicting the
    gate vector of layer l+h (soft cross-entropy), initialised from layer l+h's router: the
    "pre-gate" of Pre-gated MoE (Hwang et al., ISCA 2024), here fitted after the fact on a frozen model."""

    name = "hidden_probe"

    def __init__(self, cfg: ProbeConfig | None = None):
        self.cfg = cfg or ProbeConfig()

    def states(self, data: RoutingData) -> np.ndarray:
        """(N, L, H) float16: the state the probe of source layer l reads -- here layer l's router input."""
        return need_hidden(data, self.name).x

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) states as read from :meth:`states` -> the probe's float32 input (here unchanged)."""
        return x.float()

    def _fit(self, train, pairs):
        cfg = self.cfg
        hidden = need_hidden(train, self.name)
        states = self.states(train)  # (N, L, H)
        self.pairs = [tuple(p) for p in pairs]
        sources = torch.tensor([layer for layer, _ in pairs])  # (P,)
        targets_l = torch.tensor([layer + hop for layer, hop in pairs])  # (P,)
        self.net = LinearProbes(len(pairs), states.shape[2], train.num_experts)
        if cfg.init_from_router:
            for p, t in enumerate(targets_l.tolist()):
                weight = next((w for w in hidden.routers[t].parameters()
                               if tuple(w.shape) == (train.num_experts, states.shape[2])), None)
                if weight is not None:
                    self.net.weight.data[p] = weight.detach().float().cpu()
        x = torch.from_numpy(states)  # (N, L, H) float16
        gates = torch.from_numpy(np.stack([gate_vectors(train.experts[:, t], train.weights[:, t], train.num_experts)
                                           for t in range(train.num_layers)], 1))  # (N, L, E)

        def batch_fn(step: int, rank: int, world: int):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            rows = torch.randint(0, len(train), (cfg.batch_size,), generator=g)  # (B,)
            return x[rows], gates[rows][:, targets_l]  # (B, L, H) float16, (B, P, E)

        def loss_fn(net, xb, yb):
            loss = soft_cross_entropy(net(self.prepare(xb[:, sources.to(xb.device)])), yb)  # (B, P, H) -> (B, P, E)
            return loss, {"ce": loss.detach()}

        result = _train_module(self.net, batch_fn, loss_fn, steps=cfg.steps, lr=cfg.lr, weight_decay=0.0,
                               seed=cfg.seed, device=cfg.device, out_dir=None)
        self.history = result.history
        self.net.eval()

    @torch.no_grad()
    def _predict(self, data, layer, hop):
        if (layer, hop) not in self.pairs:
            raise PredictorError(f"{self.name}: trained for (layer, hop) pairs {self.pairs}, not ({layer}, {hop})")
        p = self.pairs.index((layer, hop))
        weight, bias = self.net.weight[p], self.net.bias[p]  # (E, H), (E,)
        x = self.prepare(torch.from_numpy(self.states(data)[:, layer])).to(weight.device)  # (N, H)
        return torch.softmax(x @ weight.T + bias, -1).cpu().numpy()  # (N, E)
