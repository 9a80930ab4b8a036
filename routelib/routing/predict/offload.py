"""What expert prediction buys in tokens per second: a simulator of MoE decoding with offloaded experts.

A model whose experts do not all fit in GPU memory keeps them in host memory and copies the ones a
layer needs over the host-to-device link (Mixtral-offloading, Eliseev & Mazur 2023; MoE-Infinity,
Xue et al. 2024; ProMoE, Song et al. 2024; HOBBIT, Tang et al. 2024). A cache of experts in GPU memory
(:mod:`routelib.routing.predict.cache`) saves some copies; a predictor of a later layer's experts lets a
copy start before that layer runs, hidden behind the compute of the layers in between. Whether that
pays depends on the machine: expert size, GPU memory left for the cache, link bandwidth, per-layer
compute time, and whether copies overlap compute. :func:`simulate` replays a trace's decoding order
token by token and layer by layer under a :class:`HardwareProfile` and reports the time per token
split into compute and stall, tokens per second and bytes moved.

The model of time (stated so it can be checked by hand, ``tests/test_routing_predict_offload.py``):

- one copy engine moves one expert at a time in ``expert_bytes / h2d_bytes_per_s`` seconds, in the
  order copies are issued;
- a layer starts when the previous layer has finished and all its k experts are in GPU memory; it
  computes for ``layer_compute_s``; the wait before it starts is a stall;
- at the start of layer v's compute, the predicted experts of the layer ``lead`` visits later that are
  not resident are copied into a staging buffer (at most ``max_inflight`` copies outstanding); when that
  layer is reached, a staged expert is used (after its arrival) and then cached or not as the cache's
  policy decides, exactly as a copied-on-demand one; a wrong guess costs its copy; a needed expert
  neither resident nor staged is copied on demand when its layer is reached;
- with ``overlap=False`` a copy cannot run while a layer computes (copies wait for the compute to end);
- a cache with as many slots as experts holds the whole model from the start (nothing is copied).

It models transfers and compute times; it is not a measurement of any system.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from routelib.errors import ConfigError
from routelib.routing.predict.cache import POLICIES, ExpertCache, next_use

MIXTRAL_EXPERT_PARAMS = 3 * 4096 * 14336  # one Mixtral-8x7B expert: w1, w3 (14336 x 4096) and w2 (4096 x 14336)


def expert_bytes(params: int = MIXTRAL_EXPERT_PARAMS, bits: int = 16) -> float:
    """Bytes of one expert's weights at ``bits`` per weight (quantisation scales left out)."""
    return params * bits / 8


@dataclass
class HardwareProfile:
    name: str  # a short name for tables
    expert_bytes: float  # bytes of one expert's weights as copied
    slots_per_layer: int  # experts of each MoE layer GPU memory holds (the cache)
    h2d_bytes_per_s: float  # host-to-device bandwidth that copies reach
    layer_compute_s: float  # one MoE layer's compute time for one decoded token (attention included)
    overlap: bool = True  # copies run while a layer computes
    max_inflight: int = 4  # prefetch copies outstanding at once
    sources: dict[str, str] = field(default_factory=dict)  # where each number comes from

    @property
    def copy_s(self) -> float:
        return self.expert_bytes / self.h2d_bytes_per_s


def _mixtral_profile(name: str, bits: int, gpu_expert_gib: float, h2d_gb_s: float, layer_ms: float,
                     sources: dict[str, str]) -> HardwareProfile:
    size = expert_bytes(bits=bits)
    slots = max(2, int(gpu_expert_gib * 2**30 // size) // 32)  # Mixtral-8x7B: 32 MoE layers
    return HardwareProfile(name, size, min(slots, 8), h2d_gb_s * 1e9, layer_ms / 1e3, sources=sources)


#: Machines for Mixtral-8x7B decoding at batch 1 (8 experts a layer, top-2, 32 layers). Assumptions,
#: each with its source; none of them measured here.
PROFILES = {
    "rtx4090-pcie4-4bit": _mixtral_profile("rtx4090-pcie4-4bit", 4, 16.0, 25.0, 0.25, {
        "expert_bytes": "3 x 4096 x 14336 weights at 4 bits (Mixtral-8x7B config)",
        "slots_per_layer": "24 GB card, ~16 GiB left for experts after the shared weights, KV cache and activations (assumed)",
        "h2d_bytes_per_s": "PCIe 4.0 x16: 31.5 GB/s peak, ~25 GB/s reached by pinned copies (assumed 80 %)",
        "layer_compute_s": "batch 1 is memory-bound: 2 experts at 4 bits + attention read at ~1 TB/s, ~0.25 ms (assumed)"}),
    "h100-pcie5-16bit": _mixtral_profile("h100-pcie5-16bit", 16, 60.0, 50.0, 0.3, {
        "expert_bytes": "3 x 4096 x 14336 weights at 16 bits (Mixtral-8x7B config)",
        "slots_per_layer": "80 GB card, ~60 GiB left for experts (assumed)",
        "h2d_bytes_per_s": "PCIe 5.0 x16: 63 GB/s peak, ~50 GB/s reached (assumed 80 %)",
        "layer_compute_s": "2 experts at 16 bits + attention read at ~3.3 TB/s (H100 SXM datasheet), ~0.3 ms (assumed)"}),
    "laptop-8gb-pcie4x8-4bit": _mixtral_profile("laptop-8gb-pcie4x8-4bit", 4, 5.0, 12.0, 0.6, {
        "expert_bytes": "3 x 4096 x 14336 weights at 4 bits (Mixtral-8x7B config)",
        "slots_per_layer": "8 GB laptop GPU, ~5 GiB left for experts (assumed; at least 2 a layer)",
        "h2d_bytes_per_s": "PCIe 4.0 x8: 15.8 GB/s peak, ~12 GB/s reached (assumed)",
        "layer_compute_s": "~256 GB/s memory bandwidth, ~0.6 ms a layer (assumed)"}),
}


@dataclass
class OffloadResult:
    tokens: int  # tokens decoded
    compute_s: float  # total compute time
    stall_s: float  # total time layers waited for their experts
    bytes_moved: float  # host-to-device bytes copied
    hit_rate: float  # share of needed experts already in GPU memory (or on their way) when their layer started
    profile: str  # the hardware profile's name

    @property
    def time_per_token_s(self) -> float:
        return (self.compute_s + self.stall_s) / self.tokens

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.time_per_token_s

    def row(self) -> dict:
        return {"profile": self.profile, "ms_per_token": 1e3 * self.time_per_token_s,
                "compute_ms": 1e3 * self.compute_s / self.tokens, "stall_ms": 1e3 * self.stall_s / self.tokens,
                "tokens_per_s": self.tokens_per_s, "gb_moved_per_token": self.bytes_moved / self.tokens / 1e9,
                "hit_rate": self.hit_rate}


def simulate(requests: np.ndarray, num_experts: int, profile: HardwareProfile, *, policy: str = "lru",
             predictions: np.ndarray | None = None, lead: int = 1) -> OffloadResult:
    """Decode the tokens of ``requests`` (T, L, k) expert ids, in order, on ``profile``. ``predictions``
    (T, L, m): experts predicted for each (token, layer), issued ``lead`` layer visits ahead (a visit is
    one layer of one token; lead 1 = during the previous layer). ``policy``: the cache's eviction policy
    (:data:`routelib.routing.predict.cache.POLICIES`)."""
    requests = np.asarray(requests)
    if requests.ndim != 3:
        raise ConfigError(f"requests: expected (tokens, layers, k), got shape {requests.shape}")
    if policy not in POLICIES or policy == "static":
        raise ConfigError(f"policy={policy!r}: choose from {', '.join(p for p in POLICIES if p != 'static')}")
    if lead < 1:
        raise ConfigError(f"lead={lead}: a prediction must come at least one layer ahead")
    T, L, k = requests.shape
    if profile.slots_per_layer < k:
        raise ConfigError(f"profile {profile.name}: {profile.slots_per_layer} slots a layer cannot hold the {k} experts a layer needs")
    if predictions is not None and np.asarray(predictions).shape[:2] != (T, L):
        raise ConfigError(f"predictions: expected (tokens, layers, m) matching requests, got {np.asarray(predictions).shape}")
    E, V = num_experts, T * L
    keys = (np.arange(L)[None, :, None] * E + requests).reshape(V, k)
    nxt = next_use(keys.ravel()).reshape(V, k)
    future: dict[int, int] = {}
    for pos, key in reversed(list(enumerate(keys.ravel().tolist()))):
        future[key] = pos
    caches = [ExpertCache(profile.slots_per_layer, policy, L, E, set()) for _ in range(L)]
    arrival: dict[int, float] = {}  # key -> time its copy completes (resident keys only)
    everything = profile.slots_per_layer >= E
    if everything:  # the whole model fits: resident from the start
        for layer, cache in enumerate(caches):
            cache.resident = set(range(layer * E, (layer + 1) * E))
        arrival = {key: 0.0 for cache in caches for key in cache.resident}
    now = engine = 0.0
    compute = stall = moved = 0.0
    hits = 0

    def copy(issued: float) -> float:
        """One expert over the link, queued behind the copies issued before it: its arrival time."""
        nonlocal engine, moved
        engine = max(issued, engine) + profile.copy_s
        moved += profile.expert_bytes
        return engine

    staged: dict[int, tuple[float, int]] = {}  # prefetched key -> (arrival, the visit it was predicted for)
    for v in range(V):
        layer = v % L
        cache = caches[layer]
        wanted = [int(x) for x in keys[v]]
        staged = {key: val for key, val in staged.items() if val[1] >= v}  # wrong guesses: dropped
        ready = now
        for j, key in enumerate(wanted):
            future[key] = int(nxt[v, j])
            if key in cache.resident:
                hits += 1
                arrived = arrival[key]
            else:
                if key in staged:  # prefetched: here or on its way, no copy now
                    hits += 1
                    arrived = staged.pop(key)[0]
                else:
                    arrived = copy(now)
                cache.load(key, v * k + j, layer, future, set(wanted))  # kept or not, as the policy says
                if key in cache.resident:
                    arrival[key] = arrived
            if key in cache.resident:
                cache.use(key, v * k + j)
            ready = max(ready, arrived)
        stall += ready - now
        start = ready
        if not profile.overlap:
            engine = max(engine, start + profile.layer_compute_s)  # no copy while the layer computes
        target = v + lead
        if predictions is not None and target < V and not everything:
            t_layer, t_cache = target % L, caches[target % L]
            inflight = sum(a > start for a, _ in staged.values())
            for e in sorted({int(x) for x in np.asarray(predictions)[target // L, t_layer]}):
                key = t_layer * E + e
                if key in t_cache.resident or key in staged or inflight >= profile.max_inflight:
                    continue
                staged[key] = (copy(start), target)
                inflight += 1
        compute += profile.layer_compute_s
        now = start + profile.layer_compute_s
    return OffloadResult(T, compute, stall, moved, hits / (V * k), profile.name)


# ------------------------------------------------------------------------------- on a trace folder
PREDICTIONS = ("none", "perfect", "prev_token")  # what the command line can prefetch without training


def decoding_requests(data, generated_only: bool = True) -> np.ndarray:
    """The generated tokens of every sequence of ``data`` (a :class:`RoutingData`), one sequence after
    another in position order: the request stream of a server decoding them one at a time (T, L, k)."""
    return np.asarray(data.experts[decoding_rows(data, generated_only)], np.int64)


def simple_predictions(requests: np.ndarray, kind: str) -> np.ndarray | None:
    """Predictions that need no training: ``perfect`` (the true experts: the bound of any predictor),
    ``prev_token`` (the previous token's experts at the same layer), ``none``."""
    if kind not in PREDICTIONS:
        raise ConfigError(f"predictor={kind!r}: choose from {', '.join(PREDICTIONS)}")
    if kind == "none":
        return None
    if kind == "perfect":
        return requests
    return np.concatenate([requests[:1], requests[:-1]])  # token 0 guesses its own (no previous token)


def decoding_rows(data, generated_only: bool = True) -> np.ndarray:
    """Row indices of ``data`` in the order :func:`decoding_requests` decodes them."""
    from routelib.routing.predict.dataset import sequences

    rows = [r[data.generated[r]] if generated_only else r for r in sequences(data)]
    rows = [r for r in rows if len(r)]
    if not rows:
        raise ConfigError("the traces hold no generated tokens to decode")
    return np.concatenate(rows)


def predictor_predictions(data, predictor, m: int, generated_only: bool = True,
                          hop: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(requests, predictions) in decoding order for a fitted predictor of ``hop`` (``predict_scores(data,
    l - hop, hop)``): layer l's top-m guesses come from what layer l - hop of the same token knew (issue
    them with ``lead=hop``); the first ``hop`` layers have no such source in the token and guess the
    previous token's experts at the same layer (it has passed that layer by then). Only what exists at
    decode time is used."""
    rows = decoding_rows(data, generated_only)
    requests = np.asarray(data.experts[rows], np.int64)  # (T, L, k)
    T, L, k = requests.shape
    if not 1 <= m <= data.num_experts:
        raise ConfigError(f"m={m}: need 1 <= m <= {data.num_experts}")
    if not 1 <= hop < L:
        raise ConfigError(f"hop={hop}: need 1 <= hop <= {L - 1} (the traces have {L} MoE layers)")
    out = np.zeros((T, L, m), np.int64)
    for layer in range(hop, L):
        scores = predictor.predict_scores(data, layer - hop, hop)[rows]  # (T, E)
        out[:, layer] = np.argsort(-scores, axis=1, kind="stable")[:, :m]
    prev = np.concatenate([requests[:1, :hop], requests[:-1, :hop]])  # (T, hop, k): the previous token's
    out[:, :hop] = np.pad(prev, ((0, 0), (0, 0), (0, max(0, m - k))), mode="edge")[..., :m]
    return requests, out


def simulate_table(requests: np.ndarray, num_experts: int, profiles=tuple(PROFILES), policies=("lru", "lfu", "belady"),
                   predictors=PREDICTIONS, lead: int = 1):
    """:func:`simulate` for every profile x policy x predictor: a DataFrame of :meth:`OffloadResult.row`."""
    import pandas as pd

    rows = []
    for name in profiles:
        if name not in PROFILES:
            raise ConfigError(f"profile {name!r}: choose from {', '.join(PROFILES)}")
        for policy in policies:
            for kind in predictors:
                result = simulate(requests, num_experts, PROFILES[name], policy=policy,
                                  predictions=simple_predictions(requests, kind), lead=lead)
                rows.append({"policy": policy, "predictor": kind, **result.row()})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    """``python -m routelib.routing.predict.offload <trace_dir> [--profile NAME,...] [--policy lru,...]
    [--predictor none,perfect,prev_token] [--lead N]``: tokens per second of decoding a trace folder's
    generated tokens with offloaded experts, per machine profile, cache policy and predictor (a model of
    transfers and compute, not a measurement)."""
    from routelib import cli
    from routelib.routing.predict.dataset import load_routing

    p = cli.ArgumentParser(prog="python -m routelib.routing.predict.offload", description=main.__doc__)
    p.add_argument("trace_dir", help="a trace folder (collected or imported)")
    p.add_argument("--profile", default=",".join(PROFILES), help=f"comma list of {', '.join(PROFILES)}")
    p.add_argument("--policy", default="lru,lfu,belady", help="comma list of cache policies (static excluded)")
    p.add_argument("--predictor", default=",".join(PREDICTIONS), help=f"comma list of {', '.join(PREDICTIONS)}")
    p.add_argument("--lead", type=int, default=1, help="layers ahead a prediction is issued")
    p.add_argument("--prompt", action="store_true", help="also decode the prompt tokens one at a time")
    args = p.parse_args(argv)
    data = load_routing(args.trace_dir)
    requests = decoding_requests(data, generated_only=not args.prompt)
    table = simulate_table(requests, data.num_experts, [s for s in args.profile.split(",") if s],
                           [s for s in args.policy.split(",") if s], [s for s in args.predictor.split(",") if s],
                           args.lead)
    print(f"{len(requests)} tokens, {requests.shape[1]} MoE layers, top-{requests.shape[2]} of {data.num_experts}; "
          "a model of transfers and compute, not a measurement")
    print(table.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    from routelib import cli

    raise SystemExit(cli.run(main))
