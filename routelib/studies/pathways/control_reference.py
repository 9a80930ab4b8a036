"""Claim (d) on notebook 01's reference model: ``python -m routelib.studies.pathways control-reference``.

The reference run (:mod:`routelib.studies.pathways.reference`, notebook 01 section 7) keeps its held-out
routing samples but not its model, and routers + MLPs were trained, so router weights alone would not give
its hidden states. This command re-makes the model of its first main run (``glbl-coactivation-s0``):

- the configuration and settings are the committed manifest's, the neuron grouping the committed one
  (``groupings/<run>.npz``, as a resumed reference run reads it back), and the run is trained by the
  reference run's own code (``reference.train_and_record``: the same evaluations, stop rule and
  checkpoints, on the manifest's thread count unless ``--threads`` says otherwise);
- its record is compared with the committed ``final/<run>.json``, field by field (the training speed
  left out): the tables' ``summary.json`` says whether they are equal and lists any difference;
- then section 9's measurement runs on it as notebook 01 runs it on its own fine-tune
  (:mod:`routelib.studies.pathways.control_content`: :class:`~.control_content.ControlContentConfig` with
  the run's seed, ``held_out_windows``, ``capture``, ``run``, ``variance_shares``), and its tables go to
  :data:`CONTROL_DIR` as small CSV files beside ``summary.json``, ``invocations.json`` and a
  ``manifest.json`` (command, commit, environment, wall time, sha256 of every file), written last.

Every file is written atomically. Training checkpoints sit in the work folder (``--work``, default
:data:`WORK_DIR`, not committed): an interrupted invocation resumes training from the newest one, and a
finished training is only re-evaluated. Notebook 01 reads the tables with :func:`load_control_reference_if_made`.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd

from routelib import cli, paths
from routelib.errors import ConfigError
from routelib.io import atomic_write_bytes
from routelib.reference import (
    InvocationLog,
    ReferenceError,
    load_if_made,
    load_manifest,
    load_records,
    torch_threads,
    write_manifest,
)
from routelib.studies.pathways import control_content as cc
from routelib.studies.pathways import load_base
from routelib.studies.pathways import reference as R

CONTROL_DIR = f"{R.REFERENCE_DIR}/control_content"  # committed tables of claim (d) on the reference model
WORK_DIR = "runs/01_reference_control"  # the re-trained run's checkpoints and files (not committed)
COMMAND = "python -m routelib.studies.pathways control-reference"
TABLES = ("probes", "angles", "clusters", "random_control", "variance_shares")  # one CSV each
UNCOMPARED = ("train_tokens_per_s",)  # record fields that measure the machine, not the run


def compare_records(got: dict, committed: dict) -> dict:
    """{field: {"got", "committed"}} for every field of two run records (:func:`reference.train_and_record`)
    whose JSON text differs, :data:`UNCOMPARED` fields left out; empty when they are bit-equal."""
    keys = [k for k in dict.fromkeys([*committed, *got]) if k not in UNCOMPARED]
    def text(record: dict, key: str) -> str:  # NaN equals NaN, floats exactly
        return json.dumps(record.get(key), sort_keys=True)

    return {k: {"got": got.get(k), "committed": committed.get(k)} for k in keys if text(got, k) != text(committed, k)}


def retrain(ref: dict, run: str, tokenizer, work_dir: str = WORK_DIR, reference_dir: str = R.REFERENCE_DIR):
    """(record, trained model) of run ``run`` of the reference run ``ref`` (read from ``reference_dir``),
    trained again as the reference run trained it (see the module docstring) with its files and checkpoints
    under ``work_dir``; ``tokenizer``: the model's."""
    if run not in ref["runs"].index:
        raise ReferenceError(f"run {run!r} is not in the reference run; runs: {', '.join(ref['runs'].index)}")
    row = ref["runs"].loc[run]
    spec = R.RunSpec(str(row["arm"]), str(row["grouping"]), int(row["seed"]))
    cfg, settings = dataclasses.replace(ref["cfg"], out_dir=str(work_dir), device="cpu"), ref["settings"]
    work = paths.in_repo(work_dir)
    for sub in ("history", "samples", "groupings"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    grouping = paths.in_repo(reference_dir) / "groupings" / f"{run}.npz"
    if grouping.is_file() and not (work / "groupings" / grouping.name).is_file():  # the grouping it trained with
        atomic_write_bytes(work / "groupings" / grouping.name, grouping.read_bytes())
    curve, eval_data = R.reference_data(cfg, settings, tokenizer)
    base = R.base_perplexity(cfg, curve, eval_data)
    return R.train_and_record(spec, cfg, settings, work, curve, eval_data, base)


def _write_csv(path, table: pd.DataFrame) -> None:
    atomic_write_bytes(path, table.to_csv(index=False).encode())


def control_reference(out_dir: str = CONTROL_DIR, work_dir: str = WORK_DIR, threads: int = 0,
                      command: str | None = None, reference_dir: str = R.REFERENCE_DIR,
                      control_cfg: cc.ControlContentConfig | None = None) -> dict:
    """Re-train the first main run of the reference run in ``reference_dir`` (:func:`retrain`), check its
    record against the committed one, measure section 9's tables on it and write them to ``out_dir`` with
    a manifest (returned). ``threads``: torch CPU threads (0: the reference manifest's count, on which its
    record was made); ``control_cfg``: the measurement (None: notebook 01's, with the run's seed)."""
    ref = R.load_reference(reference_dir)  # every committed file checked against its manifest
    run = ref["summary"]["main_runs"][0]
    out = paths.in_repo(out_dir)
    log = InvocationLog(out, command)
    recorded = ref["manifest"]["environment"]["torch_threads"]
    cfg = ref["cfg"]
    with torch_threads(threads or recorded):
        _, tok = load_base(cfg)
        record, routed = retrain(ref, run, tok, work_dir, reference_dir)
        differences = compare_records(json.loads(json.dumps(record)), load_records(reference_dir)[run])
        if differences:
            print(f"warning: the re-trained {run} differs from the committed record in {', '.join(differences)}",
                  flush=True)
        control_cfg = control_cfg or cc.ControlContentConfig(seed=int(ref["runs"].loc[run, "seed"]))
        windows = cc.held_out_windows(cfg, tok, control_cfg.tokens_per_domain, control_cfg.split)
        inputs = cc.capture(routed, windows)
        tables, summary = cc.run(inputs, control_cfg, tok)
        tables["variance_shares"] = cc.variance_shares(inputs, control_cfg.definitions)
    for name in TABLES:
        _write_csv(out / f"{name}.csv", tables[name])
    facts = {"run": run, "data": summary, "record_equal": not differences, "record_differences": differences,
             "record_uncompared": list(UNCOMPARED), "threads": threads or recorded, "recorded_threads": recorded,
             "stop_step": record["stop_step"], "ppl_trained": record["ppl_trained"]["overall"]}
    atomic_write_bytes(out / "summary.json", (json.dumps(facts, indent=1) + "\n").encode())
    invocations = InvocationLog.summary(log.finish())
    params = {"run": run, "control_config": dataclasses.asdict(control_cfg), "study_config": dataclasses.asdict(cfg),
              "settings": dataclasses.asdict(ref["settings"]), "work_dir": str(work_dir)}
    return write_manifest(out, command=log.command, params=params, wall_s=invocations.pop("wall_s"),
                          extra={**log.code, **invocations})


# ----------------------------------------------------------------------------------- reading it
def load_control_reference(out_dir: str = CONTROL_DIR) -> dict:
    """The committed tables (every file checked against the manifest's sha256): ``manifest``, ``summary``
    and the tables of :data:`TABLES`, as :func:`.control_content.run` returned them (``verdicts``,
    ``random_control_lines`` and ``plot_probes`` take them)."""
    out = paths.in_repo(out_dir)
    manifest = load_manifest(out)
    tables = {name: pd.read_csv(out / f"{name}.csv") for name in TABLES}
    return dict(manifest=manifest, summary=json.loads((out / "summary.json").read_text()), **tables)


def load_control_reference_if_made(out_dir: str = CONTROL_DIR) -> dict | None:
    """:func:`load_control_reference`, or None while the tables have not been made (no manifest yet)."""
    return load_if_made(load_control_reference, out_dir)


def control_reference_header(cref: dict | None) -> str:
    """How the tables were made (command, commit, machine, wall time), the re-trained run and whether its
    record equals the committed one, and the measured data; for ``None`` the one line saying how to make them."""
    if cref is None:
        return f"claim (d) on the reference model not yet measured: {COMMAND} --threads 1"
    man, s = cref["manifest"], cref["summary"]
    env = man["environment"]
    if s["record_equal"]:
        check = f"its record equals the committed one in every field but {', '.join(s['record_uncompared'])}"
    else:
        check = "its record DIFFERS from the committed one in " + ", ".join(s["record_differences"])
    dirty = " (with uncommitted changes)" if man["dirty"] else ""
    machine = (f"commit {str(man['commit'])[:10]}{dirty}; {env['device']}, torch {env['torch']}, {s['threads']} "
               f"thread(s); {man['wall_s'] / 60:.0f} min of process wall time")
    model = (f"model: reference run {s['run']} trained again from its manifest (stopped at step {s['stop_step']}, "
             f"held-out perplexity {s['ppl_trained']:.2f}); {check}")
    return "\n".join([f"command: {man['command']}", machine, model, s["data"]])


def main(argv: list[str] | None = None) -> int:
    """``python -m routelib.studies.pathways control-reference [--out DIR] [--work DIR] [--threads N]``:
    claim (d) of notebook 01's section 9 on the reference model (:func:`control_reference`)."""
    parser = cli.ArgumentParser(prog="python -m routelib.studies.pathways", description=main.__doc__)
    parser.add_argument("command", choices=["control-reference"], help="control-reference: the tables (above)")
    parser.add_argument("--out", default=CONTROL_DIR, help=f"results folder (default {CONTROL_DIR})")
    parser.add_argument("--work", default=WORK_DIR, help=f"checkpoints and the re-trained run's files (default {WORK_DIR})")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the reference manifest's count)")
    args = parser.parse_args(argv)
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads}: need >= 0")
    manifest = control_reference(args.out, args.work, args.threads)
    print(f"claim (d) tables written to {args.out} ({len(manifest['files'])} files)")
    return 0


__all__ = ["CONTROL_DIR", "TABLES", "WORK_DIR", "compare_records", "control_reference", "control_reference_header",
           "load_control_reference", "load_control_reference_if_made", "main", "retrain"]
