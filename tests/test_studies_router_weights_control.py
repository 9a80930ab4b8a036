"""routelib.studies.router_weights.control: the sequences drawn per domain, the one-line reasons when the
traces or the model are missing, verdicts built from the tables, and a small run on the shipped subject
in which the router's own decision is decoded from the control part (a check of the split)."""

import numpy as np
import pandas as pd
import pytest

from routelib.errors import ConfigError
from routelib.studies.router_weights import RouterStudyConfig
from routelib.studies.router_weights import control as S


def test_config_takes_the_notebooks_model_and_seed_and_refuses_bad_values():
    cfg = S.ControlStudyConfig.from_study(RouterStudyConfig(model="elsewhere", seed=3), tokens_per_domain=10)
    assert (cfg.model, cfg.seed, cfg.tokens_per_domain) == ("elsewhere", 3, 10)
    with pytest.raises(ConfigError, match="tokens_per_domain"):
        S.ControlStudyConfig(tokens_per_domain=0)
    with pytest.raises(ConfigError, match="increasing"):
        S.ControlStudyConfig(position_edges=(64, 16))


def test_whole_sequences_are_drawn_per_domain_until_the_token_budget():
    problems = [f"{d}/validation/{i}" for d in ("code", "math") for i in range(10)]
    frame = pd.DataFrame({"problem_id": np.repeat(problems, 30), "position": np.tile(np.arange(30), 20)})
    drawn = S._draw(frame, S.ControlStudyConfig(tokens_per_domain=50, seed=1))
    sizes = drawn.groupby("problem_id").size()
    assert (sizes == 30).all() and sizes.index.str.split("/").str[0].value_counts().to_dict() == {"code": 2, "math": 2}
    again = S._draw(frame, S.ControlStudyConfig(tokens_per_domain=50, seed=2))
    assert set(drawn["problem_id"]) != set(again["problem_id"])  # the seed picks the sequences


def test_missing_traces_or_model_give_one_line_reasons(tmp_path):
    data, why = S.load(S.ControlStudyConfig(trace_dir=str(tmp_path)))
    assert data is None and "manifest.json" in why and "\n" not in why
    data, why = S.load(S.ControlStudyConfig(model=str(tmp_path / "no-model"), tokens_per_domain=1))
    assert data is None and "cannot be loaded" in why and "\n" not in why


def tables(control: float, matched: float, next_control: float | None = None) -> dict[str, pd.DataFrame]:
    """Tables where control scores ``control`` (``next_control`` on the next expert) and size-matched
    content ``matched`` on every label, over three layers."""
    def control_on(label):
        return next_control if label == "next_expert" and next_control is not None else control

    rows = [{"layer": layer, "label": label, "part": part, "dims": dims, "accuracy": acc, "chance": 0.1}
            for layer in range(3) for label in S.PROBE_LABELS if label != "next_expert" or layer < 2
            for part, dims, acc in (("control", 7, control_on(label)), ("content", 185, 0.9),
                                    ("content_matched", 7, matched))]
    angles = pd.DataFrame({"layers": ["0-1", "1-2"], "rank": 7, "mean_angle": [60.0, 70.0], "min_angle": 40.0,
                           "null_mean": 80.0})
    clusters = pd.DataFrame([{"layer": 0, "part": part, "label": label, "excess": 0.1, "k": 8}
                             for part in S.CLUSTER_PARTS for label in S.CLUSTER_LABELS])
    return {"probes": pd.DataFrame(rows), "angles": angles, "clusters": clusters}


def test_verdicts_follow_the_tables():
    lines = S.verdicts(tables(control=0.6, matched=0.4))
    assert lines[0].startswith("token: mean held-out accuracy over 3 layers: control 0.600 (7 dims), size-matched "
                               "content 0.400, all content 0.900 (185 dims), chance 0.100; control above size-matched "
                               "content at 3/3 layers")
    assert "mean principal angle 65.0 deg (60.0-70.0 over pairs), random subspaces 80.0 deg; closer than random at 2/2" in lines[5]
    assert lines[-1].startswith("claim (d) holds in part") and "at 0/3 layers (no)" in lines[-1] and "2/2 layers (yes)" in lines[-1]
    assert S.verdicts(tables(control=0.4, matched=0.6))[-1].startswith("claim (d) holds in part")
    assert S.verdicts(tables(control=0.4, matched=0.6, next_control=0.7))[-1].startswith("claim (d) holds by")
    assert S.verdicts(tables(control=0.6, matched=0.6))[-1].startswith("claim (d) does not hold")  # ties count for neither
    assert len(lines) == len(S.PROBE_LABELS) + 1 + len(S.CLUSTER_LABELS) + 1


def test_on_the_subject_the_routers_own_choice_lives_in_the_control_part():
    cfg = S.ControlStudyConfig(tokens_per_domain=512, top_tokens=10, permutations=2)
    out, summary = S.run(cfg)
    assert out is not None, summary
    assert "recomputed routing agrees with the traces on 100.0%" in summary
    probes = out["probes"].pivot_table(index=["label", "layer"], columns="part", values="accuracy")
    expert = probes.loc["expert"]
    assert (expert["control"] > 0.85).all() and (expert["control"] > expert["content_matched"] + 0.2).all()
    assert set(out["clusters"]["part"]) == set(S.CLUSTER_PARTS) and len(out["angles"]) == 5
    assert len(S.verdicts(out)) == len(S.PROBE_LABELS) + 1 + len(S.CLUSTER_LABELS) + 1
