"""Training snapshots of a routing subject: small enough to ship beside the model.

A training run's checkpoints are hundreds of MB; the analysis of routing over training (OLMoE's
saturation curve, Muennighoff et al. 2024, "OLMoE: Open Mixture-of-Experts Language Models", §5;
router drift; domain specialisation; load balance) needs far less. A snapshot keeps, for one
training step, every MoE layer's router matrix and the top-k experts that the model of that step
picks for one fixed set of held-out tokens -- a few hundred KB per step.

:func:`collect_snapshots` takes (step, model) pairs of any transformers MoE model (routers are found
and tokens routed with the collection hooks, as everywhere in routelib), so a user can make the
same file from the intermediate checkpoints of their own model; :func:`save_snapshots` and
:func:`load_snapshots` write and validate the ``.npz`` file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from routelib.errors import RoutelibError

FORMAT = "routelib-training-snapshots"
FORMAT_VERSION = 1


class SnapshotError(RoutelibError, ValueError):
    """A snapshot file or a set of snapshots that cannot be used (names the file and the problem)."""


@dataclass
class Snapshots:
    steps: np.ndarray  # (S,) int64 training steps, strictly ascending (0: the initialisation)
    routers: np.ndarray  # (S, L, E, H) float32 router matrices of every MoE layer at each step
    experts: np.ndarray  # (S, N, L, k) int8/int16 top-k experts of the held-out tokens, highest weight first
    domains: np.ndarray  # (N,) str corpus domain of each held-out token
    token_ids: np.ndarray  # (N,) int32 the held-out tokens themselves (what was routed)

    def __post_init__(self):
        s = len(self.steps)
        problems = []
        if s == 0:
            problems.append("no steps")
        elif np.any(np.diff(self.steps) <= 0):
            problems.append(f"steps not strictly ascending: {self.steps.tolist()}")
        if self.routers.ndim != 4 or self.routers.shape[0] != s:
            problems.append(f"routers of shape {self.routers.shape}, expected ({s}, L, E, H)")
        if self.experts.ndim != 4 or self.experts.shape[0] != s:
            problems.append(f"experts of shape {self.experts.shape}, expected ({s}, N, L, k)")
        elif self.routers.ndim == 4:
            _, n, num_layers, k = self.experts.shape
            _, r_layers, num_experts, _ = self.routers.shape
            if num_layers != r_layers:
                problems.append(f"experts name {num_layers} layers, routers {r_layers}")
            if k > num_experts:
                problems.append(f"top-{k} of {num_experts} experts")
            if self.experts.size and (self.experts.min() < 0 or self.experts.max() >= num_experts):
                problems.append(f"expert ids outside 0..{num_experts - 1}")
            if len(self.domains) != n or len(self.token_ids) != n:
                problems.append(f"{len(self.domains)} domains and {len(self.token_ids)} token ids for {n} tokens")
        if problems:
            raise SnapshotError("invalid snapshots: " + "; ".join(problems))

    @property
    def num_experts(self) -> int:
        return int(self.routers.shape[2])

    def experts_by_step(self) -> dict[int, np.ndarray]:
        """{step: (N, L, k) experts} -- the input of ``geometry.saturation``."""
        return {int(s): self.experts[i] for i, s in enumerate(self.steps)}

    def routers_by_step(self) -> dict[int, torch.Tensor]:
        """{step: (L, E, H) routers} -- the input of ``geometry.router_drift``."""
        return {int(s): torch.from_numpy(self.routers[i]) for i, s in enumerate(self.steps)}


def snapshot(model, batches_by_domain: Mapping[str, Sequence]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One model's routers (L, E, H) and the top-k experts (N, L, k) of the held-out tokens, with the
    tokens' domains (N,) and ids (N,), in the order of ``batches_by_domain`` ((x, y) batches)."""
    from routelib.routing.analyse.geometry import route_batches
    from routelib.routing.analyse.weights import moe_weights

    experts, domains, tokens = [], [], []
    for domain, batches in batches_by_domain.items():
        ex, _ = route_batches(model, batches)  # (n, L, k)
        experts.append(ex)
        domains += [domain] * len(ex)
        tokens += [(b[0] if isinstance(b, (tuple, list)) else b).reshape(-1) for b in batches]
    routers = moe_weights(model).routers().detach().float().numpy()  # (L, E, H)
    return routers, np.concatenate(experts), np.asarray(domains), torch.cat(tokens).numpy().astype(np.int32)


def collect_snapshots(models: Iterable[tuple[int, object]], batches_by_domain: Mapping[str, Sequence],
                      progress: bool = True) -> Snapshots:
    """Snapshots of (step, model) pairs -- models may be built lazily by the iterable, so only one is
    in memory at a time. Every model routes the same held-out batches."""
    from tqdm.auto import tqdm

    steps, routers, experts, domains, tokens = [], [], [], None, None
    for step, model in tqdm(models, desc="snapshots", unit="step", disable=not progress):
        r, ex, d, t = snapshot(model, batches_by_domain)
        if tokens is not None and not np.array_equal(t, tokens):
            raise SnapshotError(f"step {step}: routed other tokens than the earlier steps")
        steps.append(step)
        routers.append(r)
        experts.append(ex)
        domains, tokens = d, t
    dtype = np.int8 if routers and routers[0].shape[1] <= 127 else np.int16
    return Snapshots(np.asarray(steps, np.int64), np.stack(routers), np.stack(experts).astype(dtype), domains, tokens)


def save_snapshots(snaps: Snapshots, path: str | Path) -> Path:
    """Write ``snaps`` as one compressed ``.npz`` file (with its format name and version)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, format=np.asarray(FORMAT), format_version=np.asarray(FORMAT_VERSION),
                        steps=snaps.steps, routers=snaps.routers, experts=snaps.experts,
                        domains=snaps.domains.astype(str), token_ids=snaps.token_ids)
    return path


def load_snapshots(path: str | Path) -> Snapshots:
    """Read and validate a snapshot file written by :func:`save_snapshots`."""
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"{path}: no such snapshot file (made by the subject's training run: "
                            "python -m routelib.studies.moe_vs_dense subject ...)")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise SnapshotError(f"{path}: not a readable .npz file ({e})") from None
    if str(data.get("format", "")) != FORMAT:
        raise SnapshotError(f"{path}: not a {FORMAT} file (format {data.get('format')!r})")
    if int(data.get("format_version", -1)) != FORMAT_VERSION:
        raise SnapshotError(f"{path}: format version {data.get('format_version')}, this routelib reads {FORMAT_VERSION}")
    missing = [k for k in ("steps", "routers", "experts", "domains", "token_ids") if k not in data]
    if missing:
        raise SnapshotError(f"{path}: missing arrays {missing}")
    try:
        return Snapshots(data["steps"], data["routers"], data["experts"], data["domains"], data["token_ids"])
    except SnapshotError as e:
        raise SnapshotError(f"{path}: {e}") from None
