"""Benchmark: routing traces at a real model's scale -- load them and train the predictors on them.

    python -m routelib.routing.predict.bench_scale --tokens 10000000 --out runs/bench_traces   # OLMoE layout
    python -m routelib.routing.predict.bench_scale --tokens 20000 --out /tmp/b                  # a smoke run

Three steps, each in a fresh process so that its peak memory is its own (the JSON lines they print
are gathered into ``<out>/results.json``):

1. ``make``: synthetic traces of OLMoE-1B-7B's layout (16 MoE layers, top-8 of 64 experts) in the
   trace format, problems of ``--problem_len`` tokens (the first fifth "prompt"), two datasets.
   The routing has structure for the predictors to find: each token carries a latent state of
   ``--states`` values that moves along the layers by a fixed permutation per layer (with probability
   ``--switch`` to a random state); each (layer, state) has its own top-8 set and each slot is
   replaced by a random expert with probability ``--noise``; gate weights are a sorted Dirichlet(1).
2. ``load``: :func:`routelib.routing.record.columns.open_columns` -- validation of every shard (sha256 too)
   and the memory-mapped cache built (first open), then opened again from the cache.
3. ``train``: the last ``--test_problems`` problems (a contiguous tail of rows) are held out whole; the
   prior, lookup, n-gram (n = 3) and MLP predictors (defaults of ``EvalConfig``; the MLP streams
   batches of 512 rows) are fitted on the rest through views of the memory-mapped arrays and scored
   on the held-out tokens (hop 1, all source layers). The n-gram stores only keys seen at least
   ``--ngram_min_count`` (default 2) times: its level-3 keys (three layers' top-8 sets) are mostly
   seen once at this scale, and a dense (keys x E) float64 table of all of them would not fit.

Memory is reported two ways, because memory-mapped pages are not the process's own: ``peak_rss``
(VmHWM: every resident page, including file pages of the mapped columns that the kernel may drop
at any time) and ``peak_anon`` (the highest anonymous resident memory sampled every 20 ms: what the
process allocated itself). Times are wall-clock seconds on this machine with one torch thread.
Not a test: a benchmark, run by hand; its figures go into README.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

#: OLMoE-1B-7B's routing layout (allenai/OLMoE-1B-7B-0924 config: 16 layers, 64 experts, top-8).
OLMOE = {"num_layers": 16, "num_experts": 64, "top_k": 8}


@dataclass
class SyntheticConfig:
    tokens: int = 10_000_000  # tokens in all (rounded down to whole problems)
    problem_len: int = 1000  # tokens per problem (the first fifth are prompt tokens)
    problems_per_shard: int = 100  # problems per Parquet shard
    states: int = 64  # latent routing states per layer
    switch: float = 0.1  # probability that a token's state jumps to a random one between layers
    noise: float = 0.01  # probability that a slot's expert is replaced by a random one
    num_layers: int = OLMOE["num_layers"]  # MoE layers
    num_experts: int = OLMOE["num_experts"]  # experts per layer
    top_k: int = OLMOE["top_k"]  # experts per token
    vocab: int = 50_000  # token ids are uniform in [0, vocab)
    seed: int = 0  # everything random


def synthetic_routing(cfg: SyntheticConfig, rng: np.random.Generator, n: int, tables) -> tuple[np.ndarray, np.ndarray]:
    """experts (n, L, k) int16 and weights (n, L, k) float32 of ``n`` tokens (module docstring)."""
    sets, perms = tables  # (L, S, k) expert sets per state; (L, S) state permutations
    L, k, E = cfg.num_layers, cfg.top_k, cfg.num_experts
    experts = np.empty((n, L, k), np.int16)
    state = rng.integers(0, cfg.states, n)  # (n,)
    for layer in range(L):
        if layer:
            jump = rng.random(n) < cfg.switch
            state = np.where(jump, rng.integers(0, cfg.states, n), perms[layer][state])
        experts[:, layer] = sets[layer][state]  # (n, k)
    noisy = rng.random((n, L, k)) < cfg.noise
    candidate = rng.integers(0, E, (n, L, k)).astype(np.int16)
    for slot in range(k):  # one slot at a time, so that two replacements cannot bring the same id
        clash = (candidate[..., slot, None] == experts).any(-1)  # (n, L): the id is in the set already
        experts[..., slot] = np.where(noisy[..., slot] & ~clash, candidate[..., slot], experts[..., slot])
    gamma = rng.standard_gamma(1.0, (n, L, k)).astype(np.float32)
    weights = -np.sort(-gamma / gamma.sum(-1, keepdims=True), axis=-1)  # (n, L, k) descending
    return experts, weights


def make_traces(out: Path, cfg: SyntheticConfig) -> dict:
    """Write the synthetic trace folder ``out``; returns its manifest."""
    from routelib.routing.record import traces as T

    rng = np.random.default_rng(cfg.seed)
    L, S, E, k = cfg.num_layers, cfg.states, cfg.num_experts, cfg.top_k
    tables = (np.argsort(rng.random((L, S, E)), axis=2)[..., :k].astype(np.int16),  # (L, S, k)
              np.stack([rng.permutation(S) for _ in range(L)]))  # (L, S)
    num_problems = cfg.tokens // cfg.problem_len
    datasets = {"synthetic_a": num_problems - num_problems // 2, "synthetic_b": num_problems // 2}
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    prompt = cfg.problem_len // 5
    for name, count in datasets.items():
        for first in range(0, count, cfg.problems_per_shard):
            m = min(cfg.problems_per_shard, count - first)
            n = m * cfg.problem_len
            experts, weights = synthetic_routing(cfg, rng, n, tables)
            token_id = rng.integers(0, cfg.vocab, n).astype(np.int32)
            columns = {"dataset": [name] * n,
                       "problem_id": [f"{name}/{first + i}" for i in range(m) for _ in range(cfg.problem_len)],
                       "problem_index": np.repeat(np.arange(first, first + m), cfg.problem_len).astype(np.int32),
                       "position": np.tile(np.arange(cfg.problem_len), m).astype(np.int32),
                       "phase": np.tile(np.where(np.arange(cfg.problem_len) < prompt, "prompt", "generated"), m),
                       "token_id": token_id, "token_text": [""] * n}
            table = T.shard_table(columns, experts, weights, None, E)
            fname = T.shard_name(name, first)
            shards.append({"file": fname, "dataset": name, "problem_indices": [first, first + m - 1],
                           **T.shard_counts(table), **T.write_shard(out / fname, table)})
    manifest = {"format": T.FORMAT, "format_version": T.FORMAT_VERSION,
                "model": {"name_or_path": None, "synthetic": asdict(cfg)}, "tokenizer": {"vocab_size": cfg.vocab},
                "layout": {"num_moe_layers": L, "moe_layers": list(range(L)), "top_k": k, "num_experts": E,
                           "full_distribution": False, "router_scores": "softmax"},
                "datasets": {name: {"num_problems": count} for name, count in datasets.items()}, "shards": shards,
                "source": {"kind": "synthetic", "command": "python -m routelib.routing.predict.bench_scale"}}
    T.summarise_manifest(manifest)
    T.write_trace_manifest(out, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------
# measuring


class MemoryMonitor:
    """Samples the process's anonymous resident memory (RssAnon) every ``interval`` seconds."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_anon, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def status(field: str) -> int:
        """A /proc/self/status field in bytes (Linux)."""
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, self.status("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, self.status("RssAnon"))
        return False

    def report(self) -> dict:
        return {"peak_rss_gb": round(self.status("VmHWM") / 1e9, 3), "peak_anon_gb": round(self.peak_anon / 1e9, 3)}


def step_load(trace_dir: Path, cache_dir: Path) -> dict:
    """Open the traces (validating and building the cache), then again (cached, shards re-checked):
    times and peak memory; then one pass over layer 0's top-1 expert of every token (an analysis
    reading the mapped column: its pages become resident as file pages)."""
    from routelib.routing.record.columns import open_columns

    with MemoryMonitor() as mem:
        t0 = time.perf_counter()
        cols = open_columns(trace_dir, cache_dir=cache_dir)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        cols = open_columns(trace_dir, cache_dir=cache_dir)
        cached = time.perf_counter() - t0
        opened = mem.report()
        t0 = time.perf_counter()
        usage = np.bincount(cols.experts[:, 0, 0].astype(np.int64), minlength=cols.manifest["layout"]["num_experts"])
        scan = time.perf_counter() - t0
    arrays_gb = (cols.experts.nbytes + cols.weights.nbytes) / 1e9
    return {"step": "load", "tokens": len(cols), "arrays_gb": round(arrays_gb, 3), "first_open_s": round(first, 1),
            "cached_open_s": round(cached, 2), **opened, "scan_top1_layer0_s": round(scan, 2),
            "usage_max": int(usage.max()), "after_scan": mem.report()}


def step_train(trace_dir: Path, cache_dir: Path, test_problems: int, mlp_steps: int, ngram_min_count: int) -> dict:
    """Fit prior, lookup, n-gram and MLP on all but the last ``test_problems`` problems; score the rest."""
    import torch

    from routelib.routing import predict as P
    from routelib.routing.record.columns import open_columns
    from routelib.routing.predict.dataset import RoutingData

    torch.set_num_threads(1)
    data = RoutingData.from_columns(open_columns(trace_dir, cache_dir=cache_dir))
    cut = int(np.searchsorted(data.problem, len(data.problems) - test_problems))  # problems are in row order here
    if not 0 < cut < len(data):
        raise SystemExit(f"cannot hold out {test_problems} problems of {len(data.problems)}")
    train, test = data.take(slice(0, cut)), data.take(slice(cut, len(data)))
    pairs = P.layer_pairs(data.num_layers, [1])
    cfg = P.EvalConfig(mlp_steps=mlp_steps)
    rows = {"step": "train", "train_tokens": len(train), "test_tokens": len(test), "mlp_steps": mlp_steps,
            "ngram_min_count": ngram_min_count}
    with MemoryMonitor() as mem:
        for name in ("prior", "lookup", "ngram", "mlp"):
            t0 = time.perf_counter()
            own = dataclasses.replace(cfg, ngram_min_count=ngram_min_count) if name == "ngram" else cfg
            predictor = P.make_predictor(name, own).fit(train, pairs)
            fit_s = time.perf_counter() - t0
            top1 = np.mean([P.routing_metrics(predictor.predict_scores(test, layer, hop),
                                              np.asarray(test.experts[:, layer + hop]))["top1"]
                            for layer, hop in pairs])
            rows[f"{name}_fit_s"] = round(fit_s, 1)
            rows[f"{name}_top1"] = round(float(top1), 4)
            if name in ("lookup", "ngram"):
                tables = [t for level in predictor.tables.values() for t in level]
                rows[f"{name}_table_keys"] = int(sum(len(t.keys) for t in tables))
                rows[f"{name}_table_gb"] = round(sum(t.sums.nbytes + t.keys.nbytes for t in tables) / 1e9, 3)
            del predictor
    return {**rows, **mem.report()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m routelib.routing.predict.bench_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="work folder: traces/, cache/, results.json")
    p.add_argument("--step", default="all", choices=["all", "make", "load", "train"])
    p.add_argument("--test_problems", type=int, default=100, help="problems held out (the last ones)")
    p.add_argument("--mlp_steps", type=int, default=1000, help="MLP optimizer steps (EvalConfig's default: 1000)")
    p.add_argument("--ngram_min_count", type=int, default=2,
                   help="n-gram keys seen fewer times are not stored (EvalConfig's default 1 keeps every key)")
    for f in SyntheticConfig.__dataclass_fields__.values():
        p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    out = Path(args.out)
    traces, cache = out / "traces", out / "cache"
    cfg = SyntheticConfig(**{f: getattr(args, f) for f in SyntheticConfig.__dataclass_fields__})
    if args.step == "make":
        with MemoryMonitor() as mem:
            t0 = time.perf_counter()
            manifest = make_traces(traces, cfg)
        result = {"step": "make", "tokens": manifest["totals"]["rows"],
                  "parquet_gb": round(manifest["totals"]["bytes"] / 1e9, 3),
                  "seconds": round(time.perf_counter() - t0, 1), **mem.report()}
    elif args.step == "load":
        result = step_load(traces, cache)
    elif args.step == "train":
        result = step_train(traces, cache, args.test_problems, args.mlp_steps, args.ngram_min_count)
    else:
        results = []
        for step in ("make", "load", "train"):
            if step == "make" and (traces / "manifest.json").is_file() and \
                    json.loads((traces / "manifest.json").read_text())["model"].get("synthetic") == asdict(cfg):
                continue  # the same synthetic traces are there already
            line = subprocess.run([sys.executable, "-m", "routelib.routing.predict.bench_scale", *(argv or sys.argv[1:]),
                                   "--step", step], check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
            line = line.splitlines()[-1]
            results.append(json.loads(line))
            print(line, flush=True)
        from routelib.reference import environment, git_commit

        argv_used = list(argv or sys.argv[1:])
        (out / "results.json").write_text(json.dumps({
            "command": "python -m routelib.routing.predict.bench_scale " + " ".join(argv_used), "config": asdict(cfg),
            "argv": argv_used, "environment": {**environment(), "torch_threads": 1}, **git_commit(),
            "results": results}, indent=1))
        return 0
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
