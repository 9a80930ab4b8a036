"""Train/test splits of routing traces that cannot leak, and the test subsets reported (notebook 05).

The Mixtral routing project that notebook 05 tests measured its 55.6 % top-1 on a random split over single layer
transitions, so transitions of one token journey sat on both sides; its own problem-wise split gave
notably lower held-out numbers. Here every number comes from splits that cannot leak.

Splits (:func:`make_splits`), deterministic in the seed: ``problem`` (whole problems to one side,
stratified by dataset; a dataset of two problems or more always keeps one on each side, so a folder
of 2 problems per dataset holds one whole problem out of each), ``dataset`` (train on all other
datasets, test on one; both directions for two), and ``token`` (a random split over tokens -- leaks
repeated journeys and neighbouring tokens of one problem; reported only to show how much it inflates
the numbers). :func:`check_no_leak` refuses a
problem on both sides (or an empty side); :func:`journey_overlap` measures how many test journeys
(token id + every layer's expert set) the training side has already seen.

Test subsets (:func:`subset_masks`): ``all``, ``prompt`` or ``generated`` tokens, and ``unique`` (the
first occurrence of each journey, so that a loop the model repeats counts once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from routelib.routing.predict.dataset import PredictorError, RoutingData, journeys

SPLITS = ("problem", "dataset", "token")
SUBSETS = ("all", "prompt", "generated", "unique")


@dataclass(frozen=True)
class Split:
    kind: str  # "problem", "dataset" or "token"
    train_label: str  # datasets on the training side, "+"-joined
    test_label: str  # datasets on the test side
    train: np.ndarray = field(repr=False)  # row indices
    test: np.ndarray = field(repr=False)  # row indices

    @property
    def label(self) -> str:
        return f"{self.kind}: {self.train_label} -> {self.test_label}"


def check_no_leak(data: RoutingData, split: Split) -> None:
    """PredictorError if a problem (problem/dataset splits) has rows on both sides, or a side is empty."""
    if len(split.train) == 0 or len(split.test) == 0:
        side = "training" if len(split.train) == 0 else "test"
        raise PredictorError(f"split {split.label!r}: the {side} side is empty ({len(data)} rows, "
                             f"{len(data.problems)} problems)")
    if split.kind != "token":
        both = np.intersect1d(data.problem[split.train], data.problem[split.test])
        if both.size:
            raise PredictorError(f"split {split.label!r} leaks: problem {data.problems[both[0]]} is on both sides")


def held_out_problems(num_problems: int, test_fraction: float) -> int:
    """How many of a dataset's ``num_problems`` problems a problem split holds out: the rounded
    fraction, but at least one and at most all but one when the dataset has two problems or more
    (none when it has one: that problem trains)."""
    if num_problems < 2:
        return 0
    return min(max(int(round(test_fraction * num_problems)), 1), num_problems - 1)


def describe_split(data: RoutingData, split: Split) -> str:
    """One line saying what ``split`` holds out: per dataset the problems on each side (problem
    and dataset splits) or the tokens (token split), and the token counts."""
    def problems(rows: np.ndarray, name: str) -> int:
        present = np.unique(data.problem[rows])
        return sum(data.problems[p][0] == name for p in present)

    tokens = f"{len(split.train)} training tokens, {len(split.test)} test tokens"
    if split.kind == "token":
        return f"{split.label}: a random {len(split.test)} of {len(data)} tokens held out; {tokens}"
    names = sorted(set(data.problems[p][0] for p in np.unique(data.problem)))
    parts = [f"{name} {problems(split.test, name)} of {problems(split.train, name) + problems(split.test, name)}"
             for name in names]
    return f"{split.label}: whole problems held out ({', '.join(parts)}); {tokens}"


def make_splits(data: RoutingData, kind: str, seed: int = 0, test_fraction: float = 0.25) -> list[Split]:
    """The train/test splits of one kind (module docstring), deterministic in ``seed``."""
    if kind not in SPLITS:
        raise PredictorError(f"unknown split {kind!r}; choose one of {SPLITS}")
    if not 0 < test_fraction < 1:
        raise PredictorError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    datasets = data.dataset
    present = np.unique(data.problem)  # problems with rows here (a taken subset keeps the full list)
    names = sorted(set(data.problems[p][0] for p in present))
    joined = "+".join(names)
    if kind == "token":
        perm = rng.permutation(len(data))
        n_test = int(round(test_fraction * len(data)))
        splits = [Split(kind, joined, joined, np.sort(perm[n_test:]), np.sort(perm[:n_test]))]
    elif kind == "problem":
        test_problems = []
        for name in names:
            ids = np.array([p for p in present if data.problems[p][0] == name])
            n_test = held_out_problems(len(ids), test_fraction)
            test_problems.append(rng.permutation(ids)[:n_test])
        is_test = np.isin(data.problem, np.concatenate(test_problems))
        splits = [Split(kind, joined, joined, np.flatnonzero(~is_test), np.flatnonzero(is_test))]
    else:
        if len(names) < 2:
            raise PredictorError(f"a dataset split needs two datasets or more; the traces hold {names}")
        splits = [Split(kind, "+".join(n for n in names if n != held), held,
                        np.flatnonzero(datasets != held), np.flatnonzero(datasets == held)) for held in names]
    for split in splits:
        check_no_leak(data, split)
    return splits


def journey_overlap(data: RoutingData, split: Split) -> float:
    """Share of the test tokens whose whole journey (token id + every layer's expert set) also occurs
    among the training tokens: how much a split lets a predictor score by memory."""
    return float(np.isin(journeys(data)[split.test], journeys(data)[split.train]).mean())


def subset_masks(data: RoutingData, subsets: Sequence[str]) -> dict[str, np.ndarray]:
    """Boolean masks over ``data``'s rows: ``all``, ``prompt``/``generated`` tokens, and ``unique``:
    the first occurrence of each journey (token id + the experts of every layer), so that a loop the
    model repeats counts once."""
    masks = {}
    for name in subsets:
        if name == "all":
            masks[name] = np.ones(len(data), bool)
        elif name == "prompt":
            masks[name] = ~data.generated
        elif name == "generated":
            masks[name] = data.generated.copy()
        elif name == "unique":
            _, first = np.unique(journeys(data), return_index=True)
            masks[name] = np.zeros(len(data), bool)
            masks[name][first] = True
        else:
            raise PredictorError(f"unknown subset {name!r}; choose from {SUBSETS}")
    return masks
