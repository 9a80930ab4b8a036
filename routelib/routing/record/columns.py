"""Large traces as memory-mapped numpy columns: Arrow -> numpy, no pandas, no list columns.

:func:`~routelib.routing.record.traces.load_traces` builds a pandas DataFrame whose ``experts`` and
``weights`` cells are one small array per token; :func:`~routelib.routing.record.traces.trace_arrays` then
concatenates them. For a real model's traces that costs several times the arrays themselves (1 M
tokens of an OLMoE-layout trace, 16 layers x top-8 of 64: 3.3 GB peak for 0.77 GB of arrays), and
10 M tokens (7.7 GB of experts + weights) do not fit a 24 GB machine that way.

:func:`open_columns` reads each shard once with pyarrow, validates it exactly as ``load_traces``
does (files against the manifest's byte counts and sha256, schema and layout, expert ids in range,
finite weights, every problem's positions 0..n-1 in row order, prompt before generated -- across
shards too), and appends its columns, straight from Arrow's buffers, to uncompressed ``.npy`` files
in a cache folder with ordinary writes, shard by shard, so memory holds one shard at a time. It
returns the ``.npy``
files memory-mapped read-only (:class:`TraceColumns`): opening takes milliseconds, pages are read
from disk when touched and belong to the page cache (the kernel drops them under memory pressure),
and the arrays are ordinary numpy arrays for every analysis. The cache is keyed by the shards'
sha256 and the layout (``<cache>/trace-columns/<key>/``), built once (atomically: a folder renamed
into place) and re-used while the shards are unchanged; a later ``open_columns`` re-checks the
shard files against the manifest (``validate=True``) and opens the cache (a cache built with
``validate=False`` is rebuilt, with the checks, the first time a validated open asks for it).

Columns (N tokens, rows in the shards' order):

=============  ==================  ===========================================================
column         shape, dtype        meaning
=============  ==================  ===========================================================
experts        (N, L, k) int16     top-k expert ids per MoE layer, highest weight first
weights        (N, L, k) float32   their gate weights
token_id       (N,) int32          the token
problem        (N,) int32          index into ``problems``: (dataset, problem_id), first-seen order
position       (N,) int32          position in the problem's sequence
generated      (N,) bool           phase "generated" (else "prompt")
=============  ==================  ===========================================================

The optional full distribution (``probs``) is not mapped here; ``load_traces`` still reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from routelib import paths
from routelib.io import atomic_write
from routelib.routing.record import traces as T

#: Array columns and their dtypes (file ``<name>.npy`` in the cache folder).
COLUMNS = {"experts": np.int16, "weights": np.float32, "token_id": np.int32, "problem": np.int32,
           "position": np.int32, "generated": np.bool_}
CACHE_VERSION = 1  # bump when the cache layout changes: old caches are then rebuilt


@dataclass
class TraceColumns:
    """A trace folder's columns as read-only memory-mapped arrays (module docstring)."""

    experts: np.ndarray  # (N, L, k) int16
    weights: np.ndarray  # (N, L, k) float32
    token_id: np.ndarray  # (N,) int32
    problem: np.ndarray  # (N,) int32: index into ``problems``
    position: np.ndarray  # (N,) int32
    generated: np.ndarray  # (N,) bool
    problems: list  # (dataset, problem_id) per problem index
    manifest: dict = field(repr=False)  # the trace manifest
    cache_dir: Path | None = None  # the folder holding the .npy files

    def __len__(self) -> int:
        return self.experts.shape[0]


def _cache_key(manifest: dict, shards: list[dict]) -> str:
    layout = {k: manifest["layout"].get(k) for k in ("num_moe_layers", "top_k", "num_experts")}
    return T.sha256_json({"version": CACHE_VERSION, "layout": layout,
                          "shards": [(s.get("file"), s.get("sha256")) for s in shards]})[:24]


def _shard_rows(path: Path, entry: dict) -> int:
    import pyarrow.parquet as pq

    return int(entry["rows"]) if entry.get("rows") is not None else pq.ParquetFile(path).metadata.num_rows


def _fixed_list_numpy(column, width: int, dtype) -> np.ndarray:
    """A fixed-size-list column as an (n, width) array, straight from Arrow's value buffer."""
    arr = column.combine_chunks()
    values = arr.values if arr.offset == 0 and len(arr.values) == len(arr) * width else arr.flatten()
    return values.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(arr), width)


class _OrderCheck:
    """Checks, shard after shard, that every problem's rows carry positions 0..n-1 in row order
    (so no token twice) and that no prompt token follows a generated one -- ``load_traces``' rule."""

    def __init__(self, source: str):
        self.source = source
        self.next_position: dict[int, int] = {}  # problem -> the position its next row must have
        self.last_generated: dict[int, bool] = {}  # problem -> phase of its last row so far

    def update(self, problem: np.ndarray, position: np.ndarray, generated: np.ndarray, problems: list) -> None:
        order = np.argsort(problem, kind="stable")  # rows grouped by problem, row order kept
        codes = problem[order]
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        group_start = np.repeat(starts, np.diff(np.r_[starts, len(codes)]))
        first = np.array([self.next_position.get(int(c), 0) for c in codes[starts]], np.int64)
        expected = np.arange(len(codes)) - group_start + np.repeat(first, np.diff(np.r_[starts, len(codes)]))
        bad = np.flatnonzero(position[order] != expected)
        if bad.size:
            dataset, pid = problems[int(codes[bad[0]])]
            raise T.TraceError(f"{self.source}: token ({dataset}, {pid}, position {position[order][bad[0]]}) breaks "
                               f"positions 0..n-1 in order (a token twice, or missing, or out of order)")
        gen = generated[order].astype(np.int8)
        before = np.array([self.last_generated.get(int(c), False) for c in codes[starts]], np.int8)
        prev = np.r_[0, gen[:-1]]
        prev[starts] = before
        if (gen < prev).any():
            dataset, pid = problems[int(codes[np.flatnonzero(gen < prev)[0]])]
            raise T.TraceError(f"{self.source}: a prompt token follows a generated token within ({dataset}, {pid})")
        ends = np.r_[starts[1:], len(codes)] - 1
        for c, end, count in zip(codes[starts].tolist(), ends.tolist(), np.diff(np.r_[starts, len(codes)]).tolist()):
            self.next_position[c] = self.next_position.get(c, 0) + count
            self.last_generated[c] = bool(gen[end])


def _problem_codes(table, index: dict[tuple[str, str], int], problems: list) -> np.ndarray:
    """(n,) int32 problem codes of a shard's rows, extending ``index``/``problems`` with new problems."""
    import pyarrow.compute as pc

    joined = pc.binary_join_element_wise(table.column("dataset"), table.column("problem_id"), "\x00")
    encoded = joined.combine_chunks().dictionary_encode()
    local = []
    for key in encoded.dictionary.to_pylist():
        dataset, _, pid = key.partition("\x00")
        if (dataset, pid) not in index:
            index[(dataset, pid)] = len(problems)
            problems.append((dataset, pid))
        local.append(index[(dataset, pid)])
    return np.asarray(local, np.int32)[encoded.indices.to_numpy(zero_copy_only=False)]


class _NpyWriter:
    """Appends rows to a ``.npy`` file of known final shape with ordinary writes: the pages go
    through the page cache, never into this process's memory (a writable memory map would count
    every page written as the process's own resident memory)."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape, self.rows = path, np.dtype(dtype), shape, 0
        self.file = open(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise T.TraceError(f"{self.path.name}: rows of shape {rows.shape} do not fit {self.shape}")
        self.file.write(rows.data)
        self.rows += len(rows)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.rows != self.shape[0]:
            raise T.TraceError(f"{self.path.name}: {self.rows} rows written, {self.shape[0]} expected")


def _build(trace_dir: Path, manifest: dict, shards: list[dict], target: Path, validate: bool) -> None:
    """Convert every shard into the .npy columns of ``target`` (a temporary folder renamed into place)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    info = T.trace_info(manifest)
    num_layers, top_k, num_experts, full = info.num_layers, info.top_k, info.num_experts, info.full_distribution
    weights_dtype = T.weights_dtype_of(manifest)
    sizes = [_shard_rows(trace_dir / str(s.get("file")), s) for s in shards]
    total = sum(sizes)
    with atomic_write(target, sync=False) as tmp:  # a cache, rebuilt when missing; no half-built one stays
        tmp.mkdir(parents=True)
        shapes = {"experts": (total, num_layers, top_k), "weights": (total, num_layers, top_k)}
        out = {name: _NpyWriter(tmp / f"{name}.npy", dtype, shapes.get(name, (total,))) for name, dtype in COLUMNS.items()}
        index: dict[tuple[str, str], int] = {}
        problems: list[tuple[str, str]] = []
        order = _OrderCheck(str(trace_dir))
        for entry, size in zip(shards, sizes):
            path = trace_dir / str(entry.get("file"))
            if validate:
                T.check_shard_file(path, entry)
            try:
                table = pq.read_table(path)
            except (OSError, pa.ArrowException) as err:
                raise T.TraceError(f"shard {path.name} is not a readable Parquet file (truncated or corrupt): "
                                   f"{err}") from None
            if table.num_rows != size:
                raise T.TraceError(f"shard {path.name} has {table.num_rows} rows, the manifest says {size}")
            if validate:
                T.check_table(table, path.name, entry, (num_layers, top_k, num_experts), full, weights_dtype)
            part = {"experts": _fixed_list_numpy(table.column("experts"), num_layers * top_k, np.int16),  # (n, L*k)
                    "weights": T.decode_weights(_fixed_list_numpy(table.column("weights"), num_layers * top_k,
                                                                  np.float32), weights_dtype),  # (n, L*k)
                    "token_id": table.column("token_id").to_numpy(), "position": table.column("position").to_numpy(),
                    "generated": table.column("phase").to_numpy(zero_copy_only=False) == "generated",
                    "problem": _problem_codes(table, index, problems)}
            if validate:
                order.update(part["problem"], part["position"], part["generated"], problems)
            for name, writer in out.items():
                writer.append(part[name].reshape((size,) + writer.shape[1:]))
            del table, part
        for writer in out.values():
            writer.close()
        (tmp / "problems.json").write_text(json.dumps({"problems": problems, "validated": validate}))


def _load(path: Path) -> np.ndarray:
    """A cached column, memory-mapped read-only (an empty one is read: nothing to map)."""
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # mmap of zero bytes
        return np.load(path)


def open_columns(trace_dir: str | os.PathLike, *, validate: bool = True, cache_dir: str | os.PathLike | None = None,
                 datasets: Iterable[str] | None = None) -> TraceColumns:
    """The columns of a trace folder, memory-mapped (module docstring); the cache is built on first use.

    validate: check the shard files against the manifest (and, while building, every check of
    ``load_traces``); any failure raises :class:`~routelib.routing.record.traces.TraceError`. cache_dir: where
    the ``.npy`` files go (default: ``routelib.paths.CACHE_DIR``, i.e. ``$ROUTELIB_CACHE`` or ``.cache``).
    datasets: only these datasets' shards (a cache of their own).
    """
    trace_dir = Path(trace_dir)
    manifest = T.read_manifest(trace_dir)
    T.layout_of(manifest)
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise T.TraceError(f"{trace_dir / T.MANIFEST} has no 'shards' list")
    if datasets is not None:
        wanted = set(datasets)
        unknown = wanted - set(manifest.get("datasets", {}))
        if unknown:
            raise T.TraceError(f"{trace_dir} has no dataset(s) {sorted(unknown)}; it has "
                               f"{sorted(manifest.get('datasets', {}))}")
        shards = [s for s in shards if s.get("dataset") in wanted]
    target = Path(cache_dir or paths.CACHE_DIR) / "trace-columns" / _cache_key(manifest, shards)
    meta = json.loads((target / "problems.json").read_text()) if (target / "problems.json").is_file() else None
    if meta is None or (validate and not meta["validated"]):  # none yet, or built without the checks
        target.parent.mkdir(parents=True, exist_ok=True)
        _build(trace_dir, manifest, shards, target, validate)  # bad traces (or Ctrl-C): nothing half-built stays
    elif validate:
        for entry in shards:
            T.check_shard_file(trace_dir / str(entry.get("file")), entry)
    arrays = {name: _load(target / f"{name}.npy") for name in COLUMNS}
    problems = [tuple(p) for p in json.loads((target / "problems.json").read_text())["problems"]]
    return TraceColumns(**arrays, problems=problems, manifest=manifest, cache_dir=target)
