"""Notebook 01's "Paths, not pathways": the claims of Ye, Yuan & Sharkey (2026, "Polysemantic Experts,
Monosemantic Paths: Routing as Control in MoEs", arXiv 2604.17837) tested on the pathway router's held-out
routing (a reference run's ``samples/<run>.npz``), for the trained router and, as controls, the untrained one
and a random one blind to the token.

The paper's claims: (a) single experts are polysemantic; (b) a token's *path* -- its expert at every
layer -- is more specific than a single expert, beyond what splitting tokens into more, smaller groups
gives by itself; (c) paths separate the roles a token plays. Here an expert is a pathway and a path is a
token's first-choice pathway at each routed layer. Each verdict is a number with a 95 % interval and its
control (the measures of :mod:`routelib.routing.analyse.expert_paths` and :mod:`routelib.routing.analyse.roles`):

- (a) the share of a token's identity (entropy of the token id) that one layer's first choice explains
  (normalised MI), in excess of its **size-matched permutation null** (the same groups with the same
  sizes, token ids shuffled); mean and best over layers;
- (b) the same for the path, against two controls that keep every layer's pathway usage and break the
  dependence between layers -- overall, and given the token id
  (:func:`routelib.routing.analyse.expert_paths.independent_layers`);
- (c) for multi-role tokens, role (register and next token's class, :mod:`routelib.routing.analyse.roles`)
  explained by the path minus by the best single layer.

``depth``: the path over every routed layer (``None``, as the paper and notebook 04 define it), or over
blocks of ``depth`` consecutive routed layers (layers 0..depth-1, depth..2 depth-1, ...), each measure then
the mean over the blocks (for (b), the path minus the best single layer *of the same block*). With 14
routed layers of 16 pathways and some ten thousand held-out positions nearly every full-depth path is
unique, so the size-matched null absorbs the whole path and its excess goes to 0 whatever the router
does: :func:`depth_sweep` shows where that sets in; short paths stay measurable.

Intervals for (a) and (b): bootstrap over held-out windows (``draws`` times, each draw with its own
nulls of ``permutations`` shuffles; every router resamples the same windows). A resample repeats
windows, which raises plug-in mutual information, so the table gives the plug-in ``value``, the
bootstrap's estimate of its ``bias`` (mean over draws minus value), the bias-corrected ``estimate``
(value minus bias) and the *basic* bootstrap interval (2 value - upper and lower percentiles). For (c):
percentile bootstrap over token types (:func:`routelib.routing.analyse.roles.paired_difference`).
On a sample as small as a reference run's (some 9,000 positions, most token types seen once or twice)
that bias is mostly the resampling's own: a repeated window repeats its (token, pathway) pairs, which the
observed information counts and the permutation null scatters, so even a router blind to the token
(:func:`random_router`) gets a bias of several hundredths and a negative bias-corrected estimate whose
interval excludes 0, while its plug-in value is 0. Carry that router as a control and read every router
against it.

The verdicts are :mod:`routelib.routing.analyse.expert_path_verdicts`'s, as in notebook 04.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike

import numpy as np
import pandas as pd

from routelib import metrics
from routelib.errors import ConfigError
from routelib.routing.analyse.expert_path_verdicts import (depth_blocks, path_verdicts, role_table,
                                                           verdict_lines, verdicts_by_depth)
from routelib.routing.analyse.expert_paths import path_ids, specificity

SAMPLE_KEYS = ("tokens", "domains", "seq_ids", "layers", "trained", "untrained")


def sample_frame(npz: str | PathLike | Mapping) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """A held-out routing sample (``samples/<run>.npz``, or its arrays in a mapping) as what
    :func:`path_verdicts` reads: a frame with one row per position, in order (``problem_id`` =
    "<domain>/<window>", ``token_id``, ``dataset`` = "text" so that a token's register is its window's
    domain, ``domain``, ``seq_id``), and the (N, L, k) pathways of the trained and of the untrained router."""
    if isinstance(npz, Mapping):
        arrays = {k: np.asarray(npz[k]) for k in SAMPLE_KEYS if k in npz}
    else:
        with np.load(npz) as z:
            arrays = {k: z[k] for k in SAMPLE_KEYS if k in z.files}
    missing = [k for k in SAMPLE_KEYS if k not in arrays]
    if missing:
        raise ConfigError(f"sample_frame: the sample lacks {missing}; expected the keys {list(SAMPLE_KEYS)}")
    tokens, domains, seqs = arrays["tokens"], arrays["domains"].astype(str), arrays["seq_ids"]
    n, n_layers = len(tokens), len(arrays["layers"])
    for router in ("trained", "untrained"):
        shape = arrays[router].shape
        if len(shape) != 3 or shape[:2] != (n, n_layers):
            raise ConfigError(f"sample_frame: {router} has shape {shape}, expected ({n}, {n_layers}, k)")
    if not len(domains) == len(seqs) == n:
        raise ConfigError(f"sample_frame: {n} tokens, {len(domains)} domains, {len(seqs)} window ids")
    problem = pd.Series([f"{d}/{s}" for d, s in zip(domains, seqs)])
    starts = int((problem != problem.shift()).sum())
    if starts != problem.nunique():  # a window's positions must be one run, in order: the next token is read from it
        raise ConfigError(f"sample_frame: {problem.nunique()} windows split into {starts} runs of positions")
    frame = pd.DataFrame({"problem_id": problem, "token_id": tokens.astype(np.int64), "dataset": "text",
                          "domain": domains, "seq_id": seqs.astype(np.int64)})
    return frame, arrays["trained"].astype(np.int64), arrays["untrained"].astype(np.int64)


def random_router(n_tokens: int, n_layers: int, num_pathways: int, top_k: int, seed: int = 0) -> np.ndarray:
    """(N, L, k): ``top_k`` distinct pathways drawn uniformly at random per position and layer, blind to
    the token -- the "random top-k" control of :func:`routelib.studies.pathways.control_selections` (layer j
    drawn with ``seed + j``, layers in order). Its plug-in excesses are 0 up to noise; its bias-corrected
    estimates measure the resampling's own bias (module docstring)."""
    return np.stack([metrics.random_topk(n_tokens, num_pathways, top_k, seed=seed + j) for j in range(n_layers)], axis=1)


def pathway_path_verdicts(df: pd.DataFrame, routers: Mapping[str, np.ndarray], tokenizer, depths=(None,),
                          draws: int = 20, permutations: int = 5, seed: int = 0, min_count: int = 50) -> pd.DataFrame:
    """:func:`path_verdicts` for each router (``{"trained": (N, L, k), "untrained": ...}``, e.g. from
    :func:`sample_frame`) and each path depth in ``depths`` (None: every routed layer), every router on the
    same resampled windows: one tidy table with columns router, path ("all L layers" or "blocks of d
    layers"), depth (L for all), then verdict, measure, value, bias, estimate, low, high. ``min_count``:
    occurrences a multi-role token needs to enter (c) (notebook 04's traces, 14 to 27 times larger, use 100)."""
    frames = []
    for name, experts in routers.items():
        tables = verdicts_by_depth(df, experts, tokenizer, draws, permutations, seed, min_count, tuple(depths))
        n_layers = experts.shape[1]
        for depth, table in tables.items():
            table.insert(0, "depth", n_layers if depth is None else depth)
            table.insert(0, "path", f"all {n_layers} layers" if depth is None else f"blocks of {depth} layers")
            table.insert(0, "router", name)
            frames.append(table)
    return pd.concat(frames, ignore_index=True)


def depth_sweep(df: pd.DataFrame, routers: Mapping[str, np.ndarray], depths=None, permutations: int = 5,
                seed: int = 0) -> pd.DataFrame:
    """Point estimates (no intervals, no bias correction) of the path's specificity for the token id
    against path depth: per router and depth d (default 1..L), over the blocks of d consecutive layers
    (:func:`path_verdicts`' blocks), the mean number of distinct paths, their share of the positions, and
    the excess NMI over the size-matched null (mean and best block). At d = 1 a path is one layer's first
    choice; as the paths approach one per position, observed and null NMI both approach 1 and the excess
    goes to 0, whatever the router does: the depth beyond which this sample cannot tell paths apart."""
    ids = df["token_id"].to_numpy()
    rows = []
    for name, experts in routers.items():
        if len(experts) != len(ids):
            raise ConfigError(f"depth_sweep: {len(ids)} rows, {len(experts)} rows of {name} experts")
        for d in depths or range(1, experts.shape[1] + 1):
            found = [specificity(ids, path_ids(experts, w), permutations, seed)
                     for w in depth_blocks(experts.shape[1], d)]
            paths = float(np.mean([f["groups"] for f in found]))
            rows.append(dict(router=name, depth=d, blocks=len(found), paths=paths, paths_share=paths / len(ids),
                             excess_mean=float(np.mean([f["excess"] for f in found])),
                             excess_best=float(np.max([f["excess"] for f in found]))))
    return pd.DataFrame(rows)


__all__ = ["SAMPLE_KEYS", "depth_sweep", "path_verdicts", "pathway_path_verdicts", "random_router", "role_table",
           "sample_frame", "verdict_lines"]
