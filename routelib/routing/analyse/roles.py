"""Function, not form: do a token's paths separate the roles it plays, more than one layer's expert does?

Ye, Yuan & Sharkey (2026, "Polysemantic Experts, Monosemantic Paths", arXiv 2604.17837) report that paths
group tokens by what they do, not by what they are. Tokens such as ":" "." "(" "=" "," digits and the
newline occur in several roles; this module labels each occurrence with a role by a stated rule and asks
whether the role is predictable from the token's path (over chosen layers) beyond the size-matched null
(:func:`routelib.routing.analyse.expert_paths.specificity`), and whether more so than from a single
layer's expert.

**The role rule** (:func:`role_labels`): the occurrence's *register* -- "code" when its text is code
(the code domain, or a HumanEval problem), else "prose" -- and the *class of the next token* (newline,
space, digit, letter, punctuation): e.g. ":" before a newline in code (a block opener) vs ":" before a
space in prose (a colon in a sentence), "." before a letter in code (attribute access) vs before a space
(end of sentence) vs before a digit (a decimal point). Both parts are read from the context only.

:func:`role_separation` measures, per multi-role token with enough occurrences, the normalised mutual
information between role and path and between role and each single layer's first choice, both as
excess over their permutation nulls; :func:`paired_difference` gives the occurrence-weighted mean of
(path excess − best single-layer excess) with a bootstrap interval over token types.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from routelib.errors import ConfigError
from routelib.routing.analyse.expert_paths import path_ids, specificity

#: Surface forms (stripped of surrounding spaces) that play several roles in code and prose.
MULTI_ROLE = (":", ".", "(", ")", "=", ",", "\n", "-", "*", "'", '"') + tuple("0123456789")
#: Domains whose text is code.
CODE_SOURCES = ("code", "humaneval")


def token_class(text: str) -> str:
    """The class of a decoded token: newline, space (whitespace only), digit, letter (its first
    non-space character is a letter or underscore), punct, or empty."""
    if text == "":
        return "empty"
    if "\n" in text:
        return "newline"
    core = text.strip()
    if not core:
        return "space"
    head = core[0]
    if head.isdigit():
        return "digit"
    if head.isalpha() or head == "_":
        return "letter"
    return "punct"


def role_labels(tokens: list[str], sources: list[str], next_tokens: list[str]) -> np.ndarray:
    """(N,) role of every occurrence: "<register>|next:<class>" (module docstring). tokens, next_tokens:
    decoded strings of the token and of the one after it ("" at a sequence's end); sources: the domain or
    dataset of each occurrence."""
    if not len(tokens) == len(sources) == len(next_tokens):
        raise ConfigError(f"role_labels: {len(tokens)} tokens, {len(sources)} sources, {len(next_tokens)} next tokens")
    register = ["code" if str(s).lower() in CODE_SOURCES else "prose" for s in sources]
    return np.asarray([f"{r}|next:{token_class(n)}" for r, n in zip(register, next_tokens)])


def is_multi_role(text: str) -> bool:
    """Whether a decoded token is one of :data:`MULTI_ROLE` (surrounding spaces ignored; "\\n" as is)."""
    return text in MULTI_ROLE or (text.strip() in MULTI_ROLE and text.strip() != "")


def role_separation(experts: np.ndarray, token_ids: np.ndarray, roles: np.ndarray, layers=None,
                    min_count: int = 50, min_role_count: int = 5, permutations: int = 20,
                    seed: int = 0) -> pd.DataFrame:
    """Per token id with >= ``min_count`` occurrences and two or more roles of >= ``min_role_count``
    occurrences each (rarer roles dropped): n, roles, the role's normalised MI with the path over
    ``layers`` (top-1 per layer) and its excess over the null, and the same for each single layer's
    first choice (``single_excess_mean``, ``single_excess_max``). experts: (N, L, k)."""
    experts, token_ids, roles = np.asarray(experts), np.asarray(token_ids), np.asarray(roles)
    if not len(experts) == len(token_ids) == len(roles):
        raise ConfigError(f"role_separation: {len(experts)} rows of experts, {len(token_ids)} token ids, {len(roles)} roles")
    layers = list(range(experts.shape[1])) if layers is None else list(layers)
    rows = []
    ids, counts = np.unique(token_ids, return_counts=True)
    for tid in ids[counts >= min_count]:
        rows_t = np.flatnonzero(token_ids == tid)
        names, role_counts = np.unique(roles[rows_t], return_counts=True)
        kept = set(names[role_counts >= min_role_count])
        if len(kept) < 2:
            continue
        rows_t = rows_t[np.isin(roles[rows_t], list(kept))]
        lab = roles[rows_t]
        path = specificity(lab, path_ids(experts[rows_t], layers), permutations, seed)
        single = [specificity(lab, experts[rows_t, layer, 0], permutations, seed)["excess"] for layer in layers]
        rows.append(dict(token_id=int(tid), n=len(rows_t), roles=len(kept), path_nmi=path["nmi"],
                         path_null=path["null_mean"], path_excess=path["excess"], path_groups=path["groups"],
                         single_excess_mean=float(np.mean(single)), single_excess_max=float(np.max(single))))
    return pd.DataFrame(rows)


def paired_difference(table: pd.DataFrame, a: str = "path_excess", b: str = "single_excess_max",
                      draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """Occurrence-weighted mean of ``a - b`` over token types with a 95 % percentile bootstrap interval
    (token types resampled): n_types, mean, low, high."""
    if table.empty:
        raise ConfigError("paired_difference: no token type with two or more roles")
    diff, weight = (table[a] - table[b]).to_numpy(), table["n"].to_numpy(float)
    mean = float(np.average(diff, weights=weight))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(diff), size=(draws, len(diff)))  # (draws, types)
    boot = (diff[picks] * weight[picks]).sum(1) / weight[picks].sum(1)
    low, high = np.quantile(boot, [0.025, 0.975])
    return {"n_types": int(len(diff)), "mean": mean, "low": float(low), "high": float(high)}


__all__ = ["CODE_SOURCES", "MULTI_ROLE", "is_multi_role", "paired_difference", "role_labels", "role_separation",
           "token_class"]
