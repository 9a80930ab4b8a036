"""Notebook 03's reference run merged with its later seeds: gaps over seeds, throughput, manifest."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest

from routelib.errors import ConfigError
from routelib.reference import load_manifest, write_manifest, write_record
from routelib.studies.moe_vs_dense import MATCHED, MoEStudyConfig
from routelib.studies.moe_vs_dense.merge import merge_reference, seed_gaps

TINY = MoEStudyConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, num_experts=4,
                      top_k=2, seq_len=16, batch_size=2, steps=4, device="cpu")
DOMAINS = ("code", "overall")


def _ppl_rows(arm, seed, value):
    return [dict(arm=arm, seed=seed, domain=d, perplexity=value * (1.1 if d == "code" else 1.0)) for d in DOMAINS]


def test_seed_gaps_by_hand():
    rows = _ppl_rows("moe", 0, 100.0) + _ppl_rows("dense_active", 0, 110.0) + _ppl_rows("moe", 1, 90.0) \
        + _ppl_rows("dense_active", 1, 95.0)
    gaps = seed_gaps(pd.DataFrame(rows))
    assert set(gaps["comparison"]) == {"moe - dense_active"}  # the other arms are absent: no rows
    per_seed = gaps[gaps["seed"] != "mean"].set_index("seed")
    assert per_seed.loc["0", "gap_nats"] == pytest.approx(math.log(100 / 110))
    assert per_seed.loc["1", "gap_ppl"] == pytest.approx(-5.0)
    mean = gaps[gaps["seed"] == "mean"].iloc[0]
    assert mean["gap_nats"] == pytest.approx((math.log(100 / 110) + math.log(90 / 95)) / 2)
    assert mean["n"] == 2 and mean["low"] < mean["gap_nats"] < mean["high"]


def _reference(tmp_path):
    out, runs = tmp_path / "ref", tmp_path / "runs"
    (out / "history").mkdir(parents=True)
    rows = _ppl_rows("moe", 0, 100.0) + _ppl_rows("dense_active", 0, 104.0) + _ppl_rows("dense_total", 0, 96.0)
    pd.DataFrame(rows).to_csv(out / "perplexity.csv", index=False)
    pd.DataFrame({"train_tokens_per_s": [1.0, 2.0, 3.0]}, index=pd.Index(["moe", "dense_active", "dense_total"],
                                                                        name="model")).to_csv(out / "comparison.csv")
    (out / "history" / "moe_seed0.csv").write_text("step,loss\n1,5.0\n")
    write_manifest(out, command="reference", params={"study_config": dataclasses.asdict(TINY), "seeds": [0]}, wall_s=1.0)
    for arm, value in (("moe", 99.0), ("dense_active", 101.0), ("dense_total", 95.0), (MATCHED, 130.0)):
        ppl = {d: value for d in DOMAINS}
        write_record(runs, f"{arm}_seed1", dict(arm=arm, seed=1, steps=4, perplexity=ppl,
                                                loss_nats={d: math.log(v) for d, v in ppl.items()}))
    (runs / "history").mkdir()
    (runs / "history" / "moe_seed1.csv").write_text("step,loss\n1,5.1\n")
    return out, runs


def test_merge_reference(tmp_path):
    out, runs = _reference(tmp_path)
    merge_reference(runs, out, rounds=1, min_time_s=0.01)
    man = load_manifest(out)  # every file hashed anew
    assert man["params"]["seeds"] == [0, 1] and man["params"]["matched_runs"] == [f"{MATCHED}_seed1"]
    ppl = pd.read_csv(out / "perplexity.csv")
    assert len(ppl) == 2 * 7 and set(ppl["arm"]) == {"moe", "dense_active", "dense_total", MATCHED}
    gaps = pd.read_csv(out / "gaps.csv")
    mean = gaps[gaps["seed"] == "mean"].set_index("comparison")
    assert mean.loc["moe - dense_active", "n"] == 2 and mean.loc["dense_total_matched - moe", "n"] == 1
    speed = pd.read_csv(out / "throughput.csv").set_index("arm")
    assert (speed["tokens_per_s"] > 0).all() and (speed["threads"] == 1).all()
    assert pd.read_csv(out / "comparison.csv", index_col=0)["train_tokens_per_s"].tolist() == speed.loc[
        ["moe", "dense_active", "dense_total"], "tokens_per_s"].tolist()
    split = pd.read_csv(out / "flops_split.csv", index_col=0)
    assert (split["ffn_share_all"] < split["ffn_share"]).all()  # the head counts in the second denominator
    assert (out / "final" / "moe_seed1.json").is_file() and (out / "history" / "moe_seed1.csv").is_file() and len(json.loads((out / "invocations.json").read_text())) == 1
    with pytest.raises(ConfigError, match="already in"):
        merge_reference(runs, out, rounds=1, min_time_s=0.01)
