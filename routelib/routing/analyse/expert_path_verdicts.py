"""Paths, not experts: the claims of Ye, Yuan & Sharkey (2026, "Polysemantic Experts, Monosemantic Paths:
Routing as Control in MoEs", arXiv 2604.17837) tested on one routing: a trace set (notebook 04) or a pathway
router's held-out sample (notebook 01).

Three verdicts, each a number with a 95 % interval and its control:

- (a) **single experts are polysemantic**: the share of a token's identity (entropy of the token id)
  that one layer's first choice explains (normalised MI), excess over its size-matched permutation
  null; mean and best over layers;
- (b) **paths are more specific than single experts beyond the size-matched control**: the same for the
  path (first choice per layer), against two controls that keep every layer's expert usage and break the
  dependence between layers -- overall, and given the token id
  (:func:`routelib.routing.analyse.expert_paths.independent_layers`);
- (c) **paths separate a token's roles**: for multi-role tokens, role (register and next token's class,
  :mod:`routelib.routing.analyse.roles`) explained by the path minus by the best single layer.

``depth``: the path over every layer (``None``), or over blocks of ``depth`` consecutive layers (layers
0..depth-1, depth..2 depth-1, ...), each measure then the mean over the blocks (for (b), the path minus the
best single layer *of the same block*). When paths approach one per token the size-matched null absorbs
the whole path and its excess goes to 0 whatever the router does; short paths stay measurable.

Intervals for (a) and (b): bootstrap over sequences (whole problems or text windows resampled,
``draws`` times, each draw with its own nulls of ``permutations`` shuffles). A resample repeats sequences,
which raises plug-in mutual information, so the table gives the plug-in ``value``, the bootstrap's
estimate of its ``bias`` (mean over draws minus value), the bias-corrected ``estimate`` (value minus bias)
and the *basic* bootstrap interval (2 value - upper and lower percentiles). For (c): percentile bootstrap
over token types (:func:`routelib.routing.analyse.roles.paired_difference`), the per-type values fixed.
On a small sample with many rare tokens that bias is mostly the resampling's own (a repeated sequence
repeats its (token, expert) pairs, which the observed information counts and the permutation null
scatters): even a router blind to the token then gets a negative bias-corrected estimate whose interval
excludes 0. Carry such a router as a control.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from routelib.errors import ConfigError
from routelib.routing.analyse.expert_paths import independent_layers, path_ids, specificity
from routelib.routing.analyse.roles import is_multi_role, paired_difference, role_labels, role_separation


def depth_blocks(n_layers: int, depth: int | None) -> list[list[int]]:
    """The layers a path runs over: all layers (``depth`` None), else consecutive blocks of
    ``depth`` layers (0..depth-1, depth..2 depth-1, ...; the last layers left over when ``depth`` does not
    divide their number)."""
    if depth is None:
        return [list(range(n_layers))]
    if not 1 <= depth <= n_layers:
        raise ConfigError(f"depth={depth}: choose 1..{n_layers} consecutive layers, or None for all")
    return [list(range(j, j + depth)) for j in range(0, n_layers - depth + 1, depth)]


def _measures(experts: np.ndarray, ids: np.ndarray, permutations: int, seed: int,
              depths=(None,)) -> dict[int | None, dict[str, float]]:
    """(a) and (b) on one sample of tokens, for each path depth: excess NMI of the token id with each
    layer's first choice, with the path, with the paths of the two independent-layer controls (means over
    the blocks), and the path minus the best single layer of its block."""
    single = [specificity(ids, experts[:, layer, 0], permutations, seed)["excess"] for layer in range(experts.shape[1])]
    # the controls' shuffles get their own random streams: drawn with ``seed`` itself they would repeat the
    # null's label permutations and line the null up with the control
    shuffled, given = independent_layers(experts, [seed, 1]), independent_layers(experts, [seed, 2], within=ids)
    excess = lambda e, w: specificity(ids, path_ids(e, w), permutations, seed)["excess"]  # noqa: E731
    out = {}
    for depth in depths:
        windows = depth_blocks(experts.shape[1], depth)
        path = [excess(experts, w) for w in windows]
        out[depth] = {
            "single expert (mean over layers)": float(np.mean(single)),
            "single expert (best layer)": float(np.max(single)),
            "path": float(np.mean(path)),
            "path, layers independent": float(np.mean([excess(shuffled, w) for w in windows])),
            "path, layers independent given the token": float(np.mean([excess(given, w) for w in windows])),
            "path minus best single expert": float(np.mean([p - max(single[l] for l in w) for p, w in zip(path, windows)])),
        }
    return out


def basic_bootstrap(value: float, draws: pd.Series) -> dict[str, float]:
    """Plug-in ``value``, its bootstrap bias, the bias-corrected estimate and the basic 95 % interval."""
    lo, hi = draws.quantile(0.025), draws.quantile(0.975)
    bias = float(draws.mean() - value)
    return dict(value=float(value), bias=bias, estimate=float(value - bias), low=float(2 * value - hi),
                high=float(2 * value - lo))


def verdict_lines(table: pd.DataFrame) -> list[str]:
    """One sentence per verdict of a :func:`path_verdicts` table (one router, one depth), every number
    read from it."""
    row = table.set_index("measure")
    fmt = lambda r: f"{r['estimate']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"  # noqa: E731
    best, path = row.loc["token identity: single expert (best layer)"], row.loc["token identity: path"]
    diff = row.loc["token identity: path minus best single expert"]
    control = row.loc["token identity: path, layers independent given the token"]
    lines = [f"(a) one layer's expert explains {fmt(best)} of a token's identity beyond the null (best layer)",
             f"(b) the path explains {fmt(path)}: {fmt(diff)} more than the best single expert; with the layers made "
             f"independent given the token it still explains {fmt(control)}"]
    roles = table[table["verdict"] == "c"]
    if len(roles):
        r = roles.iloc[0]
        lines.append(f"(c) {r['measure']}: {fmt(r)}")
    return lines


def verdicts_by_depth(df: pd.DataFrame, experts: np.ndarray, tokenizer, draws: int, permutations: int, seed: int,
                    min_count: int, depths) -> dict[int | None, pd.DataFrame]:
    """{depth: :func:`path_verdicts` table} for each of ``depths`` at once, on the same resamples (single
    layers and controls computed once per resample)."""
    if len(df) != len(experts):
        raise ConfigError(f"path_verdicts: {len(df)} rows, {len(experts)} rows of experts")
    ids = df["token_id"].to_numpy()
    seq = pd.factorize(df["problem_id"].astype(str) + "|" + df["dataset"].astype(str))[0]
    point = _measures(experts, ids, permutations, seed, depths)
    rng = np.random.default_rng(seed)
    members = pd.Series(np.arange(len(seq))).groupby(seq).apply(np.asarray).tolist()  # rows of each sequence
    boots = []
    for d in range(draws):
        rows = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        boots.append(_measures(experts[rows], ids[rows], permutations, seed + 1 + d, depths))
    verdict = {"single expert (mean over layers)": "a", "single expert (best layer)": "a"}
    tables = {}
    for depth in depths:
        boot = pd.DataFrame([b[depth] for b in boots])
        out = [dict(verdict=verdict.get(m, "b"), measure=f"token identity: {m}", **basic_bootstrap(v, boot[m]))
               for m, v in point[depth].items()]
        roles = role_table(df, experts, tokenizer, min_count=min_count, permutations=permutations, seed=seed, depth=depth)
        if not roles.empty:
            for other in ("single_excess_max", "single_excess_mean"):
                p = paired_difference(roles, b=other, seed=seed)
                name = "best single layer" if other.endswith("max") else "mean single layer"
                out.append(dict(verdict="c", measure=f"role: path minus {name} ({p['n_types']} token types)",
                                value=p["mean"], bias=0.0, estimate=p["mean"], low=p["low"], high=p["high"]))
        tables[depth] = pd.DataFrame(out)
    return tables


def path_verdicts(df: pd.DataFrame, experts: np.ndarray, tokenizer, draws: int = 30, permutations: int = 5,
                  seed: int = 0, min_count: int = 100, depth: int | None = None) -> pd.DataFrame:
    """The three verdicts on one routing: ``df`` its rows (problem_id, token_id, dataset: :func:`sample_frame`),
    ``experts`` (N, L, k) their routing, ``tokenizer`` the model's (to decode tokens for the roles), ``depth``
    the path's layers (module docstring). One row per measure: verdict, measure, value (excess normalised MI
    over the size-matched null), bias, estimate, low, high."""
    return verdicts_by_depth(df, experts, tokenizer, draws, permutations, seed, min_count, (depth,))[depth]


def role_table(df: pd.DataFrame, experts: np.ndarray, tokenizer, min_count: int = 100, permutations: int = 5,
               seed: int = 0, depth: int | None = None) -> pd.DataFrame:
    """:func:`routelib.routing.analyse.roles.role_separation` for the multi-role tokens of a routing, with
    each token's text (the register from ``dataset``, or from a text window's domain, the part of
    ``problem_id`` before "/"), for the path over every layer or, with ``depth``, the mean over the blocks of
    ``depth`` consecutive layers (each block's single layers its own). Token texts come from a
    ``token_text`` column when ``tokenizer`` is None, else from decoding."""
    ids = df["token_id"].to_numpy()
    if "token_text" in df and tokenizer is None:  # the rows' own token texts (any model)
        text_of = dict(zip(df["token_id"].astype(int), df["token_text"].astype(str)))
    else:
        text_of = {int(i): tokenizer.decode([int(i)]) for i in np.unique(ids)}
    tokens = [text_of[int(i)] for i in ids]
    seq = (df["problem_id"].astype(str) + "|" + df["dataset"].astype(str)).to_numpy()
    same = np.r_[seq[1:] == seq[:-1], False]  # the next row continues the sequence
    nxt = [text_of[int(j)] if s else "" for j, s in zip(np.r_[ids[1:], ids[:1]], same)]
    text_domain = df["problem_id"].astype(str).str.split("/").str[0]
    source = np.where(df["dataset"].astype(str).str.contains("text"), text_domain, df["dataset"].astype(str))
    mask = np.array([is_multi_role(t) for t in tokens])
    if not mask.any():
        return pd.DataFrame()
    roles = role_labels([t for t, m in zip(tokens, mask) if m], list(source[mask]), [n for n, m in zip(nxt, mask) if m])
    tables = [role_separation(experts[mask], ids[mask], roles, layers=w, min_count=min_count,
                              permutations=permutations, seed=seed) for w in depth_blocks(experts.shape[1], depth)]
    if tables[0].empty:
        return pd.DataFrame()
    table = tables[0] if len(tables) == 1 else pd.concat(tables).groupby("token_id", sort=True).mean().reset_index()
    table[["token_id", "n", "roles"]] = table[["token_id", "n", "roles"]].astype(int)  # the same in every block
    table.insert(1, "token", [repr(text_of[int(t)]) for t in table["token_id"]])
    return table


__all__ = ["basic_bootstrap", "depth_blocks", "path_verdicts", "role_table", "verdict_lines",
           "verdicts_by_depth"]
