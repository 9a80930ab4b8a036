"""The notebook harness must be able to fail: nbval with our options, conftest and sanitize file
passes on a notebook as committed, fails when a checked output is edited, and ignores what we
declared volatile (unchecked cells, stderr, durations, addresses)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from routelib import paths

FIXTURE = Path(__file__).parent / "fixtures" / "nbval_fixture.ipynb"
NBVAL_ARGS = ["--nbval-lax", "--nbval-current-env", "--nbval-sanitize-with", str(Path(__file__).parent / "nbval_sanitize.cfg")]


def _run_nbval(tmp_path: Path, edit=None) -> subprocess.CompletedProcess:
    """Copy the fixture and the repo's conftest.py to tmp_path, apply ``edit`` to the committed
    notebook's outputs, then run pytest+nbval on it in a fresh process."""
    shutil.copy(paths.REPO_ROOT / "conftest.py", tmp_path / "conftest.py")
    nb = nbformat.read(FIXTURE, as_version=4)
    if edit:
        edit(nb.cells)
    nbformat.write(nb, tmp_path / "fixture.ipynb")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), *NBVAL_ARGS, "fixture.ipynb"]
    env = {**os.environ, "ROUTELIB_RUNS": str(tmp_path / "runs")}
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)


def _set_stdout(cell, text):
    cell.outputs = [o for o in cell.outputs if o.get("name") != "stdout"] + [
        nbformat.v4.new_output("stream", name="stdout", text=text)
    ]


def test_fixture_passes_as_committed(tmp_path):
    res = _run_nbval(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "6 passed" in res.stdout  # the six code cells


def test_edited_checked_output_fails(tmp_path):
    res = _run_nbval(tmp_path, lambda cells: _set_stdout(cells[3], "46\n"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "1 failed" in res.stdout
    assert "46" in res.stdout and "45" in res.stdout  # the report shows expected vs got


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda c: _set_stdout(c[4], "unchecked: anything at all\n"), id="unchecked-cell"),
        pytest.param(lambda c: c[4].outputs.__setitem__(1, nbformat.v4.new_output("stream", name="stderr", text="other\n")), id="stderr"),
        pytest.param(lambda c: _set_stdout(c[5], "elapsed 99.5 ms at 0xdeadbeef1234\n"), id="sanitized-duration-address"),
    ],
)
def test_volatile_differences_pass(tmp_path, edit):
    res = _run_nbval(tmp_path, edit)
    assert res.returncode == 0, res.stdout + res.stderr
