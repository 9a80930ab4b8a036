"""routelib.notebooks end to end with papermill: parameters injected, a misspelt parameter
rejected by the notebook's config cell, headline metrics written, `run` with no notebooks."""

import json

import papermill
import pytest

from routelib import notebooks, paths

FIXTURE = paths.REPO_ROOT / "tests" / "fixtures" / "nbval_fixture.ipynb"


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTELIB_RUNS", str(tmp_path / "runs"))  # the kernel inherits it
    monkeypatch.setattr(paths, "RUNS_DIR", tmp_path / "runs")
    return tmp_path / "runs"


def test_execute_injects_parameters_and_reports_metrics(tmp_path, runs_dir):
    params = tmp_path / "p.yaml"
    params.write_text("n: 4\n")
    out = notebooks.execute(FIXTURE, tmp_path / "out.ipynb", params_file=params)
    text = out.read_text()
    assert "injected-parameters" in text and '"6\\n"' in text  # sum(range(4))
    assert json.loads((runs_dir / "metrics" / "nbval_fixture.json").read_text()) == {"sum": 6, "mean": 1.5}


def test_misspelt_parameter_fails_the_run(tmp_path, runs_dir):
    with pytest.raises(papermill.PapermillExecutionError, match="did you mean 'n'"):
        notebooks.execute(FIXTURE, tmp_path / "out.ipynb", nn=4)


def test_run_says_so_when_there_are_no_notebooks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(paths, "NOTEBOOKS_DIR", tmp_path)
    assert notebooks.main(["run"]) == 0
    assert "no notebooks" in capsys.readouterr().out


def test_report_rounds_and_writes_json(runs_dir, capsys):
    out = notebooks.report("x", {"ppl": 12.345678, "n": 3, "nested": {"a": 0.000123456}}, digits=3)
    assert out == {"ppl": 12.3, "n": 3, "nested": {"a": 0.000123}}
    assert json.loads((runs_dir / "metrics" / "x.json").read_text()) == out
    assert "ppl: 12.3" in capsys.readouterr().out
