"""Running a command under torchrun in the tests, with one retry for gloo's teardown abort.

Under heavy load gloo can abort a rank while its process group closes, after the work is done: the C++
runtime prints "terminate called without an active exception" and the rank dies with SIGABRT (seen once
on a loaded 2-core machine; not reproducible in isolation). Such a run is repeated once; any other
failure -- and the same abort twice -- is returned as it is, so the tests still fail on real errors.
"""

from __future__ import annotations

import subprocess

GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def run_command(cmd: list[str], env: dict, timeout: int, retries: int = 1) -> subprocess.CompletedProcess:
    for attempt in range(retries + 1):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode == 0 or GLOO_TEARDOWN_ABORT not in proc.stdout + proc.stderr or attempt == retries:
            return proc
    return proc


def run_module(args: list[str], nproc: int, timeout: int = 300) -> str:
    """``python <args>`` with one process, or under ``torchrun --standalone --nproc_per_node nproc`` (gloo on
    the CPU), quiet and on one thread per process; asserts success and returns its stdout."""
    import os
    import sys

    cmd = [sys.executable, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = run_command(cmd, env, timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
