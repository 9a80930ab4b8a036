"""routelib.reference: manifests record command, commit, environment and a sha256 per result file,
and loading refuses a folder whose files differ from what the run wrote."""

import json

import pytest

from routelib.reference import ReferenceError, command_line, load_manifest, write_manifest


def test_manifest_round_trip_and_tampering(tmp_path):
    (tmp_path / "history").mkdir()
    (tmp_path / "history" / "a.csv").write_text("step,loss\n1,2.0\n")
    (tmp_path / "table.csv").write_text("x\n1\n")
    written = write_manifest(tmp_path, command="python -m x reference", params={"steps": 3}, wall_s=1.234)
    assert set(written["files"]) == {"history/a.csv", "table.csv"}
    assert written["params"] == {"steps": 3} and written["wall_s"] == 1.2
    assert {"python", "torch", "device", "torch_threads"} <= set(written["environment"])
    assert "commit" in written and "dirty" in written
    assert load_manifest(tmp_path)["command"] == "python -m x reference"

    (tmp_path / "table.csv").write_text("x\n2\n")
    with pytest.raises(ReferenceError, match="table.csv: sha256 differs"):
        load_manifest(tmp_path)
    (tmp_path / "table.csv").unlink()
    with pytest.raises(ReferenceError, match="table.csv: listed in manifest.json but missing"):
        load_manifest(tmp_path)


def test_missing_and_corrupt_manifest(tmp_path):
    with pytest.raises(ReferenceError, match="no manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ReferenceError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_command_line_names_the_module():
    assert command_line().startswith("python ")
    json.dumps(command_line())
