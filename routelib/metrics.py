"""Monosemanticity of routed pathways: which tokens each pathway sees, and how concentrated that is.

Every function takes plain arrays, so trained routers, untrained routers and random controls go
through the same code:

    token_ids  (n,)     the token at each position (padding removed)
    indices    (n, k)   the k pathways (experts) chosen at each position in one layer

(``RoutedLLM.collect_routing`` returns exactly these.) Definitions, per layer:

- selections_i    number of (token, pathway) selections of pathway i; sum_i = n * k
- load_i          selections_i / (n * k), so sum_i load_i = 1 (uniform: 1/N)
- H_i             entropy (nats) of pathway i's distribution over token ids (counts / selections_i)
- purity_i        1 - H_i / log(V), V = the tokenizer's vocabulary size: 1 when a pathway sees a single
                  token id, 0 when it sees every id of the vocabulary equally often. This is the H_max
                  we report. ``purity_distinct`` = 1 - H_i / log(D_i), D_i = distinct ids the pathway
                  saw, is the definition of the original project, "Pathway LLM" (labelled as such): it
                  rewards seeing few ids, is 1 by definition for D_i = 1, and is not comparable across
                  pathways with different D_i
- utilisation     fraction of the N pathways with load_i >= min_load (default 0.01: 1 % of the layer's
                  selections; uniform routing gives 1/N = 6.25 % at N = 16). *Every* pathway counts --
                  that project skipped pathways with < 10 activations, which made utilisation ~1 by
                  construction. (With N >= 100 pathways lower min_load: uniform load is then < 1 %.)
- load_balance    H(load) / log(N): 1 for perfectly balanced loads, 0 for one pathway taking all
- mean_purity     load-weighted mean of purity_i (pathways with no selections weigh 0); also the plain
                  mean over pathways with >= 1 selection, ``mean_purity_unweighted``

Purity means nothing alone: a pathway that sees a random sample of text already has purity
1 - H(corpus unigram)/log V > 0 (Zipf), and small samples look purer (the plug-in entropy is biased
low). Compare against controls with the same sparsity: :func:`random_topk` (uniform random k of N
per token) and :func:`permuted_routing` (the trained router's choices shuffled across positions:
identical loads per pathway, token association destroyed), and the untrained router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from routelib.errors import ConfigError

H_MAX_CHOICES = ("vocab", "distinct")


def _as_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def check_selections(token_ids, indices, num_pathways: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert -> (token_ids (n,) int64, indices (n, k) int64). Accepts numpy or torch."""
    tok = _as_numpy(token_ids).reshape(-1).astype(np.int64)
    idx = _as_numpy(indices)
    idx = (idx[:, None] if idx.ndim == 1 else idx.reshape(-1, idx.shape[-1])).astype(np.int64)  # (B, T, k) ok
    if idx.shape[0] != tok.shape[0]:
        raise ConfigError(f"token_ids has {tok.shape[0]} positions but indices has {idx.shape[0]} rows")
    if num_pathways < 1 or vocab_size < 2:
        raise ConfigError(f"need num_pathways >= 1 and vocab_size >= 2, got {num_pathways}, {vocab_size}")
    if idx.size and (idx.min() < 0 or idx.max() >= num_pathways):
        raise ConfigError(f"pathway indices must be in [0, {num_pathways}), got [{idx.min()}, {idx.max()}]")
    if tok.size and (tok.min() < 0 or tok.max() >= vocab_size):
        raise ConfigError(f"token ids must be in [0, {vocab_size}), got [{tok.min()}, {tok.max()}]")
    return tok, idx


def pathway_token_counts(token_ids, indices, num_pathways: int, vocab_size: int) -> np.ndarray:
    """(N, V) int64: how often each token id was routed to each pathway."""
    tok, idx = check_selections(token_ids, indices, num_pathways, vocab_size)
    k = idx.shape[1]
    flat = idx.reshape(-1) * vocab_size + np.repeat(tok, k)  # (n*k,) pathway-major cell id
    return np.bincount(flat, minlength=num_pathways * vocab_size).reshape(num_pathways, vocab_size)


def entropy(counts: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of a counts array (..., V); NaN for rows with no counts."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum(axis=-1, keepdims=True)  # (..., 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = c / total
        h = -np.sum(np.where(c > 0, p * np.log(np.where(c > 0, p, 1.0)), 0.0), axis=-1)
    return np.where(total[..., 0] > 0, np.maximum(h, 0.0), np.nan)


def purity(counts: np.ndarray, h_max: str = "vocab", vocab_size: int | None = None) -> np.ndarray:
    """Purity 1 - H/H_max of each row of counts (..., V); NaN for rows with no counts.

    h_max="vocab": H_max = log(vocab_size) (default V = counts.shape[-1]). h_max="distinct":
    H_max = log(number of distinct ids in the row), the original project's ("Pathway LLM") definition;
    1 for a single distinct id."""
    c = np.asarray(counts)
    h = entropy(c)
    if h_max == "vocab":
        v = c.shape[-1] if vocab_size is None else vocab_size
        if v < 2:
            raise ConfigError(f"purity needs a vocabulary of >= 2 ids, got {v}")
        return 1.0 - h / math.log(v)
    if h_max == "distinct":
        d = (c > 0).sum(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = 1.0 - h / np.log(np.maximum(d, 2))
        return np.where(d == 1, 1.0, np.where(d == 0, np.nan, out))
    raise ConfigError(f"h_max={h_max!r}: choose one of {H_MAX_CHOICES}")


# ----------------------------------------------------------------------------------------------
# controls


def random_topk(n_tokens: int, num_pathways: int, top_k: int, seed: int = 0) -> np.ndarray:
    """Control router: k distinct pathways drawn uniformly at random per position. -> (n, k) int64."""
    if not 1 <= top_k <= num_pathways:
        raise ConfigError(f"random_topk: need 1 <= top_k <= num_pathways, got {top_k}, {num_pathways}")
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n_tokens, num_pathways)), axis=1)[:, :top_k].astype(np.int64)


def permuted_routing(indices, seed: int = 0) -> np.ndarray:
    """Control: a router's choices shuffled across positions -- the same per-pathway loads and
    sparsity, no association between token and pathway. (n, k) -> (n, k)."""
    idx = _as_numpy(indices)
    idx = idx[:, None] if idx.ndim == 1 else idx.reshape(-1, idx.shape[-1])  # (n, k)
    return idx[np.random.default_rng(seed).permutation(idx.shape[0])]


# ----------------------------------------------------------------------------------------------
# per-layer metrics


@dataclass
class PathwayMetrics:
    """Monosemanticity metrics of one layer's pathways (definitions in the module docstring)."""

    num_pathways: int  # N
    vocab_size: int  # V, for H_max = log(V)
    top_k: int  # k pathways per position
    n_tokens: int  # positions n
    token_counts: np.ndarray  # (N, V) int32 selections per (pathway, token id)
    selections: np.ndarray  # (N,) int64 selections per pathway (sum n*k)
    load: np.ndarray  # (N,) selections / (n*k)
    distinct: np.ndarray  # (N,) distinct token ids each pathway saw
    entropy: np.ndarray  # (N,) nats; NaN for pathways never selected
    purity: np.ndarray  # (N,) 1 - H/log(V); NaN for pathways never selected
    purity_distinct: np.ndarray  # (N,) 1 - H/log(distinct), the original project's definition; NaN if never selected
    corpus_counts: np.ndarray  # (V,) int64 token-id counts over the n positions
    min_load: float  # utilisation threshold on load
    top_tokens: list[list[tuple[int, int]]] = field(default_factory=list)  # per pathway (id, count), top first

    @property
    def utilisation(self) -> float:
        """Fraction of the N pathways with load >= min_load."""
        return float(np.mean(self.load >= self.min_load))

    @property
    def load_balance(self) -> float:
        """H(load) / log(N): 1 = balanced, 0 = one pathway takes everything (1.0 when N == 1)."""
        if self.num_pathways == 1:
            return 1.0
        h = entropy(self.selections[None])[0]
        return float(h / math.log(self.num_pathways)) if np.isfinite(h) else float("nan")

    @property
    def max_load(self) -> float:
        return float(self.load.max()) if self.load.size else float("nan")

    @property
    def mean_purity(self) -> float:
        """Load-weighted mean purity (pathways never selected weigh 0)."""
        ok = self.selections > 0
        if not ok.any():
            return float("nan")
        return float(np.sum(self.load[ok] * self.purity[ok]) / self.load[ok].sum())

    @property
    def mean_purity_unweighted(self) -> float:
        """Plain mean purity over the pathways selected at least once."""
        ok = self.selections > 0
        return float(np.mean(self.purity[ok])) if ok.any() else float("nan")

    @property
    def corpus_purity(self) -> float:
        """Purity of the whole token stream: what a pathway fed a random sample would approach."""
        return float(purity(self.corpus_counts[None], vocab_size=self.vocab_size)[0])

    def enriched_tokens(self, pathway: int, n: int = 10, min_count: int = 5) -> list[tuple[int, int, float]]:
        """Tokens over-represented in a pathway: (id, count, lift) with lift = share of the id among
        the pathway's selections / its share in the corpus, for ids seen >= min_count times there."""
        c = self.token_counts[pathway].astype(np.float64)
        if c.sum() == 0:
            return []
        lift = (c / c.sum()) / np.maximum(self.corpus_counts / max(self.corpus_counts.sum(), 1), 1e-300)
        cand = np.flatnonzero(c >= min_count)
        order = cand[np.lexsort((-c[cand], -lift[cand]))][:n]
        return [(int(t), int(c[t]), float(lift[t])) for t in order]

    def summary(self) -> dict[str, float]:
        """Headline numbers of the layer (floats, NaN-free where defined)."""
        return {
            "mean_purity": self.mean_purity,
            "mean_purity_unweighted": self.mean_purity_unweighted,
            "mean_purity_distinct": float(np.nanmean(self.purity_distinct)) if (self.selections > 0).any()
            else float("nan"),
            "corpus_purity": self.corpus_purity,
            "utilisation": self.utilisation,
            "load_balance": self.load_balance,
            "max_load": self.max_load,
            "n_tokens": float(self.n_tokens),
        }

    def table(self, decode: Callable[[int], str] | None = None):
        """One row per pathway (a pandas DataFrame); ``decode(id) -> str`` renders the top tokens."""
        import pandas as pd

        render = decode or str
        rows = []
        for p in range(self.num_pathways):
            rows.append({
                "pathway": p, "selections": int(self.selections[p]), "load": float(self.load[p]),
                "distinct": int(self.distinct[p]), "entropy": float(self.entropy[p]),
                "purity": float(self.purity[p]), "purity_distinct": float(self.purity_distinct[p]),
                "top_tokens": ", ".join(f"{render(t)!r}:{c}" for t, c in self.top_tokens[p]),
            })
        return pd.DataFrame(rows)


def pathway_metrics(token_ids, indices, num_pathways: int, vocab_size: int, *, top_n: int = 10,
                    min_load: float = 0.01) -> PathwayMetrics:
    """All per-pathway metrics of one layer from (token_ids (n,), indices (n, k))."""
    if not 0.0 <= min_load <= 1.0:
        raise ConfigError(f"min_load must be in [0, 1], got {min_load!r}")
    tok, idx = check_selections(token_ids, indices, num_pathways, vocab_size)
    counts = pathway_token_counts(tok, idx, num_pathways, vocab_size)  # (N, V)
    selections = counts.sum(axis=1)  # (N,)
    total = max(int(selections.sum()), 1)
    top = []
    for p in range(num_pathways):
        nz = np.flatnonzero(counts[p])
        best = nz[np.lexsort((nz, -counts[p, nz]))][:top_n]  # count desc, id asc
        top.append([(int(t), int(counts[p, t])) for t in best])
    return PathwayMetrics(
        num_pathways=num_pathways, vocab_size=vocab_size, top_k=idx.shape[1], n_tokens=tok.shape[0],
        token_counts=counts.astype(np.int32), selections=selections, load=selections / total,
        distinct=(counts > 0).sum(axis=1), entropy=entropy(counts), purity=purity(counts, "vocab", vocab_size),
        purity_distinct=purity(counts, "distinct"), corpus_counts=np.bincount(tok, minlength=vocab_size),
        min_load=min_load, top_tokens=top,
    )


def layer_summaries(token_ids, selections: Mapping[int, np.ndarray], num_pathways: int, vocab_size: int,
                    **kwargs):
    """{layer: indices (n, k)} -> DataFrame, one row per layer with :meth:`PathwayMetrics.summary`."""
    import pandas as pd

    rows = [{"layer": layer, **pathway_metrics(token_ids, idx, num_pathways, vocab_size, **kwargs).summary()}
            for layer, idx in selections.items()]
    return pd.DataFrame(rows)


def compare_routers(token_ids, routers: Mapping[str, Mapping[int, np.ndarray]], num_pathways: int,
                    vocab_size: int, **kwargs):
    """{router name: {layer: indices}} -> DataFrame (router, layer, summary...): trained, untrained and
    control routers side by side on the same tokens."""
    import pandas as pd

    frames = []
    for name, sel in routers.items():
        df = layer_summaries(token_ids, sel, num_pathways, vocab_size, **kwargs)
        df.insert(0, "router", name)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------------------------
# domains and examples


def purity_by_domain(token_ids, indices, domains, num_pathways: int, vocab_size: int):
    """Per (domain, pathway): selections, load within the domain, purity (H_max = log V) of the
    pathway's tokens *from that domain*. domains: (n,) labels (str or int). -> long DataFrame."""
    import pandas as pd

    tok, idx = check_selections(token_ids, indices, num_pathways, vocab_size)
    dom = _as_numpy(domains).reshape(-1)
    if dom.shape[0] != tok.shape[0]:
        raise ConfigError(f"domains has {dom.shape[0]} labels for {tok.shape[0]} positions")
    rows = []
    for d in sorted(set(dom.tolist()), key=str):
        m = dom == d
        pm = pathway_metrics(tok[m], idx[m], num_pathways, vocab_size, top_n=0)
        for p in range(num_pathways):
            rows.append({"domain": d, "pathway": p, "selections": int(pm.selections[p]), "load": float(pm.load[p]),
                         "purity": float(pm.purity[p]), "corpus_purity": pm.corpus_purity})
    return pd.DataFrame(rows)


def domain_specialisation(indices, domains, num_pathways: int):
    """How concentrated each pathway is on domains. -> DataFrame, one row per pathway: the share of
    its selections from each domain (columns ``share_<domain>``), ``lift_<domain>`` = that share /
    the domain's share of all positions, and ``domain_purity`` = 1 - H(domain | pathway) / log(D)."""
    import pandas as pd

    idx = _as_numpy(indices)
    idx = idx[:, None] if idx.ndim == 1 else idx.reshape(-1, idx.shape[-1])  # (n, k)
    dom = _as_numpy(domains).reshape(-1)
    if dom.shape[0] != idx.shape[0]:
        raise ConfigError(f"domains has {dom.shape[0]} labels for {idx.shape[0]} positions")
    names = sorted(set(dom.tolist()), key=str)
    lookup = {d: j for j, d in enumerate(names)}
    code = np.array([lookup[d] for d in dom.tolist()], dtype=np.int64)  # (n,) domain index
    k = idx.shape[1]
    table = np.bincount(idx.reshape(-1) * len(names) + np.repeat(code, k),
                        minlength=num_pathways * len(names)).reshape(num_pathways, len(names))  # (N, D)
    base = np.bincount(code, minlength=len(names)) / max(len(code), 1)  # (D,)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = table / table.sum(axis=1, keepdims=True)
    dpur = purity(table, "vocab", len(names)) if len(names) > 1 else np.full(num_pathways, np.nan)
    out = {"pathway": np.arange(num_pathways), "selections": table.sum(axis=1)}
    for j, d in enumerate(names):
        out[f"share_{d}"] = share[:, j]
    for j, d in enumerate(names):
        out[f"lift_{d}"] = share[:, j] / base[j] if base[j] > 0 else np.nan
    out["domain_purity"] = dpur
    return pd.DataFrame(out)


def pathway_examples(indices, pathway: int, n_examples: int = 5, seed: int = 0,
                     seq_ids: Sequence[int] | np.ndarray | None = None, window: int = 8,
                     token_ids=None) -> list[tuple[int, np.ndarray]]:
    """Random positions routed to ``pathway``, each with its context: a list of (position, token
    ids of [position - window, position]) clipped to the same sequence (``seq_ids`` (n,), optional).
    Without ``token_ids`` the context is the position range instead of ids."""
    idx = _as_numpy(indices)
    idx = idx[:, None] if idx.ndim == 1 else idx.reshape(-1, idx.shape[-1])  # (n, k)
    hits = np.flatnonzero((idx == pathway).any(axis=1))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(hits, size=min(n_examples, hits.size), replace=False)) if hits.size else hits
    seq = None if seq_ids is None else _as_numpy(seq_ids).reshape(-1)
    tok = None if token_ids is None else _as_numpy(token_ids).reshape(-1)
    out = []
    for pos in chosen.tolist():
        start = max(0, pos - window)
        if seq is not None:
            while start < pos and seq[start] != seq[pos]:
                start += 1
        span = np.arange(start, pos + 1)
        out.append((pos, tok[span] if tok is not None else span))
    return out


__all__ = [
    "PathwayMetrics",
    "check_selections",
    "compare_routers",
    "domain_specialisation",
    "entropy",
    "layer_summaries",
    "pathway_examples",
    "pathway_metrics",
    "pathway_token_counts",
    "permuted_routing",
    "purity",
    "purity_by_domain",
    "random_topk",
]
