"""Reference runs (docs/design.md §7): a study run once at a scale that can decide its question, its
small result files committed under ``data/reference/<notebook>/`` beside a ``manifest.json`` that
says exactly how they were made -- the command, the commit, the parameters, the environment, the
wall time -- and the sha256 of every result file. :func:`load_manifest` checks those hashes, so a
notebook never shows numbers that are not the ones the run wrote.

Shared plumbing of the studies' reference runs: the invocation log (:class:`InvocationLog`; a run
resumed or trained by processes side by side has several invocations), splitting runs into parts for
processes side by side (:func:`split_parts`, :func:`parse_part`), the command line every study's
reference run shares (:func:`reference_main`), reading a run that may not be made yet
(:func:`load_if_made`), reproducing on the recorded thread count (:func:`torch_threads`), per-run
records written as runs finish (:func:`write_record`, :func:`load_records`), and the t-interval of a
difference over seeds (:func:`t_interval`).
"""

from __future__ import annotations

import argparse
import calendar
import fcntl
import json
import math
import os
import platform
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from routelib import paths
from routelib.errors import RoutelibError
from routelib.io import atomic_write_bytes, is_temporary, sha256_file

MANIFEST = "manifest.json"
INVOCATIONS = "invocations.json"  # every invocation of a (resumed or split) reference run


class ReferenceError(RoutelibError, ValueError):
    """A reference-run folder is missing, incomplete or does not match its manifest."""


def git_commit() -> dict:
    """The repository's HEAD commit and whether routelib's tracked files differ from it (``dirty``;
    None outside git): the code a run executes."""
    def run(*args):
        return subprocess.run(["git", *args], cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=30)

    try:
        head = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", "routelib")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip() or None, "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def environment() -> dict:
    """Versions and hardware that shape the numbers: python, torch, transformers, device, threads."""
    import torch

    try:
        import transformers
        tf = transformers.__version__
    except ImportError:
        tf = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": tf,
            "device": gpu or f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def command_line() -> str:
    """The command that started this process, as a user would type it (``python -m ...``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None and spec.name else f"python {sys.argv[0]}"
    return " ".join([head, *sys.argv[1:]])


def write_manifest(out_dir: str | os.PathLike, *, command: str, params: dict, wall_s: float,
                   extra: dict | None = None) -> dict:
    """Hash every result file in ``out_dir`` (all files but the manifest) and write the manifest
    atomically. Returns it."""
    out = paths.in_repo(out_dir)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST and not is_temporary(p))
    manifest = {
        "command": command, **git_commit(), "params": params, "environment": environment(),
        "wall_s": round(float(wall_s), 1),
        "files": {p.relative_to(out).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
        **(extra or {}),
    }
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n").encode())
    return manifest


def reference_made(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a finished reference run (its manifest exists)."""
    return (paths.in_repo(out_dir) / MANIFEST).is_file()


def load_manifest(out_dir: str | os.PathLike) -> dict:
    """The manifest of a reference-run folder after checking that every listed file exists with its
    recorded sha256; raises :class:`ReferenceError` naming the first file that does not."""
    out = paths.in_repo(out_dir)
    path = out / MANIFEST
    if not path.is_file():
        raise ReferenceError(f"{path}: no manifest; this folder holds no finished reference run")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReferenceError(f"{path}: not valid JSON ({err})") from None
    for name, meta in manifest.get("files", {}).items():
        f = out / name
        if not f.is_file():
            raise ReferenceError(f"{f}: listed in {path.name} but missing")
        if sha256_file(f) != meta["sha256"]:
            raise ReferenceError(f"{f}: sha256 differs from {path.name}; the file was changed after the run")
    return manifest


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class InvocationLog:
    """The invocations of one reference run, in ``out_dir/invocations.json``: a run that is resumed,
    or trained by several processes side by side, has several. Creating the log adds this process
    (command, commit, start, pid; ``finished`` null until :meth:`finish`), so an interrupted
    invocation stays on record. Every write re-reads the file: processes side by side share it."""

    def __init__(self, out_dir: str | os.PathLike, command: str | None = None):
        self.path = paths.in_repo(out_dir) / INVOCATIONS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.code = git_commit()  # the code this invocation runs
        self.command = command or command_line()
        self._t0 = time.perf_counter()
        self.entry = dict(command=self.command, **self.code, started=utc_now(), pid=os.getpid(), id=uuid.uuid4().hex[:8],
                          finished=None, wall_s=None)
        self._write(self.entry)

    def _write(self, entry: dict) -> list[dict]:
        """Add ``entry`` to the list, or replace the one with the same ``id`` (older logs: start and pid),
        holding a lock on the folder (no other invocation writes in between). Returns the list."""
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            invocations = json.loads(self.path.read_text()) if self.path.is_file() else []
            key = lambda e: e.get("id") or (e.get("started"), e.get("pid"))  # noqa: E731
            same = [k for k, e in enumerate(invocations) if key(e) == key(entry)]
            if same:
                invocations[same[0]] = entry
            else:
                invocations.append(entry)
            invocations.sort(key=lambda e: e["started"])  # stable: same-second starts keep their order
            atomic_write_bytes(self.path, (json.dumps(invocations, indent=2) + "\n").encode())
        finally:
            os.close(folder)  # releases the lock
        return invocations

    def finish(self) -> list[dict]:
        """Mark this invocation finished with its wall time; returns every invocation so far."""
        return self._write({**self.entry, "finished": utc_now(), "wall_s": round(time.perf_counter() - self._t0, 1)})

    @staticmethod
    def summary(invocations: list[dict]) -> dict:
        """Manifest fields for the whole run: ``wall_s`` (the finished invocations' wall times summed),
        how many invocations there were, when the first started and the last finished, and
        ``span_s``, the clock time between those two (side-by-side invocations overlap in it)."""
        seconds = lambda stamp: calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))  # noqa: E731
        first, last = invocations[0]["started"], invocations[-1]["finished"]
        return dict(wall_s=sum(i["wall_s"] or 0.0 for i in invocations), invocations=len(invocations),
                    first_started=first, last_finished=last, span_s=seconds(last) - seconds(first) if last else None,
                    wall_s_note="sum of the invocations' wall times (side-by-side ones add up); "
                                "interrupted invocations (finished: null) are not counted")


# ------------------------------------------------------------------------- runs side by side
def split_parts(items: list, part: tuple[int, int], cost: Callable[[Any], float]) -> list:
    """Part ``i`` of ``n`` (1-based) of ``items``: dealt most costly first to the part with the least
    cost so far (ties: the lower part), so the parts take about equal time; every item lands in exactly
    one part, and each part keeps the order of ``items``."""
    i, n = part
    load, mine = [0.0] * n, set()
    for k in sorted(range(len(items)), key=lambda k: -cost(items[k])):  # stable among equal costs
        j = load.index(min(load))
        load[j] += cost(items[k])
        if j == i - 1:
            mine.add(k)
    return [item for k, item in enumerate(items) if k in mine]


def parse_part(text: str) -> tuple[int, int]:
    """``--part i/n`` (an argparse type): ``"1/2"`` -> (1, 2), with 1 <= i <= n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected i/n, e.g. 1/2") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= i <= n")
    return i, n


def reference_parser(prog: str, description: str | None, out: str) -> argparse.ArgumentParser:
    """The command line every study's reference run shares -- ``reference [--out DIR] [--part i/n |
    --only_runs a,b] [--threads N]`` -- as a :class:`routelib.cli.ArgumentParser` (errors are one line);
    the study adds its dataclass options and reads these back with :func:`reference_invocation`."""
    from routelib import cli

    parser = cli.ArgumentParser(prog=prog, description=description)
    parser.add_argument("command", choices=["reference"], help="reference: the reference run (below)")
    parser.add_argument("--out", default=out, help=f"results folder (default {out})")
    parser.add_argument("--part", type=parse_part, default=None, help="train only part i of n of the runs, e.g. 1/2")
    parser.add_argument("--only_runs", default="", help="train only these runs (comma list of run names)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser


def reference_invocation(args: argparse.Namespace) -> tuple[tuple[int, int] | None, tuple[str, ...]]:
    """Check the shared options of :func:`reference_parser` and set torch's CPU threads (``--threads``);
    returns (part, only_runs)."""
    from routelib.errors import ConfigError

    if args.part and args.only_runs:
        raise ConfigError("give --part or --only_runs, not both")
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads}: need >= 0")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args.part, tuple(r for r in args.only_runs.split(",") if r)


# ------------------------------------------------------------------- the skeleton of every study's run
def load_if_made(load: Callable[[str | os.PathLike], dict], out_dir: str | os.PathLike) -> dict | None:
    """``load(out_dir)`` (a study's hash-checked reader), or None while the run has not been made (no
    manifest yet): what a notebook calls so that it runs before the reference run exists."""
    return load(out_dir) if reference_made(out_dir) else None


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block on ``n`` torch CPU threads (None or 0: unchanged), restoring the count after it: a
    reproduction on the thread count the manifest recorded, since CPU results depend on it."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference_main(argv: Sequence[str] | None, *, prog: str, description: str | None, out: str, config: type,
                   settings: type, run: Callable[..., dict | None], report: Callable[[dict, str], None],
                   defaults: dict[str, Any] | None = None, skip: Sequence[str] = (),
                   config_extra: Callable[[argparse.Namespace], dict] | None = None) -> int:
    """The command every study's reference run shares: ``reference [--out DIR] [--part i/n | --only_runs a,b]
    [--threads N] [--<field> value ...]`` (:func:`reference_parser`), one option per field of the study's
    ``config`` dataclass (defaults: ``defaults``; fields in ``skip`` left out) and of its ``settings``
    dataclass; then ``run(cfg, settings, out_dir, part=..., only_runs=...)``, and ``report(manifest,
    out_dir)`` when the run wrote its manifest (a ``--part`` invocation only trains). ``config_extra(args)``
    adds config values derived from the shared options (e.g. the thread count)."""
    from routelib import cli
    from routelib.config import from_params

    parser = reference_parser(prog, description, out)
    cli.add_dataclass_options(parser, config, skip=skip, defaults=defaults)
    cli.add_dataclass_options(parser, settings)
    args = parser.parse_args(argv)
    part, only_runs = reference_invocation(args)
    extra = config_extra(args) if config_extra else {}
    cfg = from_params(config, {**(defaults or {}), **cli.dataclass_options(args, config), **extra})
    opts = from_params(settings, cli.dataclass_options(args, settings))
    manifest = run(cfg, opts, args.out, part=part, only_runs=only_runs)
    if manifest:
        report(manifest, args.out)
    return 0


RECORDS = "final"  # per-run records of a reference run (one JSON file per finished run)


def write_record(out_dir: str | os.PathLike, name: str, record: dict) -> None:
    """Write a finished run's record as ``out_dir/final/<name>.json`` (atomically: another process
    reading the folder sees it whole or not at all)."""
    folder = paths.in_repo(out_dir) / RECORDS
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / f"{name}.json", (json.dumps(record, indent=1) + "\n").encode())


def load_records(out_dir: str | os.PathLike) -> dict[str, dict]:
    """Every finished run's record (:func:`write_record`), by run name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((paths.in_repo(out_dir) / RECORDS).glob("*.json"))}


def wait_for(ready: Callable[[], Any], wait_s: float, poll_s: float = 20.0) -> Any:
    """``ready()``'s first result that is not None, polling every ``poll_s`` seconds for up to ``wait_s``
    (runs another process trains); None if there is none by then."""
    deadline = time.monotonic() + wait_s
    while (value := ready()) is None and time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    return value


# ------------------------------------------------------------------------------- uncertainty
def t_interval(values, level: float = 0.95) -> dict[str, float]:
    """Mean of ``values`` (e.g. a per-seed difference) with its two-sided Student-t confidence interval
    (n - 1 degrees of freedom): n, mean, std (ddof 1), half_width, low, high; the interval is NaN for
    fewer than two values."""
    import scipy.stats  # slow to import; only the measuring invocation needs it

    v = np.asarray(values, dtype=float)
    n, mean = len(v), float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else float("nan")
    half = float(scipy.stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)) if n > 1 else float("nan")
    return dict(n=n, mean=mean, std=std, half_width=half, low=mean - half, high=mean + half)
