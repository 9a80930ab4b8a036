"""``python -m routelib.studies.moe_vs_dense {subject,reference}``: train and export the routing subject
(:func:`subject_main`), or run notebook 03's reference run (:func:`routelib.studies.moe_vs_dense.reference.main`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from routelib import cli
from routelib.config import from_params
from routelib.studies.moe_vs_dense import MoEStudyConfig
from routelib.studies.moe_vs_dense import reference
from routelib.studies.moe_vs_dense.subject import train_and_export


def subject_main(argv: Sequence[str]) -> int:
    """``python -m routelib.studies.moe_vs_dense subject --out data/moe-subject [--field value ...]``: train the
    MoE arm only (no dense baselines) and export it with a model card and its training snapshots. Every
    MoEStudyConfig field is an option (``--num_experts 8``). Under ``torchrun`` the ranks train
    data-parallel on the same global batch and rank 0 alone exports."""
    parser = cli.ArgumentParser(prog="python -m routelib.studies.moe_vs_dense", description=subject_main.__doc__)
    parser.add_argument("command", choices=["subject"])
    parser.add_argument("--out", required=True, help="export folder (e.g. data/moe-subject)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    cli.add_dataclass_options(parser, MoEStudyConfig, skip=("dense_baselines",))
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = from_params(MoEStudyConfig, {**cli.dataclass_options(args, MoEStudyConfig), "dense_baselines": False})
    card = train_and_export(cfg, Path(args.out), "python -m routelib.studies.moe_vs_dense " + " ".join(argv))
    if card is not None:  # None: a rank other than 0 under torchrun
        print(json.dumps(card["validation_perplexity"], indent=2))
    return 0


def merge_main(argv: Sequence[str]) -> int:
    """``python -m routelib.studies.moe_vs_dense merge --runs DIR [--out DIR] [--rounds 5] [--threads 1]``: merge
    the runs that ``reference --only_runs`` wrote to DIR into the committed reference folder, measure the arms'
    training throughput side by side, write the gaps over seeds and a new manifest
    (:func:`routelib.studies.moe_vs_dense.merge.merge_reference`)."""
    from routelib.studies.moe_vs_dense.merge import merge_reference

    parser = cli.ArgumentParser(prog="python -m routelib.studies.moe_vs_dense", description=merge_main.__doc__)
    parser.add_argument("command", choices=["merge"])
    parser.add_argument("--runs", required=True, help="folder of final/<run>.json and history/<run>.csv to merge")
    parser.add_argument("--out", default=str(reference.REFERENCE_DIR), help="the reference folder (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds of the throughput measurement")
    parser.add_argument("--min_time_s", type=float, default=2.0, help="seconds per arm and round, at least")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the throughput measurement")
    args = parser.parse_args(argv)
    manifest = merge_reference(args.runs, args.out, rounds=args.rounds, min_time_s=args.min_time_s,
                               threads=args.threads, command="python -m routelib.studies.moe_vs_dense " + " ".join(argv))
    print(reference.reference_verdict(reference.load_reference(args.out)))
    return 0 if manifest else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"reference": reference.main, "merge": merge_main}
    return commands.get(argv[0] if argv else "", subject_main)(argv)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
