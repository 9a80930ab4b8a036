"""How much of a generation repeats itself: the share of generated tokens inside a repeated n-gram.

A small model decoding greedily falls into loops; the loops repeat expert paths too, which inflates
path frequencies and flatters history-based next-expert predictors. The repetition rate measures it
per trace set, so greedy and sampled traces can be compared: a generated token counts as
repeated when some n-gram of the same sequence's generated tokens that covers it occurs at least
twice in that sequence (n = 4 by default; prompts are left out).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd


def repeated_ngram_mask(tokens: np.ndarray, n: int = 4) -> np.ndarray:
    """(T,) bool: token t lies inside an n-gram of ``tokens`` (T,) that occurs at least twice in it."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tokens = np.asarray(tokens)
    mask = np.zeros(len(tokens), bool)
    if len(tokens) < n:
        return mask
    grams = [tuple(tokens[i:i + n].tolist()) for i in range(len(tokens) - n + 1)]
    counts = Counter(grams)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            mask[i:i + n] = True
    return mask


def repetition_by_problem(traces: pd.DataFrame, n: int = 4) -> pd.DataFrame:
    """Per problem of a trace frame (``load_traces``): dataset, generated tokens, those inside a
    repeated n-gram of the problem's own generation, and their share."""
    gen = traces[traces["phase"] == "generated"].sort_values(["problem_id", "position"])
    rows = []
    for (dataset, problem), g in gen.groupby(["dataset", "problem_id"], sort=False):
        mask = repeated_ngram_mask(g["token_id"].to_numpy(), n)
        rows.append({"dataset": dataset, "problem_id": problem, "generated_tokens": len(mask),
                     "repeated_tokens": int(mask.sum())})
    out = pd.DataFrame(rows, columns=["dataset", "problem_id", "generated_tokens", "repeated_tokens"])
    out["repetition_rate"] = out["repeated_tokens"] / out["generated_tokens"].clip(lower=1)
    return out


def repetition_rate(traces: pd.DataFrame, n: int = 4) -> pd.DataFrame:
    """Per dataset (and ``all``): generated tokens, repeated tokens (inside a repeated n-gram of the
    same sequence) and their share -- the token-weighted repetition rate of the trace set."""
    per = repetition_by_problem(traces, n)
    table = per.groupby("dataset")[["generated_tokens", "repeated_tokens"]].sum()
    table.loc["all"] = table.sum()
    table["repetition_rate"] = table["repeated_tokens"] / table["generated_tokens"].clip(lower=1)
    return table
