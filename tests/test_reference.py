"""routelib.reference: manifests record command, commit, environment and a sha256 per result file,
and loading refuses a folder whose files differ from what the run wrote; the invocation log, parts of
runs side by side, per-run records, and the t-interval."""

import argparse
import json
import math

import pytest

from routelib.reference import (InvocationLog, ReferenceError, command_line, load_manifest, load_records, parse_part,
                                reference_made, split_parts, t_interval, wait_for, write_manifest, write_record)


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


def test_invocation_log_records_every_invocation(tmp_path):
    first = InvocationLog(tmp_path, command="python -m x reference --part 1/2")
    second = InvocationLog(tmp_path, command="python -m x reference --part 2/2")  # side by side
    log = json.loads((tmp_path / "invocations.json").read_text())
    assert [e["command"] for e in log] == [first.command, second.command] and all(e["finished"] is None for e in log)
    done = first.finish()
    assert [e["finished"] is not None for e in done] == [True, False]  # the other one is still running
    assert done[0]["wall_s"] >= 0 and {"commit", "dirty", "pid", "started"} <= set(done[0])
    summary = InvocationLog.summary(second.finish())
    assert summary["invocations"] == 2 and summary["first_started"] == done[0]["started"]
    assert summary["wall_s"] == pytest.approx(sum(e["wall_s"] for e in json.loads((tmp_path / "invocations.json").read_text())))
    assert summary["span_s"] >= 0
    assert not list(tmp_path.glob(".*.tmp-*"))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_split_parts_deals_every_run_to_one_part(n):
    specs = [("run", k, steps) for k, steps in enumerate([4, 4, 4, 2, 2, 2, 4])]
    parts = [split_parts(specs, (i, n), cost=lambda s: s[2]) for i in range(1, n + 1)]
    assert sorted((s for p in parts for s in p), key=specs.index) == specs  # disjoint and complete
    loads = [sum(s[2] for s in p) for p in parts]
    assert max(loads) - min(loads) <= 4  # no part longer than another by more than one run
    assert all(p == sorted(p, key=specs.index) for p in parts)  # plan order kept


def test_t_interval_known_numbers():
    got = t_interval([1.0, 2.0, 3.0])
    t_975_2 = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom (tables)
    assert (got["n"], got["mean"], got["std"]) == (3, 2.0, 1.0)
    assert got["half_width"] == pytest.approx(t_975_2 / math.sqrt(3), rel=1e-9)
    assert (got["low"], got["high"]) == pytest.approx((2 - t_975_2 / math.sqrt(3), 2 + t_975_2 / math.sqrt(3)))
    assert math.isnan(t_interval([0.5])["half_width"])


@pytest.mark.parametrize("text, part", [("1/2", (1, 2)), ("3/3", (3, 3))])
def test_parse_part(text, part):
    assert parse_part(text) == part


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b"])
def test_parse_part_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_part(text)


def test_records_and_waiting(tmp_path):
    assert load_records(tmp_path) == {} and not reference_made(tmp_path)
    write_record(tmp_path, "run-a", {"val_loss": 1.5})
    assert load_records(tmp_path) == {"run-a": {"val_loss": 1.5}}
    assert wait_for(lambda: load_records(tmp_path).get("run-a"), wait_s=0) == {"val_loss": 1.5}
    calls = []
    assert wait_for(lambda: calls.append(1), wait_s=0.05, poll_s=0.01) is None and len(calls) >= 2  # polled, gave up


# The command line every reference study shares (reference_parser / reference_invocation), through each
# study's main: one-line errors, nothing written. Each study's own options are tested in its test file.
@pytest.mark.parametrize("study", ["attention_routing.reference", "pathways.reference"])
@pytest.mark.parametrize("argv, needle", [
    (["train"], "invalid choice: 'train'"),
    (["reference", "--part", "3/2"], "need 1 <= i <= n"),
    (["reference", "--part", "half"], "expected i/n"),
    (["reference", "--part", "1/2", "--only_runs", "x"], "not both"),
    (["reference", "--threads", "-1"], "--threads -1"),
])
def test_shared_command_line_errors(study, argv, needle, capsys, tmp_path):
    import importlib

    from routelib import cli

    main = importlib.import_module(f"routelib.studies.{study}").main
    assert cli.run(main, [*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()
