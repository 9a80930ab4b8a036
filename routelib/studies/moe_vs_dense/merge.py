"""Notebook 03's reference run completed: the other seeds and the compute-matched arm merged into the
committed folder, the arms' training throughput measured side by side, the gaps with intervals.

The first invocation of the reference run trained and measured every arm of seed 0. Later invocations
(``--only_runs``) trained the other seeds and the compute-matched arm and wrote each run's record
(``final/<run>.json``, full held-out evaluation) and training curve. :func:`merge_reference` brings
them into the reference folder:

- ``perplexity.csv`` gains every run's per-domain perplexity (seed 0's three arms keep their rows);
  ``runs.csv`` lists every record (steps, tokens, training FLOPs, wall time), ``final/`` keeps the records
  as their invocations wrote them, ``history/`` every curve;
- ``gaps.csv``: each comparison per seed (loss difference in nats = log of the perplexity ratio, and
  the perplexity difference) with its mean and 95 % Student-t interval over the seeds;
- ``throughput.csv``: one training step (forward, backward, AdamW) of every arm on the same batch,
  timed round-robin in this one process on one thread (``routelib.bench.compare``): the arms' speeds
  measured like for like, which their training runs (side by side with other jobs, some on 2 threads)
  were not; ``comparison.csv``'s ``train_tokens_per_s`` is replaced by it;
- ``flops_split.csv`` gains ``ffn_share_all``: the FFN's share of *all* forward FLOPs, LM head
  included, beside ``ffn_share`` (of the non-embedding FLOPs);
- the invocations of the merged runs join ``invocations.json``, and the manifest is written anew.

    python -m routelib.studies.moe_vs_dense merge --runs data/reference/03_moe_speedup_in_progress
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import torch

from routelib import paths
from routelib.errors import ConfigError
from routelib.io import atomic_write_bytes
from routelib.reference import INVOCATIONS, InvocationLog, load_manifest, load_records, write_manifest
from routelib.studies.moe_vs_dense import ARMS, MATCHED, MoEStudyConfig, flops_split, training_batches
from routelib.studies.moe_vs_dense.reference import parse_run_name, seed_gaps

def train_step(lm_cfg, cfg: MoEStudyConfig, seed: int = 0):
    """A function doing one training step (forward, loss with the router losses, backward, AdamW) of a
    fresh model of ``lm_cfg`` on the first batch of ``cfg``'s training order, as ``routelib.train`` does."""
    from routelib.models import LM
    from routelib.train import lm_loss

    torch.manual_seed(seed)
    model = LM(lm_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x, y = training_batches(cfg)(0)  # (B, T), (B, T)

    def step() -> None:
        loss, _ = lm_loss(model, x, y)  # the training loop's loss: next-token + the (already weighted) router losses
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def interleaved_throughput(cfg: MoEStudyConfig, arms: tuple[str, ...] = ARMS, rounds: int = 5,
                           min_time_s: float = 2.0, threads: int = 1) -> pd.DataFrame:
    """Training tokens per second of each arm, timed round-robin in this process on ``threads`` torch
    threads (``routelib.bench.compare``: ``rounds`` rounds, each at least ``min_time_s`` per arm;
    medians over the pooled samples). Columns: arm, median_ms, tokens_per_s, speedup vs the first arm,
    threads, rounds."""
    from routelib.bench import compare
    from routelib.reference import torch_threads

    arms_cfg = cfg.arm_configs()
    tokens = cfg.batch_size * cfg.seq_len
    with torch_threads(threads):
        fns = {arm: train_step(arms_cfg[arm], cfg) for arm in arms}
        table = compare(fns, items=tokens, rounds=rounds, min_time_s=min_time_s, warmup=2)
    return pd.DataFrame({"arm": table["name"], "median_ms": table["median_ms"],
                         "tokens_per_s": table["items_per_s"], "speedup": table["speedup"],
                         "threads": threads, "rounds": rounds})


def merge_reference(runs_dir: str | Path, out_dir: str | Path, *, rounds: int = 5, min_time_s: float = 2.0,
                    threads: int = 1, command: str | None = None) -> dict:
    """Merge the records and curves of ``runs_dir`` (``--only_runs`` output) into the reference folder
    ``out_dir`` (see the module docstring); measures throughput; writes the new manifest and returns it.
    ConfigError if a run in ``runs_dir`` is already in ``out_dir`` or its shape differs from the manifest's."""
    out, src = paths.in_repo(out_dir), paths.in_repo(runs_dir)
    manifest = load_manifest(out)  # the committed files as they were written
    records = load_records(src)
    if not records:
        raise ConfigError(f"{src}: no run records (final/*.json) to merge")
    cfg = MoEStudyConfig(**manifest["params"]["study_config"])
    ppl = pd.read_csv(out / "perplexity.csv")
    have = {(a, s) for a, s in zip(ppl["arm"], ppl["seed"])}
    new_rows = []
    for name, rec in records.items():
        arm, seed = parse_run_name(name)
        if (arm, seed) in have:
            raise ConfigError(f"{name}: already in {out / 'perplexity.csv'}; merge each run once")
        new_rows += [dict(arm=arm, seed=seed, domain=d, perplexity=v) for d, v in rec["perplexity"].items()]
    log = InvocationLog(out, command)
    ppl = pd.concat([ppl, pd.DataFrame(new_rows)], ignore_index=True).sort_values(["arm", "seed"], kind="stable")
    ppl.to_csv(out / "perplexity.csv", index=False)
    pd.DataFrame([{"run": n, **{k: v for k, v in r.items() if not isinstance(v, dict)}}
                  for n, r in records.items()]).to_csv(out / "runs.csv", index=False)
    for curve in sorted((src / "history").glob("*.csv")):
        shutil.copyfile(curve, out / "history" / curve.name)
    (out / "final").mkdir(exist_ok=True)
    for name in records:  # each run's own record, as its invocation wrote it
        shutil.copyfile(src / "final" / f"{name}.json", out / "final" / f"{name}.json")
    seed_gaps(ppl).to_csv(out / "gaps.csv", index=False)
    speed = interleaved_throughput(cfg, rounds=rounds, min_time_s=min_time_s, threads=threads)
    speed.to_csv(out / "throughput.csv", index=False)
    comparison = pd.read_csv(out / "comparison.csv", index_col=0)
    comparison["train_tokens_per_s"] = speed.set_index("arm")["tokens_per_s"].reindex(comparison.index)
    comparison.to_csv(out / "comparison.csv")
    split = pd.DataFrame({arm: flops_split(c, cfg.seq_len) for arm, c in cfg.arm_configs().items()}).T
    split.to_csv(out / "flops_split.csv")
    merged = json.loads((src / INVOCATIONS).read_text()) if (src / INVOCATIONS).is_file() else []
    everything = log.finish()
    ids = {e.get("id") for e in everything}
    everything = sorted(everything + [e for e in merged if e.get("id") not in ids], key=lambda e: e["started"])
    atomic_write_bytes(out / INVOCATIONS, (json.dumps(everything, indent=2) + "\n").encode())
    params = dict(manifest["params"], seeds=sorted(set(int(s) for s in ppl["seed"])),
                  matched_runs=sorted(n for n in records if n.startswith(MATCHED)),
                  throughput=dict(rounds=rounds, min_time_s=min_time_s, threads=threads))
    extra = {k: v for k, v in manifest.items() if k not in ("command", "params", "environment", "wall_s", "files",
                                                            "commit", "dirty")}
    summary = InvocationLog.summary(everything)
    return write_manifest(out, command=f"{manifest['command']} + {log.command}", params=params,
                          wall_s=summary.pop("wall_s"), extra={**extra, **summary, "merged_from": str(runs_dir)})


__all__ = ["interleaved_throughput", "merge_reference", "train_step"]
