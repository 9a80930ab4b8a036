"""routelib.data.hub.local_model_folder: the one rule by which every loader tells a local model folder
from a Hugging Face Hub id."""

import os

import pytest

from routelib import paths
from routelib.data.hub import local_model_folder
from routelib.errors import ModelNotFoundError


def test_folders_as_given_and_from_the_repository_root(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert local_model_folder(str(tmp_path / "m")) == tmp_path / "m"
    monkeypatch.chdir(tmp_path)
    assert local_model_folder("m") == tmp_path.joinpath("m").relative_to(tmp_path)  # from the working directory
    assert local_model_folder("data/moe-subject") == paths.REPO_ROOT / "data" / "moe-subject"  # from the repo root
    assert os.path.isfile(local_model_folder("data/moe-subject") / "config.json")


@pytest.mark.parametrize("name", ["mistralai/Mixtral-8x7B-v0.1", "gpt2", "allenai/OLMoE-1B-7B-0924"])
def test_hub_ids(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_model_folder(name) is None


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json: not a transformers model folder"):
        local_model_folder(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="routelib has no config.json"):
        local_model_folder("routelib")  # the repository's package folder, found from the repo root


@pytest.mark.parametrize("name", ["./nope", "/no/such/dir", "~/nope", "a/b/c", "bad name", "README.md"])
def test_paths_that_cannot_be_hub_ids(name, tmp_path, monkeypatch):
    monkeypatch.chdir(paths.REPO_ROOT)  # README.md exists there: a file, not a model
    with pytest.raises(ModelNotFoundError, match="does not exist .* not a Hugging Face Hub id"):
        local_model_folder(name)



def test_a_delta_folder_names_the_model_it_builds(tmp_path, monkeypatch):
    from routelib.subject import build as B

    built = tmp_path / "built"
    monkeypatch.setattr(B, "subject_v3_dir", lambda folder: built if folder == tmp_path / "delta" else None)
    (tmp_path / "delta").mkdir()
    (tmp_path / "delta" / "delta.json").write_text("{}")
    assert B.model_folder(str(tmp_path / "delta")) == built
    with pytest.raises(ModelNotFoundError, match="has no config.json"):  # to the generic rule it is no model
        local_model_folder(str(tmp_path / "delta"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert B.model_folder(str(tmp_path / "m")) == tmp_path / "m"  # any other folder: the generic rule
    (tmp_path / "delta" / "delta.json").unlink()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        B.model_folder(str(tmp_path / "delta"))
