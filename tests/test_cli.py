"""Every command-line entry point turns an expected failure into one line on stderr and exit status 2
(routelib.cli): an offline Hub, a missing model folder, an unknown dataset or notebook, corrupt traces."""

import os
import subprocess
import sys

import pytest

from routelib import cli, paths
from routelib.errors import ConfigError


def run_module(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=paths.REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str):
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("model, needles", [
    pytest.param("mistralai/Mixtral-8x7B-v0.1", ["Mixtral-8x7B-v0.1", "Hugging Face Hub", "HF_HUB_OFFLINE"], id="offline-hub"),
    pytest.param("/no/such/dir", ["'/no/such/dir' does not exist"], id="missing-folder"),
    pytest.param("routelib", ["routelib has no config.json"], id="not-a-model-folder"),
])
def test_collect_model_errors(tmp_path, model, needles):
    assert_one_line_error(run_module("routelib.routing.record.collect", "--model", model, "--out", str(tmp_path / "t")), *needles)


def test_collect_unknown_dataset_fails_before_loading_the_model(tmp_path):
    proc = run_module("routelib.routing.record.collect", "--model", "/no/such/dir", "--datasets", "humaneval,mmlu",
                      "--out", str(tmp_path / "t"))
    assert_one_line_error(proc, "--datasets", "mmlu", "choose from gsm8k, humaneval")


def test_predictors_on_corrupt_traces(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    assert_one_line_error(run_module("routelib.routing.predict", str(tmp_path)))


def test_notebook_runner_unknown_notebook():
    assert_one_line_error(run_module("routelib.notebooks", "run", "99"), "no notebook", "starts with 99")


def test_run_maps_expected_errors_and_keeps_bugs(capsys):
    def bad(argv):
        raise ConfigError("steps must be >= 1,\ngot 0")

    assert cli.run(bad) == 2
    assert capsys.readouterr().err == "error: steps must be >= 1, | got 0\n"

    def bug(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        cli.run(bug)


def test_dataclass_options_parse_to_field_types():
    import dataclasses

    @dataclasses.dataclass
    class Cfg:
        steps: int = 1  # an int
        lr: float = 1e-3  # a float
        seeds: list[int] = dataclasses.field(default_factory=list)  # a list
        fast: bool = False  # a flag
        name: str = "a"  # a string

    parser = cli.ArgumentParser(prog="prog")
    cli.add_dataclass_options(parser, Cfg, skip=("name",))
    args = parser.parse_args(["--steps", "3", "--lr", "2e-3", "--seeds", "0, 1,2", "--fast", "yes"])
    assert cli.dataclass_options(args, Cfg) == {"steps": 3, "lr": 2e-3, "seeds": [0, 1, 2], "fast": True}
    assert cli.dataclass_options(parser.parse_args([]), Cfg) == {}  # unset options keep the defaults
    with pytest.raises(ConfigError, match="prog: unrecognized arguments: --name b"):
        parser.parse_args(["--name", "b"])  # skipped
    for argv, needle in ((["--steps", "1.5"], "expected an integer"), (["--fast", "maybe"], "expected true or false"),
                         (["--lr", "x"], "expected a number")):
        with pytest.raises(ConfigError, match=needle):
            cli.dataclass_options(parser.parse_args(argv), Cfg)
