"""Notebooks 04 and 05 on imported traces, no model on the machine: executed with papermill on a
folder made by each importer (JSON lines, vLLM; ``imported_traces`` in conftest.py) with the live
check, the sampled comparison and the hidden-state predictors off, and small sizes. Every cell must run;
the sections that need what the folder lacks say so in one line."""

import nbformat
import pytest

from routelib import notebooks, paths

# Papermill parameters that shrink the work to seconds; the sections that need a model or a companion set off.
PARAMETERS = {
    "04_mixtral_routing_collection": dict(compare_dir=None, live_model=None, permutations=50, bootstrap=20,
                                          max_distance=4),
    "05_next_expert_mlp": dict(compare_dir=None, predictors="random,prior,lookup,ngram,prev_token,history,mlp",
                               mlp_steps=20, bench_min_time_s=0.01),  # default hops 1..5: 4 and 5 do not fit
}
# One line each that a skipped section must print.
SKIPPED = {
    "04_mixtral_routing_collection": ["live collection check skipped: live_model is None", "section 7 skipped"],
    "05_next_expert_mlp": ["hops 4, 5 left out: the traces have 4 MoE layers", "hidden states skipped",
                           "latency skipped", "section 8 skipped"],
}


def outputs(nb) -> tuple[list[str], str]:
    """(the error outputs as 'ename: evalue', all stdout text) of an executed notebook."""
    errors, text = [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errors.append(f"{out['ename']}: {out['evalue']}")
            elif out.get("output_type") == "stream" and out.get("name") == "stdout":
                text.append(out["text"])
    return errors, "".join(text)


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_notebook_runs_on_imported_traces(name, imported_traces, tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTELIB_RUNS", str(tmp_path / "runs"))  # the kernel's headline metrics stay out of runs/
    out_dir = str(tmp_path / "out")
    executed = notebooks.execute(paths.NOTEBOOKS_DIR / f"{name}.ipynb", tmp_path / f"{name}.ipynb",
                                 trace_dir=str(imported_traces), out_dir=out_dir, **PARAMETERS[name])
    errors, text = outputs(nbformat.read(executed, as_version=4))
    assert errors == []
    for line in SKIPPED[name]:
        assert line in text
    assert (tmp_path / "runs" / "metrics" / f"{name}.json").is_file()  # it ran to its headline


# ---- the readers: one place reads a manifest, with defaults for what an import cannot know ---------------


def minimal_copy(trace_dir, out):
    """A copy of ``trace_dir`` whose manifest keeps only what a reader cannot do without: the format,
    the layout's three numbers and the shard list (no model, tokenizer, datasets, source, command)."""
    import json
    import shutil

    from routelib.routing.record import traces as T

    shutil.copytree(trace_dir, out)
    manifest = T.read_manifest(out)
    layout = {key: manifest["layout"][key] for key in ("num_moe_layers", "top_k", "num_experts")}
    (out / T.MANIFEST).write_text(json.dumps({"format": T.FORMAT, "format_version": T.FORMAT_VERSION,
                                              "layout": layout, "shards": manifest["shards"]}))
    return out


def test_the_readers_run_on_a_minimal_imported_manifest(imported_traces, tmp_path):
    from routelib.routing.predict import load_routing
    from routelib.routing.record.traces import companion_problem, load_traces, trace_arrays, trace_info
    from routelib.studies import next_expert, routing_traces

    folder = minimal_copy(imported_traces, tmp_path / "minimal")
    info = trace_info(folder)
    assert info.model is None and info.architecture is None and info.command is None and info.generation == {}
    assert info.describe().startswith("model not recorded (architecture not recorded)")
    df = load_traces(folder)
    arrays = trace_arrays(df)
    cfg = routing_traces.TraceStudyConfig(trace_dir=str(folder), max_distance=2, bootstrap=5, permutations=5)
    assert "no collection of 'humaneval'" in routing_traces.live_check_problem(cfg, info)
    samples = routing_traces.token_samples(df, cfg)
    assert "generated" in samples and 0 <= routing_traces.example_token(df) < len(df)
    locality = routing_traces.consecutive_locality(df, arrays, cfg)
    assert routing_traces.locality_number(locality, "top1_same", 0, phase="generated") is not None
    comparison = routing_traces.decoding_comparison({"a": df, "b": df}, cfg)
    assert set(comparison["decoding"]) == {"a", "b"}
    assert "holds none of trace_dir's problems" in companion_problem(folder, "routing_data_collected/moe-subject")
    assert companion_problem(folder, imported_traces) is None  # the same problems
    data = load_routing(folder)
    assert data.num_experts == info.num_experts and data.vocab_size >= 1
    ecfg = next_expert.NextExpertConfig(trace_dir=str(folder), predictors="lookup,hidden_router")
    hidden, missing = next_expert.hidden_states(data, ecfg)
    assert hidden is None and "names no model" in missing and "\n" not in missing
    assert next_expert.without_hidden(ecfg).predictor_names() == ["lookup"]


# The trace notebooks and their studies (the other studies' "manifests" are their reference runs').
NOTEBOOKS = {"04_mixtral_routing_collection": "routing_traces", "05_next_expert_mlp": "next_expert",
             "06_router_weight_study": "router_weights"}
ALWAYS_WRITTEN = {"format", "format_version", "shards", "totals"}  # keys every collection and import writes


def manifest_subscripts(code: str) -> set[str]:
    """The keys read with ``<...manifest>[key]`` in ``code``."""
    import re

    return set(re.findall(r"manifest\w*\s*\[\s*[\"'](\w+)[\"']", code)) | set(
        re.findall(r"\[\s*[\"'](layout|model|tokenizer|datasets|generation|source|command|overhead)[\"']\s*\]", code))


def test_no_notebook_or_study_subscripts_a_manifest_key_an_import_may_lack():
    import json

    studies = [paths.REPO_ROOT / "routelib" / "studies" / study for study in NOTEBOOKS.values()]
    sources = {str(p.relative_to(paths.REPO_ROOT)): p.read_text() for s in studies for p in sorted(s.rglob("*.py"))}
    for name in NOTEBOOKS:
        cells = json.loads((paths.NOTEBOOKS_DIR / f"{name}.ipynb").read_text())["cells"]
        sources[name] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    bad = {where: sorted(keys) for where, code in sources.items() if (keys := manifest_subscripts(code) - ALWAYS_WRITTEN)}
    assert bad == {}, f"read these through routelib.routing.record.traces.trace_info: {bad}"
