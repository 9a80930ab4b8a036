"""Routing traces on disk: the Parquet shards, the manifest, and a loader that validates both.

A trace directory (e.g. ``routing_data_collected/moe-subject/``) holds::

    manifest.json                  how the traces were made + the list of shards with sha256
    humaneval-00000.parquet        one shard per batch of problems (problems 0..B-1 of humaneval)
    humaneval-00016.parquet        ...
    gsm8k-00000.parquet

Shard schema -- one row per token (prompt and generated), rows ordered by problem, then position:

=============  ==========================================  ==========================================
column         Arrow type                                  meaning
=============  ==========================================  ==========================================
dataset        string                                      "humaneval", "gsm8k", ...
problem_id     string                                      the dataset's id ("HumanEval/0", "gsm8k/test/17")
problem_index  int32                                       index of the problem in the dataset's prompt list
position       int32                                       0-based position in the sequence (padding excluded)
phase          string                                      "prompt" (fed in the prefill) or "generated"
token_id       int32                                       the token
token_text     string                                      ``tokenizer.decode([token_id])``
experts        fixed_size_list<int16>[L*k]                 top-k expert ids, row-major (layer, slot): the
                                                           expert of MoE layer l, slot j is ``[l*k + j]``;
                                                           slots in the router's order (descending weight)
weights        fixed_size_list<float32>[L*k]               the gate weight the model multiplied that expert's
               (or float16 / uint8,                        output by (renormalised over the top-k where the
               ``layout["weights_dtype"]``)                model does so, e.g. Mixtral); half precision halves
                                                           a deep model's traces (30 layers: ~2.5x smaller);
                                                           uint8 stores round(255 w) for weights in [0, 1]
                                                           (error <= 1/510; long text traces) and is read
                                                           back as q / 255
probs          fixed_size_list<float16>[L*E] (optional)    the full router distribution, row-major (layer, expert);
                                                           only with ``full_distribution``: softmax(logits),
                                                           sigmoid(logits) or the router's own probabilities,
                                                           as ``layout["router_scores"]`` says
source_        int32 (optional)                            imported traces (:mod:`.convert`): the token's
position                                                   position in the source, which may have gaps
=============  ==========================================  ==========================================

L = number of MoE layers (``manifest["layout"]["num_moe_layers"]``; ``moe_layers`` gives their
decoder-layer indices), k = experts per token, E = experts per layer -- the width of the router's
scores, so expert ids lie in [0, E). Layouts written since transformers-wide coverage also
record ``router_scores`` (the kind of the router's scores: "softmax", "sigmoid", "sqrtsoftplus",
"probabilities" or "unknown", one value or one per layer) and, for LongCat-Flash,
``zero_computation_experts`` (ids the router may pick that run no expert: the token passes through
unchanged, scaled by its weight); older layouts lack both keys and mean softmax routers without
such experts. Lists are flat, not nested,
so a column converts to one contiguous ``(N, L, k)`` array without a Python loop
(:func:`trace_arrays`). Each shard also carries the layout in its Parquet key-value metadata.

``manifest.json`` (see ``routing_data_collected/README.md`` for every field): format + version, the
model (name or path, architecture, config sha256, router-weights sha256, router modules), the
tokenizer (name, class, sha256, special ids), the layout, per dataset the prompt source, template,
prompts sha256, generation settings, counts and the exact command, the list of shards (file, dataset,
problems, rows, prompt/generated tokens, bytes, sha256), totals, the software versions and,
where measured, the collection overhead. Traces imported from another tool (:mod:`.convert`) carry a
``source`` entry instead of a collection command: the kind of input, its files with sha256, the exact
command and the import report (tokens kept; duplicates, incomplete tokens and gaps counted).
Windows of plain text (``collect --text`` / ``--text_file``, :mod:`.text`) are datasets whose every token
has phase "prompt"; their manifest entry has ``text`` (source, window length, counts) and no generation
settings (:meth:`TraceInfo.text_of`).

Only the format, the layout and the shard list are required; an import cannot know the model's class,
the tokenizer, the prompts or the generation settings. Read a manifest through :func:`trace_info`: a
:class:`TraceInfo` with a default for every field that may be missing (the notebooks and studies never
index a manifest themselves). :func:`companion_problem` says whether a second folder holds the same
prompts decoded otherwise.

Files are written atomically (:func:`routelib.io.atomic_write`: a hidden temporary beside the file,
fsync'ed, renamed into place, the directory fsync'ed); a run killed at any point leaves either the old
file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple

import numpy as np

from routelib import paths
from routelib.errors import RoutelibError
from routelib.io import atomic_write, atomic_write_bytes, sha256_file

FORMAT = "routelib-routing-traces"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".parquet"
PHASES = ("prompt", "generated")
EXPERTS_DTYPE = "int16"  # expert ids: up to 32767 experts per layer (Mixtral 8, OLMoE 64, Qwen3 128)
WEIGHTS_DTYPE = "float32"  # gate weights exactly as the model computed them (fp32 softmax in Mixtral)
WEIGHTS_DTYPES = ("float32", "float16", "uint8")  # what ``layout["weights_dtype"]`` may say (float16, uint8: compact)
UINT8_SCALE = 255  # uint8 weights: stored round(UINT8_SCALE * w), w in [0, 1]; read back as q / UINT8_SCALE
PROBS_DTYPE = "float16"  # the optional full distribution: L*E values per token, so half precision
# Scalar columns, in file order, with their Arrow type names.
SCALAR_COLUMNS = {
    "dataset": "string",
    "problem_id": "string",
    "problem_index": "int32",
    "position": "int32",
    "phase": "string",
    "token_id": "int32",
    "token_text": "string",
}
LIST_COLUMNS = ("experts", "weights", "probs")


class TraceError(RoutelibError, ValueError):
    """A trace directory or shard is missing, truncated, altered, or does not match its manifest."""


# ----------------------------------------------------------------------------------------------
# checksums


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def resolve_trace_dir(path: str | os.PathLike) -> Path:
    """A path as given if it exists there (absolute, or relative to the working directory), else
    relative to the repository root."""
    return Path(path) if Path(path).exists() else paths.in_repo(path)


def read_manifest(trace_dir: str | os.PathLike) -> dict:
    """The parsed ``manifest.json`` of ``trace_dir`` (TraceError if missing, unreadable or foreign)."""
    path = Path(trace_dir) / MANIFEST
    if not path.is_file():
        raise TraceError(f"{path} not found: {trace_dir} is not a routing-trace directory "
                         f"(collect one with `python -m routelib.routing.record.collect`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TraceError(f"{path} is not valid JSON ({err}); the manifest was truncated or altered") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TraceError(f"{path} is not a routelib routing-trace manifest (format {FORMAT!r} expected)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TraceError(f"{path}: format_version {manifest.get('format_version')!r}, this routelib reads "
                         f"{FORMAT_VERSION}")
    return manifest


def _dumps(obj: Any) -> str:
    """Indented JSON with lists of scalars on one line (problem indices, layer lists)."""
    text = json.dumps(obj, indent=1)  # JSON strings never hold a raw newline: only json's own are touched
    return re.sub(r"\[\n\s+([^\[\]{}]*?)\n\s*\]", lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)


def write_trace_manifest(trace_dir: str | os.PathLike, manifest: dict) -> None:
    """Write ``manifest.json`` atomically."""
    atomic_write_bytes(Path(trace_dir) / MANIFEST, (_dumps(manifest) + "\n").encode())


# ----------------------------------------------------------------------------------------------
# shards


def shard_name(dataset: str, first_problem: int) -> str:
    return f"{dataset}-{first_problem:05d}{SHARD_SUFFIX}"


def arrow_schema(num_layers: int, top_k: int, num_experts: int, full_distribution: bool,
                 weights_dtype: str = WEIGHTS_DTYPE):
    import pyarrow as pa

    if weights_dtype not in WEIGHTS_DTYPES:
        raise TraceError(f"weights dtype {weights_dtype!r}: the trace format stores gate weights as one of {WEIGHTS_DTYPES}")

    fields = [pa.field(name, getattr(pa, kind)(), nullable=False) for name, kind in SCALAR_COLUMNS.items()]
    fields.append(pa.field("experts", pa.list_(pa.int16(), num_layers * top_k), nullable=False))
    fields.append(pa.field("weights", pa.list_(getattr(pa, weights_dtype)(), num_layers * top_k), nullable=False))
    if full_distribution:
        fields.append(pa.field("probs", pa.list_(pa.float16(), num_layers * num_experts), nullable=False))
    meta = {"routelib.format": FORMAT, "routelib.format_version": str(FORMAT_VERSION),
            "routelib.layout": json.dumps({"num_moe_layers": num_layers, "top_k": top_k,
                                           "num_experts": num_experts})}
    return pa.schema(fields, metadata=meta)


def _fixed_list(values: np.ndarray, width: int, arrow_type):
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=arrow_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def shard_table(columns: dict[str, Any], experts: np.ndarray, weights: np.ndarray, probs: np.ndarray | None,
                num_experts: int, weights_dtype: str = WEIGHTS_DTYPE):
    """An Arrow table in the trace schema. ``columns``: the scalar columns (length N);
    experts/weights: (N, L, k); probs: (N, L, E) or None; weights_dtype: one of :data:`WEIGHTS_DTYPES`."""
    import pyarrow as pa

    _, num_layers, top_k = experts.shape
    schema = arrow_schema(num_layers, top_k, num_experts, probs is not None, weights_dtype)
    arrays = [pa.array(columns[name], type=schema.field(name).type) for name in SCALAR_COLUMNS]
    arrays.append(_fixed_list(experts.astype(np.int16), num_layers * top_k, pa.int16()))
    arrays.append(_fixed_list(encode_weights(weights, weights_dtype), num_layers * top_k, getattr(pa, weights_dtype)()))
    if probs is not None:
        arrays.append(_fixed_list(probs.astype(np.float16), num_layers * num_experts, pa.float16()))
    return pa.Table.from_arrays(arrays, schema=schema)


def encode_weights(weights: np.ndarray, weights_dtype: str) -> np.ndarray:
    """Gate weights (any shape, float) as stored under ``weights_dtype``; uint8 refuses weights outside [0, 1]
    (sigmoid routers with a scaling factor, e.g. DeepSeek-V3, exceed 1: store those as float16)."""
    if weights_dtype != "uint8":
        return weights.astype(weights_dtype)
    if weights.size and not (np.isfinite(weights).all() and weights.min() >= 0 and weights.max() <= 1):
        raise TraceError(f"uint8 gate weights hold values in [0, 1]; these range over [{np.nanmin(weights):.4g}, "
                         f"{np.nanmax(weights):.4g}]: store them as float16 or float32")
    return np.rint(weights.astype(np.float64) * UINT8_SCALE).astype(np.uint8)


def decode_weights(values: np.ndarray, weights_dtype: str) -> np.ndarray:
    """Stored gate weights -> float32 (uint8: q / 255)."""
    out = values.astype(np.float32)
    return out / UINT8_SCALE if weights_dtype == "uint8" else out


def write_shard(path: str | os.PathLike, table) -> dict:
    """Write ``table`` atomically as a zstd-compressed Parquet file; returns {bytes, sha256}. Float lists
    (weights, probs) are written byte-stream-split (lossless; it lets zstd see their exponent bytes
    together: a third smaller)."""
    import pyarrow.parquet as pq

    path = Path(path)
    floats = [name for name in ("weights", "probs") if name in table.column_names]
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", compression_level=9, use_byte_stream_split=floats)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def shard_counts(table) -> dict:
    """rows / problems / prompt and generated token counts of a shard table."""
    import pyarrow.compute as pc

    phase = table.column("phase")
    generated = int(pc.sum(pc.equal(phase, "generated")).as_py() or 0)
    return {"rows": table.num_rows, "problems": len(pc.unique(table.column("problem_index"))),
            "prompt_tokens": table.num_rows - generated, "generated_tokens": generated}


def summarise_manifest(manifest: dict) -> None:
    """Recompute per-dataset counts and totals from the shard list."""
    keys = ("problems", "rows", "prompt_tokens", "generated_tokens", "bytes")
    totals = dict.fromkeys(keys, 0)
    for ds, info in manifest["datasets"].items():
        counts = dict.fromkeys(keys, 0)
        counts["shards"] = 0
        for s in manifest["shards"]:
            if s["dataset"] == ds:
                counts["shards"] += 1
                for k in keys:
                    counts[k] += s[k]
        counts["complete"] = counts["problems"] == info["num_problems"]
        info["counts"] = counts
        for k in keys:
            totals[k] += counts[k]
    totals["shards"] = len(manifest["shards"])
    manifest["totals"] = totals


# ----------------------------------------------------------------------------------------------
# loading


class TraceArrays(NamedTuple):
    experts: np.ndarray  # (N, L, k) int16: expert ids per MoE layer and slot
    weights: np.ndarray  # (N, L, k) float32: gate weights
    probs: np.ndarray | None  # (N, L, E) float16: full router distribution, or None when not collected


def weights_dtype_of(manifest: dict) -> str:
    """The manifest's ``layout["weights_dtype"]`` (float32 where it is absent: imports and older sets)."""
    dtype = (manifest.get("layout") or {}).get("weights_dtype") or WEIGHTS_DTYPE
    if dtype not in WEIGHTS_DTYPES:
        raise TraceError(f"manifest.json: layout weights_dtype {dtype!r} is not one of {WEIGHTS_DTYPES}")
    return dtype


def layout_of(manifest: dict) -> tuple[int, int, int]:
    try:
        lay = manifest["layout"]
        return int(lay["num_moe_layers"]), int(lay["top_k"]), int(lay["num_experts"])
    except (KeyError, TypeError, ValueError):
        raise TraceError("manifest.json has no valid 'layout' (num_moe_layers, top_k, num_experts)") from None


def check_shard_file(path: Path, entry: dict) -> None:
    """TraceError unless the shard exists with the byte count and sha256 of its manifest entry."""
    if not path.is_file():
        raise TraceError(f"shard {path.name} is listed in the manifest but missing from {path.parent}")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        kind = "truncated" if size < entry["bytes"] else "longer than recorded"
        raise TraceError(f"shard {path.name} is {kind}: {size} bytes, the manifest says {entry['bytes']}")
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        raise TraceError(f"shard {path.name} was altered: sha256 {digest[:16]}..., the manifest says "
                         f"{str(entry.get('sha256'))[:16]}...")


def _type_name(t) -> str:
    """An Arrow type as text, ignoring the child field name of lists (Parquet writers differ)."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{t.value_type}>[{t.list_size}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{t.value_type}>"
    return str(t)


def check_table(table, name: str, entry: dict, layout: tuple[int, int, int], full: bool,
                weights_dtype: str = WEIGHTS_DTYPE) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    num_layers, top_k, num_experts = layout
    expected = arrow_schema(num_layers, top_k, num_experts, full, weights_dtype)
    have = {f.name: f.type for f in table.schema}
    missing = [f.name for f in expected if f.name not in have]
    if missing:
        raise TraceError(f"shard {name} lacks column(s) {missing}; expected {expected.names}")
    for f in expected:
        if _type_name(have[f.name]) != _type_name(f.type):
            raise TraceError(f"shard {name}: column {f.name!r} has type {_type_name(have[f.name])}, expected "
                             f"{_type_name(f.type)} (layout from the manifest: {num_layers} MoE layers x "
                             f"top-{top_k} of {num_experts} experts)")
    if entry.get("rows") is not None and table.num_rows != entry["rows"]:
        raise TraceError(f"shard {name} has {table.num_rows} rows, the manifest says {entry['rows']}")
    for col in ("dataset", "problem_id", "phase", "token_text", "experts", "weights"):
        if table.column(col).null_count:
            raise TraceError(f"shard {name}: column {col!r} has nulls")
    if entry.get("dataset") is not None and not pc.all(pc.equal(table.column("dataset"), entry["dataset"])).as_py():
        raise TraceError(f"shard {name}: rows of another dataset than {entry['dataset']!r}")
    bad = pc.invert(pc.is_in(table.column("phase"), value_set=pa.array(PHASES)))
    if table.num_rows and pc.any(bad).as_py():
        raise TraceError(f"shard {name}: phase values other than {PHASES}")
    experts = table.column("experts").combine_chunks().flatten()
    if len(experts) and (pc.min(experts).as_py() < 0 or pc.max(experts).as_py() >= num_experts):
        raise TraceError(f"shard {name}: expert ids outside [0, {num_experts})")
    weights = table.column("weights").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if not np.isfinite(weights).all():
        raise TraceError(f"shard {name}: non-finite gate weights")


def _check_order(df, name: str) -> None:
    """Every (dataset, problem, position) once; within each problem positions 0..n-1 in row order and
    prompt tokens before generated ones."""
    if df.empty:
        return
    dup = df.duplicated(subset=["dataset", "problem_id", "position"], keep=False)
    if dup.any():
        row = df[dup].iloc[0]
        raise TraceError(f"{name}: token ({row['dataset']}, {row['problem_id']}, position {row['position']}) "
                         f"appears more than once")
    grouped = df.groupby(["dataset", "problem_id"], sort=False)
    if not (df["position"].to_numpy() == grouped.cumcount().to_numpy()).all():
        raise TraceError(f"{name}: positions are not 0..n-1 in order within every problem")
    generated = (df["phase"] == "generated").astype(np.int8)
    if (generated.groupby([df["dataset"], df["problem_id"]], sort=False).diff().fillna(0) < 0).any():
        raise TraceError(f"{name}: a prompt token follows a generated token within a problem")


def load_traces(trace_dir: str | os.PathLike, validate: bool = True, *, datasets: Iterable[str] | None = None,
                columns: Iterable[str] | None = None):
    """Read a trace directory into one pandas DataFrame (one row per token; columns as in the module
    docstring; ``df.attrs["manifest"]`` holds the manifest).

    validate: check every shard against the manifest -- present, not truncated (byte count), not
    altered (sha256), the schema and list widths of the manifest's layout, the row counts, expert ids
    in range, finite weights, and every (dataset, problem, position) exactly once with positions
    0..n-1; any failure raises :class:`TraceError` naming the file and the problem.
    datasets: only these datasets' shards. columns: only these columns (validation still reads all).
    Shards found on disk but not listed in the manifest (a collection killed right after writing
    one; ``collect(..., resume=True)`` adopts them) are ignored with a warning.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    trace_dir = Path(trace_dir)
    manifest = read_manifest(trace_dir)
    layout = layout_of(manifest)
    full = bool(manifest.get("layout", {}).get("full_distribution", False))
    weights_dtype = weights_dtype_of(manifest)
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise TraceError(f"{trace_dir / MANIFEST} has no 'shards' list")
    wanted = set(datasets) if datasets is not None else None
    if wanted is not None:
        unknown = wanted - set(manifest.get("datasets", {}))
        if unknown:
            raise TraceError(f"{trace_dir} has no dataset(s) {sorted(unknown)}; it has "
                             f"{sorted(manifest.get('datasets', {}))}")
    listed = {s.get("file") for s in shards}
    orphans = sorted(p.name for p in trace_dir.glob(f"*{SHARD_SUFFIX}") if p.name not in listed)
    if orphans:
        warnings.warn(f"{trace_dir}: shard(s) not in the manifest, ignored: {orphans} "
                      f"(an interrupted collection; resume it to adopt them)", stacklevel=2)
    tables = []
    for entry in shards:
        if wanted is not None and entry.get("dataset") not in wanted:
            continue
        path = trace_dir / str(entry.get("file"))
        if validate:
            check_shard_file(path, entry)
        try:
            table = pq.read_table(path)
        except FileNotFoundError:
            raise TraceError(f"shard {path.name} is listed in the manifest but missing from {trace_dir}") from None
        except (OSError, pa.ArrowException) as err:
            raise TraceError(f"shard {path.name} is not a readable Parquet file (truncated or corrupt): "
                             f"{err}") from None
        if validate:
            check_table(table, path.name, entry, layout, full, weights_dtype)
        tables.append(table)
    num_layers, top_k, num_experts = layout
    if tables:
        try:
            table = pa.concat_tables(tables)
        except pa.ArrowInvalid as err:
            raise TraceError(f"{trace_dir}: shards have different schemas: {err}") from None
    else:
        table = arrow_schema(num_layers, top_k, num_experts, full, weights_dtype).empty_table()
    if validate:
        _check_order(table.select(["dataset", "problem_id", "position", "phase"]).to_pandas(), str(trace_dir))
    if columns is not None:
        table = table.select(list(columns))
    if weights_dtype == "uint8" and "weights" in table.column_names:
        table = _decoded_weights(table, num_layers * top_k)
    df = table.to_pandas()
    df.attrs["manifest"] = manifest
    return df


def _decoded_weights(table, width: int):
    """``table`` with its uint8 weights column read back as float32 (q / 255), so frames always hold the weights."""
    import pyarrow as pa

    column = table.column("weights").combine_chunks()
    values = decode_weights(column.flatten().to_numpy(zero_copy_only=False), "uint8")
    decoded = pa.FixedSizeListArray.from_arrays(pa.array(values, type=pa.float32()), width)
    return table.set_column(table.column_names.index("weights"), "weights", decoded)


def trace_arrays(df, manifest: dict | None = None) -> TraceArrays:
    """The list columns of a trace DataFrame as contiguous arrays: experts and weights (N, L, k) and,
    when collected, probs (N, L, E). The layout comes from ``manifest`` or ``df.attrs["manifest"]``."""
    manifest = manifest if manifest is not None else df.attrs.get("manifest")
    if manifest is None:
        raise TraceError("trace_arrays needs the manifest (pass it, or a DataFrame from load_traces)")
    num_layers, top_k, num_experts = layout_of(manifest)
    n = len(df)

    def stack(col: str, width: int, dtype) -> np.ndarray:
        if n == 0:
            return np.zeros((0, num_layers, width), dtype)
        flat = np.concatenate(df[col].to_numpy()).astype(dtype, copy=False)
        if flat.size != n * num_layers * width:
            raise TraceError(f"column {col!r}: {flat.size} values for {n} rows, expected {num_layers}x{width} each")
        return flat.reshape(n, num_layers, width)

    experts = stack("experts", top_k, np.int16)
    weights = stack("weights", top_k, np.float32)
    probs = stack("probs", num_experts, np.float16) if "probs" in df.columns else None
    return TraceArrays(experts, weights, probs)


def router_scores(manifest: dict) -> list[str]:
    """The kind of each MoE layer's router scores ("softmax", "sigmoid", "sqrtsoftplus",
    "probabilities", "unknown"); layouts written before the kind was recorded mean "softmax"."""
    return list(trace_info(manifest).router_scores)


def zero_computation_experts(manifest: dict) -> list[int]:
    """Expert ids that run no computation (LongCat-Flash: the token passes through, scaled by its
    weight); they are counted like any expert by the analyses, which take E = ``num_experts`` (all ids)."""
    return list(trace_info(manifest).zero_computation_experts)


# ----------------------------------------------------------------------------------------------
# the manifest, read once with its defaults

COLLECTED = "collected"  # TraceInfo.source of traces recorded by routelib.routing.record.collect


@dataclass(frozen=True)
class TraceInfo:
    """What a trace manifest says, every field that an import (:mod:`.convert`) or an older collection
    may lack given its default. Notebooks and studies read manifests through :func:`trace_info`, never
    with ``manifest[...]`` lookups."""

    num_layers: int  # L: MoE layers (required: the layout)
    top_k: int  # k: experts per token (required)
    num_experts: int  # E: experts per layer, the width of the router's scores (required)
    moe_layers: tuple[int, ...]  # decoder-layer index of each MoE layer; default 0..L-1
    full_distribution: bool  # the optional probs column was recorded; default False
    router_scores: tuple[str, ...]  # kind of each layer's router scores; default "softmax" (older layouts)
    zero_computation_experts: tuple[int, ...]  # ids that run no expert (LongCat-Flash); default none
    weights_source: str | None  # where the gate weights come from (imports: "not recorded: uniform 1/k"...)
    model: str | None  # name or path of the model that routed the traces; None: not recorded
    architecture: str | None  # its model class (collections record it, imports cannot); None: not recorded
    router_weights_sha256: str | None  # checksum of the routers that routed; None: not recorded
    vocab_size: int | None  # tokenizer vocabulary size; None: not recorded
    token_ids_recorded: bool  # False when the source had no token ids (written as -1)
    source: str  # COLLECTED, or the importer's kind ("jsonl", "vllm")
    command: str | None  # the command that made the folder (collection or import); None: not recorded
    datasets: tuple[str, ...]  # dataset names, in manifest order
    generation: dict = field(default_factory=dict, repr=False)  # dataset -> generation settings; empty
    # for imports of other tools' output (the vLLM backend of the collection records them)
    overhead: dict | None = field(default=None, repr=False)  # the measured collection overhead, if measured
    text: dict = field(default_factory=dict, repr=False)  # dataset -> its text windows (collect --text): source,
    # window length, counts; empty for generated datasets and for manifests written before text collection

    @property
    def imported(self) -> bool:
        """The traces came from another tool through :mod:`.convert` (not collected here)."""
        return self.source != COLLECTED

    def generation_of(self, dataset: str) -> dict:
        """The generation settings ``dataset`` was decoded with ({} when not recorded)."""
        return dict(self.generation.get(dataset) or {})

    def text_of(self, dataset: str) -> dict:
        """How ``dataset``'s windows of plain text were made ({} when it was generated, not read from text)."""
        return dict(self.text.get(dataset) or {})

    def describe(self) -> str:
        """One line: the model and its class, where the traces came from when imported, and the layout."""
        notes = [self.architecture or "architecture not recorded"]
        if self.imported:
            notes.append(f"imported from {self.source}")
        return (f"model {self.model or 'not recorded'} ({'; '.join(notes)}): {self.num_layers} MoE layers, "
                f"top-{self.top_k} of {self.num_experts} experts")


def _section(manifest: dict, key: str) -> dict:
    """``manifest[key]`` as a dict ({} when missing or null); TraceError when it is something else."""
    value = manifest.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TraceError(f"manifest.json: {key!r} must be an object, got {type(value).__name__}")
    return value


def _text(section: dict, key: str) -> str | None:
    """A string field of a manifest section, None when missing, null or empty."""
    value = section.get(key)
    return str(value) if value not in (None, "") else None


def _generation(manifest: dict, datasets: dict, source: dict) -> dict:
    """dataset -> generation settings: each dataset's own, else the import source's (vLLM backend)."""
    from_source = source.get("generation") if isinstance(source.get("generation"), dict) else {}
    out = {}
    for name in dict.fromkeys([*datasets, *from_source]):
        info = datasets.get(name) if isinstance(datasets.get(name), dict) else {}
        gen = info.get("generation") or from_source.get(name)
        if gen:
            out[name] = dict(gen)
    return out


def trace_info(manifest: dict | str | os.PathLike) -> TraceInfo:
    """:class:`TraceInfo` of a manifest (a dict, or a trace directory whose manifest is read). Only the
    layout is required (TraceError without it); every other field falls back to its default."""
    if not isinstance(manifest, dict):
        manifest = read_manifest(manifest)
    num_layers, top_k, num_experts = layout_of(manifest)
    layout, model, tokenizer = _section(manifest, "layout"), _section(manifest, "model"), _section(manifest, "tokenizer")
    source, datasets = _section(manifest, "source"), _section(manifest, "datasets")
    scores = layout.get("router_scores", "softmax")
    scores = [scores] * num_layers if isinstance(scores, str) else list(scores)
    if len(scores) != num_layers:
        raise TraceError(f"manifest.json: layout router_scores lists {len(scores)} kinds for {num_layers} MoE layers")
    moe_layers = layout.get("moe_layers") or list(range(num_layers))
    if len(moe_layers) != num_layers:
        raise TraceError(f"manifest.json: layout moe_layers lists {len(moe_layers)} layers, num_moe_layers is "
                         f"{num_layers}")
    vocab = tokenizer.get("vocab_size")
    recorded = tokenizer.get("token_ids_recorded", True)
    first_command = next((d.get("command") for d in datasets.values() if isinstance(d, dict) and d.get("command")),
                         None)
    return TraceInfo(
        num_layers=num_layers, top_k=top_k, num_experts=num_experts, moe_layers=tuple(int(i) for i in moe_layers),
        full_distribution=bool(layout.get("full_distribution", False)), router_scores=tuple(scores),
        zero_computation_experts=tuple(int(i) for i in layout.get("zero_computation_experts") or ()),
        weights_source=_text(layout, "weights_source"), model=_text(model, "name_or_path"),
        architecture=_text(model, "architecture"), router_weights_sha256=_text(model, "router_weights_sha256"),
        vocab_size=int(vocab) if vocab and recorded else None, token_ids_recorded=bool(recorded),
        source=_text(source, "kind") or COLLECTED,
        command=_text(manifest, "command") or _text(source, "command") or first_command,
        datasets=tuple(datasets), generation=_generation(manifest, datasets, source),
        overhead=manifest.get("overhead") if isinstance(manifest.get("overhead"), dict) else None,
        text={name: dict(info["text"]) for name, info in datasets.items()
              if isinstance(info, dict) and isinstance(info.get("text"), dict)})


# ----------------------------------------------------------------------------------------------
# a companion set: the same prompts decoded otherwise


def problem_keys(trace_dir: str | os.PathLike) -> set[tuple[str, str]]:
    """(dataset, problem_id) of every problem in a trace directory, read from those two columns of its
    shards (no validation: :func:`load_traces` does that)."""
    import pyarrow.parquet as pq

    trace_dir = resolve_trace_dir(trace_dir)
    keys: set[tuple[str, str]] = set()
    for entry in read_manifest(trace_dir).get("shards") or []:
        table = pq.read_table(trace_dir / str(entry.get("file")), columns=["dataset", "problem_id"])
        pairs = table.group_by(["dataset", "problem_id"]).aggregate([])
        keys |= set(zip(pairs.column("dataset").to_pylist(), pairs.column("problem_id").to_pylist()))
    return keys


def companion_problem(trace_dir: str | os.PathLike, compare_dir: str | os.PathLike | None) -> str | None:
    """Why ``compare_dir`` cannot stand beside ``trace_dir`` as the same prompts decoded otherwise (one
    line), or None when it can: it must be a trace folder holding problems of ``trace_dir``, and where
    both record a dataset's prompts (``prompts_sha256``), the same prompts. Relative paths: as
    :func:`resolve_trace_dir`."""
    if compare_dir is None:
        return "compare_dir is None"
    try:
        mine, other = read_manifest(resolve_trace_dir(trace_dir)), read_manifest(resolve_trace_dir(compare_dir))
    except TraceError as err:
        return f"compare_dir {compare_dir}: {err}"
    ours, theirs = _section(mine, "datasets"), _section(other, "datasets")
    differ = [d for d in ours if d in theirs and isinstance(ours[d], dict) and isinstance(theirs[d], dict)
              and None not in (ours[d].get("prompts_sha256"), theirs[d].get("prompts_sha256"))
              and ours[d]["prompts_sha256"] != theirs[d]["prompts_sha256"]]
    if differ:
        return f"compare_dir {compare_dir} decodes other prompts than trace_dir (prompts_sha256 of {differ} differ)"
    if not problem_keys(trace_dir) & problem_keys(compare_dir):
        return f"compare_dir {compare_dir} holds none of trace_dir's problems"
    return None
