"""Expert caches: which experts a fast memory (a GPU's) holds while a MoE model decodes, and how often
a needed expert is already there.

A *request stream* is what decoding asks of the cache: tokens in decoding order, and for each token the
MoE layers in order, each layer needing its top-k experts (``requests``: (T, L, k) expert ids). A cache
holds ``slots`` experts, either **per layer** (each layer its own ``slots``; the usual design of
offloading systems that keep a few experts of every layer) or **global** (one pool of ``slots`` shared by
every layer's experts). A request finds its expert resident (a hit) or not (a miss: the expert is
loaded, evicting another). Eviction policies (:data:`POLICIES`):

=================  ===================================================================================
``lru``            evict the expert used longest ago
``lfu``            evict the expert used least often so far (ties: longest ago)
``least_stale``    evict the expert whose layer comes round again last: in decoding order every layer
                   is visited once per token, so an expert of the layer just computed is not needed
                   before the next token, while one of the next layer is needed now (ties: longest
                   ago). Per layer it is LRU; in a global cache it keeps the layers about to run. Our
                   reading of the Least-Stale policy of SpecMD (Hoang et al. 2026, arXiv 2602.03921),
                   which reports LRU's collision misses on a global cache
``static``         keep a fixed set: the ``slots`` experts most used in ``frequency`` (e.g. counted on
                   training traces), each loaded on its first request; a miss of another expert is
                   served from slow memory and not cached
``belady``         evict the expert needed furthest in the future (never again: first), or, if the
                   incoming expert is needed later still, serve it without caching it. Belady's optimal
                   offline policy (Belady 1966), with bypass: no policy with the same slots has more
                   hits, so it bounds every other from above
=================  ===================================================================================

A *prefetch* loads a predictor's guesses for a layer before that layer runs (``prefetch``: (T, L, m)
expert ids, the top-m ranked for each token and layer, m <= slots); prefetched experts are loaded
through the same eviction policy and are not evicted by later prefetches or requests of the same
layer visit. :func:`simulate_cache` replays a stream and counts hits; :func:`hit_rate_curve` sweeps
the slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from routelib.errors import ConfigError

POLICIES = ("lru", "lfu", "least_stale", "static", "belady")
SCOPES = ("layer", "global")
NEVER = np.iinfo(np.int64).max  # "not needed again"


@dataclass
class CacheResult:
    hits: np.ndarray  # (T, L, k) bool: the requested expert was resident when its layer ran
    loads: np.ndarray  # (T, L) int: experts copied from slow memory at this layer visit (prefetches + misses)
    policy: str  # the eviction policy
    scope: str  # "layer" or "global"
    slots: int  # experts the cache holds (per layer, or in all)

    @property
    def hit_rate(self) -> float:
        return float(self.hits.mean()) if self.hits.size else float("nan")


def _check(requests: np.ndarray, num_experts: int, slots: int, policy: str, scope: str,
           prefetch: np.ndarray | None) -> np.ndarray:
    requests = np.asarray(requests)
    if requests.ndim != 3:
        raise ConfigError(f"requests: expected (tokens, layers, k) expert ids, got shape {requests.shape}")
    if policy not in POLICIES:
        raise ConfigError(f"policy={policy!r}: choose from {', '.join(POLICIES)}")
    if scope not in SCOPES:
        raise ConfigError(f"scope={scope!r}: choose 'layer' or 'global'")
    k = requests.shape[2]
    if slots < 1:
        raise ConfigError(f"slots={slots}: need at least 1")
    if slots < k:
        raise ConfigError(f"slots={slots} cannot hold the {k} experts a token needs at one layer")
    if requests.size and (requests.min() < 0 or requests.max() >= num_experts):
        raise ConfigError(f"requests hold expert ids outside [0, {num_experts})")
    if prefetch is not None:
        prefetch = np.asarray(prefetch)
        if prefetch.shape[:2] != requests.shape[:2] or prefetch.ndim != 3:
            raise ConfigError(f"prefetch: expected (tokens, layers, m) matching requests, got {prefetch.shape}")
        if prefetch.shape[2] > slots:
            raise ConfigError(f"prefetch of {prefetch.shape[2]} experts does not fit {slots} slots")
    return requests


def next_use(keys: np.ndarray) -> np.ndarray:
    """For a stream of keys (n,), the index of each key's next occurrence after position i (NEVER if none)."""
    out = np.full(len(keys), NEVER, np.int64)
    last: dict[int, int] = {}
    for i in range(len(keys) - 1, -1, -1):
        out[i] = last.get(int(keys[i]), NEVER)
        last[int(keys[i])] = i
    return out


class ExpertCache:
    """One cache (a layer's, or the global one) under ``policy``; keys are ints (global: layer * E + expert)."""

    def __init__(self, slots: int, policy: str, num_layers: int, num_experts: int, pinned: set[int]):
        self.slots, self.policy, self.L, self.E = slots, policy, num_layers, num_experts
        self.pinned = pinned  # static: the fixed set, each loaded on its first request
        self.resident: set[int] = set()
        self.last: dict[int, int] = {}  # key -> time of last use or load
        self.count: dict[int, int] = {}  # key -> uses so far (lfu)

    def use(self, key: int, now: int) -> None:
        self.last[key] = now
        self.count[key] = self.count.get(key, 0) + 1

    def _victim(self, now: int, layer: int, future: dict[int, int], protect: set[int]) -> int | None:
        candidates = [key for key in self.resident if key not in protect]
        if not candidates:
            return None
        if self.policy == "lru":
            return min(candidates, key=lambda key: self.last.get(key, -1))
        if self.policy == "lfu":
            return min(candidates, key=lambda key: (self.count.get(key, 0), self.last.get(key, -1)))
        if self.policy == "least_stale":  # layers till the key's layer runs again (the current one: L)
            return max(candidates, key=lambda key: ((key // self.E - layer - 1) % self.L, -self.last.get(key, -1)))
        return max(candidates, key=lambda key: (future.get(key, NEVER), -self.last.get(key, -1)))  # belady

    def load(self, key: int, now: int, layer: int, future: dict[int, int], protect: set[int]) -> bool:
        """Make ``key`` resident (evicting if full); False when it is served without caching it: always
        under ``static`` (a fixed set), and under ``belady`` when it is needed later than every resident
        expert (keeping them is better: Belady's policy with bypass is the optimum when a miss may bypass)."""
        if self.policy == "static":
            if key not in self.pinned:
                return False
            self.resident.add(key)
            return True
        if len(self.resident) >= self.slots:
            victim = self._victim(now, layer, future, protect)
            if victim is None:  # every resident expert is needed now: no room (a prefetch is skipped)
                return False
            if self.policy == "belady" and future.get(key, NEVER) >= future.get(victim, NEVER):
                return False
            self.resident.discard(victim)
        self.resident.add(key)
        self.last[key] = now
        return True


def simulate_cache(requests: np.ndarray, num_experts: int, slots: int, policy: str = "lru", *,
                   scope: str = "layer", prefetch: np.ndarray | None = None,
                   frequency: np.ndarray | None = None) -> CacheResult:
    """Replay ``requests`` (T, L, k) through a cache of ``slots`` experts (``scope``: per layer or global)
    under ``policy``; ``prefetch`` (T, L, m): experts loaded before each layer visit runs; ``frequency``
    (L, E): the static policy's usage counts (default: counted on ``requests`` themselves, an oracle
    static set). Returns hits per request and loads per layer visit."""
    requests = _check(requests, num_experts, slots, policy, scope, prefetch)
    T, L, k = requests.shape
    E = num_experts
    keys = (np.arange(L)[None, :, None] * E + requests).reshape(T * L, k)  # (T*L, k) global keys
    stream = keys.ravel()
    nxt = next_use(stream).reshape(T * L, k)  # position in the flattened request stream
    if frequency is None:
        frequency = np.stack([np.bincount(requests[:, layer].ravel(), minlength=E) for layer in range(L)])
    frequency = np.asarray(frequency, float)
    if policy == "static":
        if scope == "layer":
            pinned = [set(layer * E + np.argsort(-frequency[layer], kind="stable")[:slots]) for layer in range(L)]
        else:
            order = np.argsort(-frequency.ravel(), kind="stable")[:slots]
            pinned = [set(int(x) for x in order)]
    else:
        pinned = [set()] * (L if scope == "layer" else 1)
    caches = [ExpertCache(slots, policy, L, E, pinned[i]) for i in range(L if scope == "layer" else 1)]
    future: dict[int, int] = {}  # key -> next request position (belady), kept current as the stream runs
    for pos in range(len(stream) - 1, -1, -1):  # each key's first request
        future[int(stream[pos])] = pos
    hits = np.zeros((T * L, k), bool)
    loads = np.zeros(T * L, np.int64)
    for visit in range(T * L):
        layer = visit % L
        cache = caches[layer if scope == "layer" else 0]
        wanted = [int(x) for x in keys[visit]]
        protect = set(wanted)  # a layer's experts stay while it runs
        if prefetch is not None:
            guesses = [int(layer * E + e) for e in prefetch.reshape(T * L, -1)[visit]]
            for key in guesses:  # a guess does not evict this visit's other guesses (a miss may evict a wrong one)
                if key not in cache.resident:
                    loads[visit] += cache.load(key, visit * k, layer, future, protect | set(guesses))
        for j, key in enumerate(wanted):
            now = visit * k + (k - 1 - j)  # within a token, slot 0 (the highest gate) counts as the most recent
            hits[visit, j] = key in cache.resident
            future[key] = int(nxt[visit, j])
            cache.use(key, now)
            if not hits[visit, j]:  # copied from slow memory, cached or not
                loads[visit] += 1
                cache.load(key, now, layer, future, protect)
    return CacheResult(hits.reshape(T, L, k), loads.reshape(T, L), policy, scope, slots)


def hit_rate_curve(requests: np.ndarray, num_experts: int, policies=POLICIES, *, scope: str = "layer",
                   slots: list[int] | None = None, prefetch: np.ndarray | None = None,
                   frequency: np.ndarray | None = None) -> pd.DataFrame:
    """Hit rate against cache size for each policy: columns policy, slots, hit_rate (per layer: slots
    k..E by default; global: k..L*E in about 12 steps)."""
    requests = np.asarray(requests)
    T, L, k = requests.shape
    if slots is None:
        slots = (list(range(k, num_experts + 1)) if scope == "layer"
                 else sorted({int(round(x)) for x in np.linspace(k, L * num_experts, 12)}))
    rows = []
    for policy in policies:
        for c in slots:
            m = None if prefetch is None else prefetch[:, :, :c]
            result = simulate_cache(requests, num_experts, c, policy, scope=scope, prefetch=m, frequency=frequency)
            rows.append({"policy": policy, "slots": c, "hit_rate": result.hit_rate})
    return pd.DataFrame(rows)
