"""``python -m routelib.studies.moe_vs_dense {subject,reference}``: train and export the routing subject
(:func:`subject_main`), or run notebook 03's reference run (:func:`routelib.studies.moe_vs_dense.reference.main`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from routelib import cli
from routelib.config import from_params
from routelib.studies.moe_vs_dense import MoEStudyConfig, train_arm, training_batches
from routelib.studies.moe_vs_dense import reference
from routelib.studies.moe_vs_dense.subject import card_eval_sets, export_subject, subject_snapshots


def subject_main(argv: Sequence[str]) -> int:
    """``python -m routelib.studies.moe_vs_dense subject --out data/moe-subject [--field value ...]``: train the
    MoE arm only (no dense baselines) and export it with a model card and its training snapshots. Every
    MoEStudyConfig field is an option (``--num_experts 8``)."""
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
    lm_cfg = cfg.moe_config()
    model, result = train_arm("moe", lm_cfg, cfg, training_batches(cfg))
    snapshots = subject_snapshots(cfg, lm_cfg, Path(result.checkpoint).parent)
    headline, at_context = card_eval_sets(cfg)
    card = export_subject(model, cfg, result, headline, Path(args.out),
                          "python -m routelib.studies.moe_vs_dense " + " ".join(argv), snapshots, at_context)
    print(json.dumps(card["validation_perplexity"], indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return reference.main(argv) if argv[:1] == ["reference"] else subject_main(argv)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
