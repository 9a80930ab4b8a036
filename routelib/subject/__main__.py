"""``python -m routelib.subject pilot --out FILE.csv [--variants mixtral:8,2,0 ...]``: the subject's pilot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from routelib import cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m routelib.subject", description=__doc__)
    parser.add_argument("command", choices=["pilot"])
    parser.add_argument("--out", required=True, help="CSV of held-out losses per variant and mode")
    parser.add_argument("--variants", nargs="+", default=["mixtral:8,2,0", "shared:8,2,512"],
                        help="name:experts,top_k,shared_size")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    from routelib.subject.pilot import PilotConfig
    cli.add_dataclass_options(parser, PilotConfig)
    args = parser.parse_args(argv)
    import torch

    from routelib.io import atomic_write
    from routelib.subject.pilot import run_pilot

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PilotConfig(**cli.dataclass_options(args, PilotConfig))
    table = run_pilot(args.variants, cfg)
    with atomic_write(Path(args.out)) as tmp:
        table.to_csv(tmp, index=False)
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
