"""Routing traces from elsewhere, imported into the routelib trace format (:mod:`routelib.routing.record.traces`).

Two sources, one writer. Whatever comes in is checked line by line (or file by file); an input that
cannot be meant as routing stops the import with one line naming the file and the line
(:class:`ConvertError`, a :class:`~routelib.routing.record.traces.TraceError`); what the format allows to
be incomplete is skipped and counted, never filled in. The written folder is then read back with
:func:`~routelib.routing.record.traces.load_traces` (full validation), and its ``manifest.json`` records
the source (files, sha256, the command) and the import report (what was kept, what was skipped).

**JSON lines** (``python -m routelib.routing.record.convert jsonl ROUTING.jsonl --out DIR``): one object per
(token, layer), the shape hand-rolled routing collectors log (such as the one behind the original
Mixtral routing analysis that notebook 04 starts from)::

    {"dataset": "gsm8k", "problem_id": "gsm8k/0", "token_idx": 17, "layer": 3,
     "experts": [5, 1], "gating_probs": [0.71, 0.29]}

``experts``: the top-k ids, highest weight first; ``gating_probs``: their weights (slots are put in
descending weight order if a line lists them otherwise). Optional per line: ``token_id``,
``token_text``, ``phase`` ("prompt" or "generated"). Rules:

- ``token_idx`` may have gaps (tokens the collector dropped): the kept tokens of a problem get the
  trace positions 0..n-1 in ``token_idx`` order, the source's ``token_idx`` is kept in the optional
  column ``source_position``, and the gaps are counted. A token after a gap is then treated as the
  successor of the token before the gap by the previous-token predictors (the report counts gaps so
  that a user can judge).
- A token needs a record for every MoE layer (the layers are ``range(num_layers)``, or the distinct
  ``layer`` values seen in the file): a token missing some layer is skipped whole and counted.
- A record repeated identically is counted and skipped; a record repeated with other experts or
  weights is an error naming both lines.
- Malformed JSON, a missing or mistyped field, ``experts`` and ``gating_probs`` of different lengths,
  a top-k different from the first line's, a repeated expert id within a record, an expert id outside
  ``[0, num_experts)``, or a non-finite weight: an error naming file and line.
- ``phase``: the record's own field; else the companion file's ``prompt_tokens`` (token_idx below it
  is a prompt token); else "generated" (that analysis's collector logged decode tokens only).
- Missing token ids are written as -1 (the manifest's tokenizer then says
  ``"token_ids_recorded": false``); missing token texts as "".

The optional companion file (``--texts TEXTS.jsonl``): one object per problem with ``dataset``,
``problem_id``, and any of ``prompt``, ``generated_text`` (strings) and ``prompt_tokens`` (int). It is
copied into the trace folder as ``texts.jsonl`` (sha256 in the manifest).

**vLLM** (``python -m routelib.routing.record.convert vllm FILE.npz ... --out DIR``): one file per request,
as :func:`save_vllm_output` writes it from a ``vllm.RequestOutput`` of an engine started with
``enable_return_routed_experts=True``. Keys of the ``.npz``:

=====================  =================  =========================================================
key                    shape, dtype       meaning
=====================  =================  =========================================================
``routed_experts``     (T, L, k) integer  ``CompletionOutput.routed_experts``: top-k ids per token
                                          and MoE layer, in vLLM's slot order
``prompt_token_ids``   (P,) integer       ``RequestOutput.prompt_token_ids``
``output_token_ids``   (G,) integer       ``CompletionOutput.token_ids``
``routed_weights``     (T, L, k) float    optional: gate weights, if the user has them
``dataset``            () string          optional (else ``--dataset``)
``problem_id``         () string          optional (else the file name without suffix)
=====================  =================  =========================================================

T must be P + G (every token routed) or P + G - 1 (the last generated token was never fed back:
it is skipped and counted). Tokens ``< P`` are "prompt", the rest "generated". A ``.npy`` file holds
``routed_experts`` alone: token ids are then -1 and every token is "generated". vLLM returns no gate
weights: without ``routed_weights`` every slot gets weight 1/k and the layout says
``"weights_source": "not recorded: uniform 1/k"`` (predictors then learn expert sets, not weights).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from routelib.io import atomic_write, sha256_file
from routelib.errors import ConfigError
from routelib.routing.record import traces as T

#: The fields every JSON-lines routing record must have, with their JSON types.
JSONL_FIELDS = {"dataset": str, "problem_id": (str, int), "token_idx": int, "layer": int, "experts": list,
                "gating_probs": list}
#: Keys of a vLLM request file (.npz); the last three are optional.
VLLM_KEYS = ("routed_experts", "prompt_token_ids", "output_token_ids", "routed_weights", "dataset", "problem_id")
TEXTS_FILE = "texts.jsonl"


class ConvertError(T.TraceError):
    """An input file is not routing this importer can read: the message names the file and line."""


@dataclass
class ProblemTrace:
    """One problem's routing as imported: the rows of one sequence, in order."""

    dataset: str  # dataset name
    problem_id: str  # the problem's id in its dataset
    experts: np.ndarray  # (n, L, k) expert ids, highest weight first
    weights: np.ndarray  # (n, L, k) gate weights of those experts
    token_id: np.ndarray  # (n,) token ids; -1 where the source has none
    generated: np.ndarray  # (n,) bool: phase "generated" (else "prompt")
    source_position: np.ndarray  # (n,) the token's position in the source (may have gaps)
    token_text: list[str] | None = None  # (n,) decoded tokens, or None: not recorded


@dataclass
class ImportReport:
    """What an import kept and skipped (written to the manifest's ``source.report``)."""

    records: int = 0  # input records read (JSON lines, or requests)
    tokens: int = 0  # tokens written
    problems: int = 0  # problems written
    duplicate_records: int = 0  # identical repeated records, skipped
    incomplete_tokens: int = 0  # tokens lacking some MoE layer, skipped whole
    incomplete_records: int = 0  # the records of those tokens
    gaps: int = 0  # positions missing inside a problem's token_idx range (dropped by the source)
    unrouted_tokens: int = 0  # vLLM: last generated tokens with no routing (never fed back)
    reordered_records: int = 0  # records whose slots were put in descending weight order
    empty_problems: list = field(default_factory=list)  # problems with no complete token (not written)

    def lines(self) -> list[str]:
        skipped = [f"{self.duplicate_records} duplicate records", f"{self.incomplete_tokens} incomplete tokens "
                   f"({self.incomplete_records} records)", f"{self.unrouted_tokens} unrouted tokens"]
        return [f"read {self.records} records; wrote {self.tokens} tokens of {self.problems} problems",
                f"skipped: {', '.join(skipped)}; {len(self.empty_problems)} problems without a complete token",
                f"gaps in token positions: {self.gaps}; records reordered by weight: {self.reordered_records}"]


# ----------------------------------------------------------------------------------------------
# the writer


def _problem_table(problems: list[ProblemTrace], first_index: int, num_experts: int):
    """The shard table of consecutive problems of one dataset (problem_index from ``first_index``)."""
    import pyarrow as pa

    sizes = [len(p.experts) for p in problems]
    columns = {
        "dataset": [p.dataset for p, n in zip(problems, sizes) for _ in range(n)],
        "problem_id": [p.problem_id for p, n in zip(problems, sizes) for _ in range(n)],
        "problem_index": np.repeat(np.arange(first_index, first_index + len(problems)), sizes).astype(np.int32),
        "position": np.concatenate([np.arange(n) for n in sizes]).astype(np.int32),
        "phase": np.where(np.concatenate([p.generated for p in problems]), "generated", "prompt").tolist(),
        "token_id": np.concatenate([p.token_id for p in problems]).astype(np.int32),
        "token_text": [t for p in problems for t in (p.token_text or [""] * len(p.experts))],
    }
    table = T.shard_table(columns, np.concatenate([p.experts for p in problems]),  # (N, L, k)
                          np.concatenate([p.weights for p in problems]), None, num_experts)
    source = np.concatenate([p.source_position for p in problems]).astype(np.int32)
    return table.append_column(pa.field("source_position", pa.int32(), nullable=False), pa.array(source))


def write_imported(out_dir: str | os.PathLike, problems: Iterable[ProblemTrace], *, num_experts: int,
                   layout: dict, source: dict, model: str | None = None, problems_per_shard: int = 16) -> dict:
    """Write ``problems`` as a trace folder (one shard per ``problems_per_shard`` problems of a
    dataset), then load it back with full validation; returns the manifest. ``layout``: extra layout
    keys (``moe_layers``, ``router_scores``, ``weights_source``); ``source``: what was imported."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty: import into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _write_imported(out, problems, num_experts=num_experts, layout=layout, source=source, model=model,
                               problems_per_shard=problems_per_shard)
    except BaseException:  # a bad input found midway (or Ctrl-C): leave no half-written folder
        shutil.rmtree(out, ignore_errors=True)
        raise


def _write_imported(out: Path, problems: Iterable[ProblemTrace], *, num_experts: int, layout: dict, source: dict,
                    model: str | None, problems_per_shard: int) -> dict:
    manifest: dict[str, Any] = {"format": T.FORMAT, "format_version": T.FORMAT_VERSION,
                                "model": {"name_or_path": model}, "tokenizer": {"vocab_size": 0},
                                "layout": None, "datasets": {}, "shards": [], "source": source}
    pending: dict[str, list[ProblemTrace]] = defaultdict(list)
    written: dict[str, int] = defaultdict(int)  # problems written per dataset
    max_token = -1

    def flush(dataset: str) -> None:
        batch = pending.pop(dataset, [])
        if not batch:
            return
        first = written[dataset]
        table = _problem_table(batch, first, num_experts)
        name = T.shard_name(dataset, first)
        manifest["shards"].append({"file": name, "dataset": dataset,
                                   "problem_indices": list(range(first, first + len(batch))),
                                   **T.shard_counts(table), **T.write_shard(out / name, table)})
        written[dataset] += len(batch)

    for problem in problems:
        _, num_layers, top_k = problem.experts.shape
        if manifest["layout"] is None:
            manifest["layout"] = {"num_moe_layers": num_layers, "moe_layers": list(range(num_layers)), "top_k": top_k,
                                  "num_experts": num_experts, "full_distribution": False,
                                  "experts_dtype": T.EXPERTS_DTYPE, "weights_dtype": T.WEIGHTS_DTYPE,
                                  "probs_dtype": None, **layout}
        elif (num_layers, top_k) != (manifest["layout"]["num_moe_layers"], manifest["layout"]["top_k"]):
            raise ConvertError(f"problem ({problem.dataset}, {problem.problem_id}) has {num_layers} MoE layers x "
                               f"top-{top_k}, earlier problems {manifest['layout']['num_moe_layers']} x "
                               f"top-{manifest['layout']['top_k']}")
        max_token = max(max_token, int(problem.token_id.max(initial=-1)))
        pending[problem.dataset].append(problem)
        if len(pending[problem.dataset]) >= problems_per_shard:
            flush(problem.dataset)
    for dataset in list(pending):
        flush(dataset)
    if manifest["layout"] is None:
        raise ConvertError(f"{out}: the input holds no complete token: nothing to write")
    manifest["tokenizer"] = {"vocab_size": max(max_token + 1, 1), "token_ids_recorded": max_token >= 0}
    manifest["datasets"] = {d: {"num_problems": n, "source": source.get("kind"), "command": source.get("command")}
                            for d, n in written.items()}
    T.summarise_manifest(manifest)
    T.write_trace_manifest(out, manifest)
    T.load_traces(out)  # validated: every shard, its schema, positions 0..n-1
    return manifest


def _file_entry(path: Path) -> dict:
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


# ----------------------------------------------------------------------------------------------
# JSON lines


def _fail(path: Path, lineno: int, message: str) -> ConvertError:
    return ConvertError(f"{path}:{lineno}: {message}")


def _check_record(rec: Any, path: Path, lineno: int, num_experts: int | None) -> tuple:
    """(dataset, problem_id, token_idx, layer, experts, weights, extras) of one valid record."""
    if not isinstance(rec, dict):
        raise _fail(path, lineno, f"expected a JSON object, got {type(rec).__name__}")
    for name, kind in JSONL_FIELDS.items():
        if name not in rec:
            raise _fail(path, lineno, f"missing field {name!r} (a record needs {', '.join(JSONL_FIELDS)})")
        if not isinstance(rec[name], kind) or isinstance(rec[name], bool):
            raise _fail(path, lineno, f"field {name!r} has type {type(rec[name]).__name__}")
    experts, probs = rec["experts"], rec["gating_probs"]
    if not experts or len(experts) != len(probs):
        raise _fail(path, lineno, f"'experts' has {len(experts)} ids, 'gating_probs' {len(probs)} weights")
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in experts):
        raise _fail(path, lineno, f"'experts' must be integers, got {experts}")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in probs):
        raise _fail(path, lineno, f"'gating_probs' must be finite numbers, got {probs}")
    if len(set(experts)) != len(experts):
        raise _fail(path, lineno, f"expert id repeated within the record: {experts}")
    high = num_experts if num_experts is not None else math.inf
    bad = [e for e in experts if not 0 <= e < high]
    if bad:
        raise _fail(path, lineno, f"expert id(s) {bad} outside [0, {num_experts if num_experts else 'inf'})")
    if rec["token_idx"] < 0 or rec["layer"] < 0:
        raise _fail(path, lineno, "'token_idx' and 'layer' must be >= 0")
    phase = rec.get("phase")
    if phase is not None and phase not in T.PHASES:
        raise _fail(path, lineno, f"'phase' must be one of {T.PHASES}, got {phase!r}")
    extras = (rec.get("token_id", -1), rec.get("token_text", ""), phase)
    if not isinstance(extras[0], int) or isinstance(extras[0], bool) or not isinstance(extras[1], str):
        raise _fail(path, lineno, "'token_id' must be an integer and 'token_text' a string")
    return (rec["dataset"], str(rec["problem_id"]), rec["token_idx"], rec["layer"], tuple(experts),
            tuple(float(w) for w in probs), extras)


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) of every non-blank line; malformed JSON is an error naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    raise _fail(path, lineno, f"not valid JSON ({err.msg} at column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise ConvertError(f"{path}: not UTF-8 text ({err.reason})") from None


def read_texts(path: str | os.PathLike) -> dict[tuple[str, str], dict]:
    """The companion file: (dataset, problem_id) -> {prompt, generated_text, prompt_tokens}."""
    path = Path(path)
    out: dict[tuple[str, str], dict] = {}
    for lineno, rec in _json_lines(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("dataset"), str) or "problem_id" not in rec:
            raise _fail(path, lineno, "a text record needs 'dataset' and 'problem_id'")
        key = (rec["dataset"], str(rec["problem_id"]))
        if key in out:
            raise _fail(path, lineno, f"problem {key} appears twice")
        for name in ("prompt", "generated_text"):
            if name in rec and not isinstance(rec[name], str):
                raise _fail(path, lineno, f"{name!r} must be a string")
        if "prompt_tokens" in rec and (not isinstance(rec["prompt_tokens"], int) or rec["prompt_tokens"] < 0):
            raise _fail(path, lineno, "'prompt_tokens' must be an integer >= 0")
        out[key] = rec
    return out


def read_jsonl_routing(path: str | os.PathLike, *, num_experts: int | None = None, num_layers: int | None = None,
                       texts: dict | None = None, report: ImportReport | None = None) -> list[ProblemTrace]:
    """The problems of a JSON-lines routing file (module docstring), complete tokens only, problems in
    order of first appearance; ``report`` counts what was skipped."""
    path = Path(path)
    report = report if report is not None else ImportReport()
    tokens: dict[tuple, dict[int, tuple]] = {}  # (dataset, problem, token_idx) -> layer -> (experts, w, extras, line)
    top_k = None
    for lineno, rec in _json_lines(path):
        report.records += 1
        dataset, pid, tidx, layer, experts, weights, extras = _check_record(rec, path, lineno, num_experts)
        if top_k is None:
            top_k = len(experts)
        elif len(experts) != top_k:
            raise _fail(path, lineno, f"top-{len(experts)} record; the first record has top-{top_k}")
        if num_layers is not None and layer >= num_layers:
            raise _fail(path, lineno, f"layer {layer} outside the {num_layers} MoE layers given")
        layers = tokens.setdefault((dataset, pid, tidx), {})
        if layer in layers:
            old = layers[layer]
            if old[:3] != (experts, weights, extras):
                raise _fail(path, lineno, f"({dataset}, {pid}, token {tidx}, layer {layer}) was recorded on line "
                                          f"{old[3]} with other values")
            report.duplicate_records += 1
            continue
        layers[layer] = (experts, weights, extras, lineno)
    if top_k is None:
        raise ConvertError(f"{path}: no records")
    all_layers = sorted({layer for layers in tokens.values() for layer in layers})
    wanted = list(range(num_layers)) if num_layers is not None else all_layers
    if num_layers is None and all_layers != list(range(len(all_layers))):
        raise ConvertError(f"{path}: layers {all_layers} are not 0..L-1; number MoE layers 0..L-1 or pass num_layers")
    if num_experts is None:
        num_experts = 1 + max(e for layers in tokens.values() for rec in layers.values() for e in rec[0])
    by_problem: dict[tuple[str, str], list] = {}
    for (dataset, pid, tidx), layers in tokens.items():
        by_problem.setdefault((dataset, pid), []).append((tidx, layers))
    problems = []
    texts = texts or {}
    for (dataset, pid), items in by_problem.items():
        items.sort(key=lambda item: item[0])
        idx = np.array([t for t, _ in items])
        report.gaps += int(idx[-1] - idx[0] + 1 - len(idx)) + int(idx[0])  # positions never seen, from 0
        kept = []
        for tidx, layers in items:
            if len(layers) != len(wanted):
                report.incomplete_tokens += 1
                report.incomplete_records += len(layers)
                continue
            kept.append((tidx, layers))
        if not kept:
            report.empty_problems.append([dataset, pid])
            continue
        problems.append(_problem_from_records(dataset, pid, kept, wanted, texts.get((dataset, pid)), path, report))
    report.problems, report.tokens = len(problems), sum(len(p.experts) for p in problems)
    return problems


def _problem_from_records(dataset: str, pid: str, kept: list, layers: list[int], text: dict | None, path: Path,
                          report: ImportReport) -> ProblemTrace:
    """One problem's arrays from its complete tokens (``kept``: (token_idx, {layer: record}) in order)."""
    n, top_k = len(kept), len(kept[0][1][layers[0]][0])
    experts = np.zeros((n, len(layers), top_k), np.int64)  # (n, L, k)
    weights = np.zeros((n, len(layers), top_k), np.float32)  # (n, L, k)
    phases = []
    for i, (tidx, recs) in enumerate(kept):
        for j, layer in enumerate(layers):
            experts[i, j], weights[i, j] = recs[layer][0], recs[layer][1]
        token_phases = {recs[layer][2][2] for layer in layers}
        if len(token_phases) > 1:
            raise _fail(path, recs[layers[-1]][3], f"({dataset}, {pid}, token {tidx}): phase differs between layers")
        phases.append(token_phases.pop())
    order = np.argsort(-weights, axis=2, kind="stable")  # (n, L, k): descending weight
    report.reordered_records += int((order != np.arange(top_k)).any(2).sum())
    experts, weights = np.take_along_axis(experts, order, 2), np.take_along_axis(weights, order, 2)
    source = np.array([t for t, _ in kept])
    prompt_tokens = (text or {}).get("prompt_tokens")
    generated = np.array([p == "generated" if p is not None else
                          (tidx >= prompt_tokens if prompt_tokens is not None else True)
                          for p, tidx in zip(phases, source)])
    if np.any(np.diff(generated.astype(np.int8)) < 0):
        raise ConvertError(f"{path}: ({dataset}, {pid}): a prompt token follows a generated token")
    return ProblemTrace(dataset, pid, experts, weights,
                        token_id=np.array([recs[layers[0]][2][0] for _, recs in kept]), generated=generated,
                        source_position=source,
                        token_text=[recs[layers[0]][2][1] for _, recs in kept])


def import_jsonl(path: str | os.PathLike, out_dir: str | os.PathLike, *, texts: str | os.PathLike | None = None,
                 num_experts: int | None = None, num_layers: int | None = None, model: str | None = None,
                 router_scores: str = "unknown", command: str | None = None) -> tuple[dict, ImportReport]:
    """Import a JSON-lines routing file (+ optional companion texts) into ``out_dir``; returns
    (manifest, report)."""
    path = Path(path)
    report = ImportReport()
    text_map = read_texts(texts) if texts is not None else None
    problems = read_jsonl_routing(path, num_experts=num_experts, num_layers=num_layers, texts=text_map, report=report)
    inferred = num_experts is None
    if inferred:
        num_experts = 1 + max(int(p.experts.max()) for p in problems) if problems else 1
    files = [_file_entry(path)] + ([_file_entry(Path(texts))] if texts is not None else [])
    source = {"kind": "jsonl", "files": files,
              "command": command or "python API: routelib.routing.record.convert.import_jsonl",
              "num_experts_inferred": inferred, "report": None}
    layout = {"router_scores": router_scores, "weights_source": "imported: the records' gating_probs"}
    manifest = write_imported(out_dir, problems, num_experts=num_experts, layout=layout, source=source, model=model)
    manifest["source"]["report"] = report.__dict__
    if texts is not None:
        shutil.copyfile(texts, Path(out_dir) / TEXTS_FILE)
        manifest["source"]["texts_file"] = {"file": TEXTS_FILE, "sha256": sha256_file(Path(out_dir) / TEXTS_FILE)}
    T.write_trace_manifest(out_dir, manifest)
    return manifest, report


# ----------------------------------------------------------------------------------------------
# vLLM


def save_vllm_output(path: str | os.PathLike, request_output, *, dataset: str | None = None,
                     problem_id: str | None = None) -> Path:
    """Save one ``vllm.RequestOutput`` (first completion) as the ``.npz`` :func:`read_vllm_file` reads."""
    completion = request_output.outputs[0]
    routed = getattr(completion, "routed_experts", None)
    if routed is None:
        raise ConvertError("the vLLM output has no routed_experts: start the engine with "
                           "LLM(..., enable_return_routed_experts=True) (vLLM Model Runner V2, a GPU build)")
    arrays = {"routed_experts": np.asarray(routed), "prompt_token_ids": np.asarray(request_output.prompt_token_ids),
              "output_token_ids": np.asarray(completion.token_ids)}
    arrays.update({k: np.array(v) for k, v in (("dataset", dataset), ("problem_id", problem_id)) if v is not None})
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def read_vllm_file(path: str | os.PathLike, *, dataset: str | None = None, num_experts: int | None = None,
                   report: ImportReport | None = None) -> ProblemTrace:
    """One request file (.npz with the keys of the module docstring, or .npy: routed_experts alone)."""
    path = Path(path)
    report = report if report is not None else ImportReport()
    report.records += 1
    try:
        if path.suffix == ".npy":
            arrays = {"routed_experts": np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as err:  # not an array file, or one holding Python objects
        raise ConvertError(f"{path}: not a readable .npz/.npy file ({err})") from None
    unknown = sorted(set(arrays) - set(VLLM_KEYS))
    if "routed_experts" not in arrays or unknown:
        raise ConvertError(f"{path}: keys {sorted(arrays)}; expected routed_experts [+ prompt_token_ids, "
                           f"output_token_ids, routed_weights, dataset, problem_id]")
    routed = arrays["routed_experts"]
    if routed.ndim != 3 or not np.issubdtype(routed.dtype, np.integer) or routed.shape[0] == 0:
        raise ConvertError(f"{path}: routed_experts has shape {routed.shape} and dtype {routed.dtype}; expected "
                           f"a non-empty integer array [seq_len, layers, top_k]")
    top_k = routed.shape[2]
    if num_experts is not None and (routed.min() < 0 or routed.max() >= num_experts):
        t, layer, _ = np.argwhere((routed < 0) | (routed >= num_experts))[0]
        raise ConvertError(f"{path}: expert id {routed[t, layer].tolist()} at token {t}, layer {layer} outside "
                           f"[0, {num_experts})")
    if (np.diff(np.sort(routed, axis=2), axis=2) == 0).any():
        raise ConvertError(f"{path}: an expert id repeats within a token's top-{top_k}")
    has_ids = "prompt_token_ids" in arrays
    if has_ids != ("output_token_ids" in arrays):
        raise ConvertError(f"{path}: give both prompt_token_ids and output_token_ids, or neither")
    n = len(routed)
    if has_ids:
        prompt, output = arrays["prompt_token_ids"].reshape(-1), arrays["output_token_ids"].reshape(-1)
        token_ids = np.concatenate([prompt, output])
        if n == len(token_ids) - 1 and len(output):
            report.unrouted_tokens += 1  # the last generated token was never fed back
            token_ids = token_ids[:n]
        elif n != len(token_ids):
            raise ConvertError(f"{path}: routed_experts covers {n} tokens; prompt + output hold {len(prompt)} + "
                               f"{len(output)} = {len(prompt) + len(output)} (expected that, or one fewer)")
        generated = np.arange(n) >= len(prompt)
    else:
        token_ids, generated = np.full(n, -1), np.ones(n, bool)
    if "routed_weights" in arrays:
        weights = arrays["routed_weights"].astype(np.float32)
        if weights.shape != routed.shape or not np.isfinite(weights).all():
            raise ConvertError(f"{path}: routed_weights must be finite with the shape of routed_experts {routed.shape}")
        order = np.argsort(-weights, axis=2, kind="stable")
        report.reordered_records += int((order != np.arange(top_k)).any(2).sum())
        routed, weights = np.take_along_axis(routed, order, 2), np.take_along_axis(weights, order, 2)
    else:
        weights = np.full(routed.shape, 1.0 / top_k, np.float32)
    name = str(arrays["dataset"]) if "dataset" in arrays else dataset
    if not name:
        raise ConvertError(f"{path}: no 'dataset' key in the file: pass dataset= (CLI: --dataset)")
    pid = str(arrays["problem_id"]) if "problem_id" in arrays else path.stem
    report.problems += 1
    report.tokens += n
    return ProblemTrace(name, pid, routed.astype(np.int64), weights, token_ids.astype(np.int64), generated,
                        np.arange(n))


def vllm_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The request files among ``paths`` (a folder gives its .npz/.npy files, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix in (".npz", ".npy"))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    if not out:
        raise ConvertError(f"no .npz/.npy request files in {[str(p) for p in paths]}")
    return out


def _npz_keys(path: Path) -> list[str]:
    """The array names in a request file (a .npy holds routed_experts alone)."""
    if path.suffix == ".npy":
        return ["routed_experts"]
    try:
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    except (OSError, ValueError, EOFError) as err:
        raise ConvertError(f"{path}: not a readable .npz/.npy file ({err})") from None


def import_vllm(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, dataset: str | None = None,
                num_experts: int, model: str | None = None, router_scores: str = "unknown",
                command: str | None = None, extra_source: dict | None = None) -> tuple[dict, ImportReport]:
    """Import vLLM request files (or folders of them) into ``out_dir``; returns (manifest, report)."""
    files = vllm_files(paths)
    report = ImportReport()
    problems = (read_vllm_file(f, dataset=dataset, num_experts=num_experts, report=report) for f in files)
    source = {"kind": "vllm", "files": [_file_entry(f) for f in files], **(extra_source or {}),
              "command": command or "python API: routelib.routing.record.convert.import_vllm"}
    weighted = [f for f in files if "routed_weights" in _npz_keys(f)]
    if weighted and len(weighted) != len(files):
        raise ConvertError(f"{weighted[0]} has routed_weights and {next(f for f in files if f not in weighted)} has "
                           f"none: import files with gate weights and files without them separately")
    layout = {"router_scores": router_scores,
              "weights_source": "imported: routed_weights" if weighted else "not recorded: uniform 1/k"}
    manifest = write_imported(out_dir, problems, num_experts=num_experts, layout=layout, source=source, model=model)
    manifest["source"]["report"] = report.__dict__
    T.write_trace_manifest(out_dir, manifest)
    return manifest, report


# ----------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    """``python -m routelib.routing.record.convert {jsonl,vllm} INPUT... --out DIR [options]``: import routing
    from another tool into a validated trace folder and print what was kept and skipped."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m routelib.routing.record.convert", description=main.__doc__)
    sub = p.add_subparsers(dest="kind", required=True)
    j = sub.add_parser("jsonl", help="per-(token, layer) JSON-lines routing records")
    j.add_argument("input", help="the routing records (.jsonl)")
    j.add_argument("--texts", default=None, help="companion JSON lines: prompts / generated text per problem")
    j.add_argument("--num_layers", type=int, default=None, help="MoE layers 0..L-1 (default: the layers seen)")
    v = sub.add_parser("vllm", help="vLLM request outputs saved as .npz/.npy (see the module docstring)")
    v.add_argument("input", nargs="+", help="request files, or folders of them")
    v.add_argument("--dataset", default=None, help="dataset name for files without a 'dataset' key")
    for q in (j, v):
        q.add_argument("--out", required=True, help="the new trace folder")
        q.add_argument("--num_experts", type=int, default=None, required=q is v,
                       help="experts per MoE layer (ids must lie in [0, E))" + ("" if q is v else "; default: max + 1"))
        q.add_argument("--model", default=None, help="name or path of the model that routed (for the manifest)")
        q.add_argument("--router_scores", default="unknown", help="softmax, sigmoid, ... (default: unknown)")
    args = p.parse_args(argv)
    command = "python -m routelib.routing.record.convert " + shlex.join(argv)
    common = dict(num_experts=args.num_experts, model=args.model, router_scores=args.router_scores, command=command)
    if args.kind == "jsonl":
        _, report = import_jsonl(args.input, args.out, texts=args.texts, num_layers=args.num_layers, **common)
    else:
        _, report = import_vllm(args.input, args.out, dataset=args.dataset, **common)
    print("\n".join([f"{args.out}: imported from {args.kind}"] + report.lines()))
    return 0


if __name__ == "__main__":
    from routelib import cli

    raise SystemExit(cli.run(main))
