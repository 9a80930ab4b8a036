"""Hygiene of every committed notebook (docs/design.md §4), and of the checker itself."""

import nbformat
import pytest

from routelib import notebooks, paths

FIXTURE = paths.REPO_ROOT / "tests" / "fixtures" / "nbval_fixture.ipynb"
ALL = notebooks.list_notebooks() + [FIXTURE]


@pytest.mark.parametrize("nb_path", ALL, ids=[p.name for p in ALL])
def test_notebook_hygiene(nb_path):
    assert notebooks.hygiene_problems(nb_path) == []


def test_every_params_file_belongs_to_a_notebook():
    stems = {p.stem for p in notebooks.list_notebooks()}
    for params_file in (paths.NOTEBOOKS_DIR / "params").glob("*.yaml"):
        assert params_file.name.split(".")[0] in stems, f"{params_file.name} has no notebook"


def _broken_copy(tmp_path, mutate):
    nb = nbformat.read(FIXTURE, as_version=4)
    mutate(nb)
    path = tmp_path / "notebooks" / "01_broken.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize(
    "mutate, expected",
    [
        pytest.param(lambda nb: nb.metadata.kernelspec.update(name="venv"), "kernelspec", id="kernel"),
        pytest.param(lambda nb: nb.cells.append(nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]})), "exactly one", id="two-parameter-cells"),
        pytest.param(lambda nb: nb.cells.insert(2, nbformat.v4.new_code_cell("n = 3", metadata={"tags": ["injected-parameters"]})), "injected", id="injected"),
        pytest.param(lambda nb: nb.metadata.update(papermill={"start_time": "2026-01-01"}), "papermill metadata", id="papermill-metadata"),
    ],
)
def test_checker_finds_problems(tmp_path, mutate, expected):
    problems = notebooks.hygiene_problems(_broken_copy(tmp_path, mutate))
    assert any(expected in p for p in problems), problems


def test_checker_finds_unknown_params_yaml_keys(tmp_path):
    path = _broken_copy(tmp_path, lambda nb: None)
    (path.parent / "params").mkdir()
    (path.parent / "params" / "01_broken.gpu.yaml").write_text("n: 100\nnn: 3\n")
    assert notebooks.hygiene_problems(path) == ["01_broken.gpu.yaml sets ['nn'], not parameters of the notebook"]


def test_strip_volatile_keeps_counts_and_tags():
    nb = nbformat.read(FIXTURE, as_version=4)
    nb.metadata["papermill"] = {"duration": 1.0}
    nb.cells[1].metadata["papermill"] = {"duration": 0.1}
    nb.cells[1].metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00"}
    nb.cells.insert(2, nbformat.v4.new_code_cell("n = 3", metadata={"tags": ["injected-parameters"]}))
    clean = notebooks.strip_volatile(nb)
    assert "papermill" not in clean.metadata and len(clean.cells) == 7
    assert clean.cells[1].metadata == {"tags": ["parameters"]}
    assert [c.get("execution_count") for c in clean.cells] == [c.get("execution_count") for c in nbformat.read(FIXTURE, as_version=4).cells]


def test_parameter_names():
    assert notebooks.parameter_names(FIXTURE) == ["n"]
