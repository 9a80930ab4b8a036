"""Collection split over processes and machines: each process collects its own part of the problems
into its own folder, and one command merges the parts into one validated trace folder.

``python -m routelib.routing.record.collect ... --out traces/mixtral --shard i/n`` (or ``--shard auto``
under torchrun, from ``RANK`` and ``WORLD_SIZE``) collects the batches b with b % n == i - 1 into
``traces/mixtral.shard-<i>-of-<n>/`` -- a complete, resumable trace folder of its own: two processes
never write the same file, and a crashed part resumes alone. The batches (``batch_size`` consecutive
problems) are the ones a single process would run, with the same padding and, when sampling, the same
seeds, so the merged folder equals a one-process collection row for row.

``python -m routelib.routing.record.shards traces/mixtral`` merges every ``traces/mixtral.shard-*-of-<n>``
folder (all n parts must be there and complete) into ``traces/mixtral``: it checks that the parts come
from the same model, tokenizer, prompts and settings, copies their shard files (whose names, the
dataset and the first problem index, never collide), writes one manifest that lists every shard and
records the part folders it came from (with their manifests' sha256), and validates the result with
:func:`routelib.routing.record.traces.load_traces`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from routelib.errors import ConfigError
from routelib.io import atomic_write, sha256_file
from routelib.routing.record import traces as T

PART = re.compile(r"\.shard-(\d+)-of-(\d+)$")
SAME = ("num_problems", "prompts_sha256", "template", "generation", "source")  # a dataset's settings every part shares


def shard_dir(out: str | os.PathLike, i: int, n: int) -> Path:
    """The folder of part ``i`` of ``n`` beside ``out``."""
    out = Path(out)
    return out.with_name(f"{out.name}.shard-{i}-of-{n}")


def shard_from_env(env: dict | None = None) -> tuple[int, int]:
    """``--shard auto``: (RANK + 1, WORLD_SIZE) as torchrun (or any launcher that sets them) gives them."""
    env = os.environ if env is None else env
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise ConfigError("--shard auto needs RANK and WORLD_SIZE in the environment (torchrun sets them)") from None
    return rank + 1, world


def part_dirs(out: str | os.PathLike) -> list[Path]:
    """The part folders of ``out``, ordered by part; ConfigError unless they are parts 1..n of one n."""
    out = Path(out)
    found = {}
    for path in out.parent.glob(f"{out.name}.shard-*-of-*"):
        m = PART.search(path.name)
        if m and path.is_dir():
            found[(int(m.group(1)), int(m.group(2)))] = path
    if not found:
        raise ConfigError(f"no part folders {out.name}.shard-<i>-of-<n> beside {out}")
    sizes = {n for _, n in found}
    if len(sizes) != 1:
        raise ConfigError(f"{out}: parts of different splits ({sorted(sizes)} processes); keep one")
    (n,) = sizes
    missing = [i for i in range(1, n + 1) if (i, n) not in found]
    if missing:
        raise ConfigError(f"{out}: part(s) {missing} of {n} are missing; run them (--shard i/{n}) first")
    return [found[(i, n)] for i in range(1, n + 1)]


def merge(out: str | os.PathLike) -> dict:
    """Merge the part folders of ``out`` into ``out`` (module docstring); returns the manifest."""
    out = Path(out)
    parts = part_dirs(out)
    manifests = [T.read_manifest(p) for p in parts]
    first = manifests[0]
    for path, m in zip(parts[1:], manifests[1:]):
        for key in ("model", "tokenizer"):
            a = {k: v for k, v in first[key].items() if k != "device_map"}
            b = {k: v for k, v in m[key].items() if k != "device_map"}
            if a != b:
                raise ConfigError(f"{path.name}: its {key} differs from {parts[0].name}'s; parts must come from one run")
        if m["layout"] != first["layout"] and m["layout"] is not None and first["layout"] is not None:
            raise ConfigError(f"{path.name}: its layout differs from {parts[0].name}'s")
        if set(m["datasets"]) != set(first["datasets"]):
            raise ConfigError(f"{path.name}: datasets {sorted(m['datasets'])}, {parts[0].name}: {sorted(first['datasets'])}")
        for ds, info in m["datasets"].items():
            if any(info.get(k) != first["datasets"][ds].get(k) for k in SAME):
                raise ConfigError(f"{path.name}: the {ds} prompts or settings differ from {parts[0].name}'s")
    shards = []
    out.mkdir(parents=True, exist_ok=True)
    for path, m in zip(parts, manifests):
        for entry in m["shards"]:
            T.check_shard_file(path / entry["file"], entry)
            target = out / entry["file"]
            if target.exists() and sha256_file(target) == entry["sha256"]:
                shards.append(entry)  # a merge run again: the same file is already there
                continue
            with atomic_write(target) as tmp:
                shutil.copyfile(path / entry["file"], tmp)
            shards.append(entry)
    shards.sort(key=lambda e: (e["dataset"], min(e["problem_indices"])))
    datasets = {ds: {k: v for k, v in info.items() if k not in ("shard", "counts", "command", "resumed_by")}
                for ds, info in first["datasets"].items()}
    for ds in datasets:
        datasets[ds]["commands"] = [m["datasets"][ds].get("command") for m in manifests]
    layout = next((m["layout"] for m in manifests if m["layout"] is not None), None)
    manifest = {**first, "layout": layout, "datasets": datasets, "shards": shards,
                "merged_from": [{"folder": p.name, "manifest_sha256": sha256_file(p / T.MANIFEST)} for p in parts],
                "command": f"python -m routelib.routing.record.shards {out}"}
    T.summarise_manifest(manifest)
    incomplete = [ds for ds, info in manifest["datasets"].items() if not info["counts"]["complete"]]
    if incomplete:
        raise ConfigError(f"{out}: the parts do not cover every problem of {incomplete}; finish the parts first")
    T.write_trace_manifest(out, manifest)
    T.load_traces(out)  # validates every shard against the merged manifest
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m routelib.routing.record.shards <out>``: merge the part folders ``<out>.shard-<i>-of-<n>``."""
    from routelib import cli

    p = cli.ArgumentParser(prog="python -m routelib.routing.record.shards", description=main.__doc__)
    p.add_argument("out", help="the trace folder the parts were collected for")
    args = p.parse_args(argv)
    manifest = merge(args.out)
    print(json.dumps(manifest["totals"]))
    return 0


if __name__ == "__main__":
    from routelib import cli

    raise SystemExit(cli.run(main))
