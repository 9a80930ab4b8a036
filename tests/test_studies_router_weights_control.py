"""routelib.studies.router_weights.control: the sequences drawn per domain, the one-line reasons when the
traces or the model are missing, verdicts built from the tables (per label both definitions of control,
one claim line per definition), and a small run on the shipped subject in which the router's own
decision is decoded from the control part under both definitions (a check of the split)."""

import numpy as np
import pandas as pd
import pytest

from routelib.errors import ConfigError
from routelib.studies.router_weights import RouterStudyConfig
from routelib.studies.router_weights import control as S


V2 = {"model": "data/moe-subject", "trace_dir": "routing_data_collected/moe-subject-text"}  # the small subject: fast


def test_config_takes_the_notebooks_model_traces_and_seed_and_refuses_bad_values():
    cfg = S.ControlStudyConfig.from_study(RouterStudyConfig(model="elsewhere", seed=3, control_traces="t"),
                                          tokens_per_domain=10)
    assert (cfg.model, cfg.trace_dir, cfg.seed, cfg.tokens_per_domain) == ("elsewhere", "t", 3, 10)
    assert S.ControlStudyConfig().definitions == ("centred", "paper")  # both, by default
    with pytest.raises(ConfigError, match="tokens_per_domain"):
        S.ControlStudyConfig(tokens_per_domain=0)
    with pytest.raises(ConfigError, match="max_layers"):
        S.ControlStudyConfig(max_layers=0)
    assert S.spread_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert S.spread_layers(6, 10) == [0, 1, 2, 3, 4, 5] and S.spread_layers(5, 2) == [0, 4]
    with pytest.raises(ConfigError, match="increasing"):
        S.ControlStudyConfig(position_edges=(64, 16))
    for bad in ((), ("centred", "uncentred")):
        with pytest.raises(ConfigError, match="definitions"):
            S.ControlStudyConfig(definitions=bad)


def test_whole_sequences_are_drawn_per_domain_until_the_token_budget():
    problems = [f"{d}/validation/{i}" for d in ("code", "math") for i in range(10)]
    frame = pd.DataFrame({"problem_id": np.repeat(problems, 30), "position": np.tile(np.arange(30), 20)})
    drawn = S._draw(frame, S.ControlStudyConfig(tokens_per_domain=50, seed=1))
    sizes = drawn.groupby("problem_id").size()
    assert (sizes == 30).all() and sizes.index.str.split("/").str[0].value_counts().to_dict() == {"code": 2, "math": 2}
    again = S._draw(frame, S.ControlStudyConfig(tokens_per_domain=50, seed=2))
    assert set(drawn["problem_id"]) != set(again["problem_id"])  # the seed picks the sequences


def test_missing_traces_or_model_give_one_line_reasons(tmp_path):
    cfg = S.ControlStudyConfig.from_study(RouterStudyConfig(control_traces=None))
    assert S.run(cfg) == (None, "no plain-text traces to read (trace_dir, the notebook's control_traces, is None)")
    data, why = S.load(S.ControlStudyConfig(trace_dir=str(tmp_path)))
    assert data is None and "manifest.json" in why and "\n" not in why
    data, why = S.load(S.ControlStudyConfig(model=str(tmp_path / "no-model"), tokens_per_domain=1,
                                            trace_dir=V2["trace_dir"]))
    assert data is None and "cannot be loaded" in why and "\n" not in why


CENTRED, PAPER = (S.DEFINITIONS[name][0] for name in ("centred", "paper"))


def tables(**scores: tuple) -> dict[str, pd.DataFrame]:
    """Tables over three layers where, under each definition (CENTRED=..., PAPER=...), control scores
    ``control`` (``next_control`` on the next expert) and size-matched content ``matched`` on every label:
    scores[definition] = (control, matched, next_control or None); the paper's control has one dim more."""
    definitions = {CENTRED: scores.pop("centred"), PAPER: scores.pop("paper")}
    rows, angles, clusters = [], [], []
    for extra, (definition, (control, matched, next_control)) in enumerate(definitions.items()):
        next_control = control if next_control is None else next_control
        rows += [{"definition": definition, "layer": layer, "label": label, "part": part, "dims": dims,
                  "accuracy": acc, "chance": 0.1}
                 for layer in range(3) for label in S.PROBE_LABELS if label != "next_expert" or layer < 2
                 for part, dims, acc in (("control", 7 + extra, next_control if label == "next_expert" else control),
                                         ("content", 185 - extra, 0.9), ("content_matched", 7 + extra, matched))]
        angles.append(pd.DataFrame({"definition": definition, "layers": ["0-1", "1-2"], "rank": 7 + extra,
                                    "mean_angle": [60.0 - 10 * extra, 70.0], "min_angle": 40.0, "null_mean": 80.0}))
        clusters += [{"definition": definition, "layer": 0, "part": part, "label": label, "excess": 0.1 + extra / 10,
                      "k": 8} for part in S.CLUSTER_PARTS[:2] for label in S.CLUSTER_LABELS]
    clusters += [{"definition": "both", "layer": 0, "part": "full", "label": label, "excess": 0.5, "k": 8}
                 for label in S.CLUSTER_LABELS]
    return {"probes": pd.DataFrame(rows), "angles": pd.concat(angles, ignore_index=True),
            "clusters": pd.DataFrame(clusters)}


def test_verdicts_follow_the_tables_one_claim_line_per_definition():
    lines = S.verdicts(tables(centred=(0.6, 0.4, None), paper=(0.4, 0.6, 0.7)))
    assert len(lines) == len(S.PROBE_LABELS) + 1 + len(S.CLUSTER_LABELS) + 2
    assert lines[0] == (f"token: mean held-out accuracy over 3 layers, chance 0.100; {CENTRED}: control 0.600 "
                        "(7 dims), size-matched content 0.400, all content 0.900 (185 dims), control ahead at 3/3 "
                        f"layers; {PAPER}: control 0.400 (8 dims), size-matched content 0.600, all content 0.900 "
                        "(184 dims), control ahead at 0/3 layers")
    assert lines[5] == ("consecutive layers' control subspaces, mean principal angle: "
                        f"{CENTRED} (rank 7): 65.0 deg (60.0-70.0 over pairs), random subspaces 80.0 deg, "
                        f"closer at 2/2 pairs; {PAPER} (rank 8): 60.0 deg (50.0-70.0 over pairs), random "
                        "subspaces 80.0 deg, closer at 2/2 pairs")
    assert lines[6].endswith(f"{CENTRED}: control 0.100, content 0.100; {PAPER}: control 0.200, content 0.200; "
                             "full 0.500")
    centred, paper = lines[-2:]
    assert centred.startswith(f"{CENTRED}: claim (d) holds in part")
    assert "-0.200 [-0.200, -0.200] over 3 layers, ahead at 0/3 (below 0)" in centred
    assert "+0.200 [+0.200, +0.200] over 2 layers, ahead at 2/2 (above 0)" in centred
    assert paper.startswith(f"{PAPER}: claim (d) holds by") and "ahead at 3/3 (above 0)" in paper
    flipped = S.verdicts(tables(centred=(0.6, 0.6, None), paper=(0.4, 0.6, None)))[-2:]
    assert flipped[0].startswith(f"{CENTRED}: claim (d) is not resolved")  # ties: both intervals are [0, 0]
    assert flipped[1].startswith(f"{PAPER}: claim (d) holds in part") and "(below 0)" in flipped[1]


def test_on_the_subject_the_routers_own_choice_lives_in_the_control_part_under_both_definitions():
    cfg = S.ControlStudyConfig(tokens_per_domain=512, top_tokens=10, permutations=2, **V2)
    out, summary = S.run(cfg)
    assert out is not None, summary
    assert "recomputed routing agrees with the traces on 100.0%" in summary
    names = {S.DEFINITIONS[name][0] for name in cfg.definitions}
    for table in out.values():
        assert set(table["definition"]) - {"both"} == names
    probes = out["probes"].pivot_table(index=["definition", "label", "layer"], columns="part", values="accuracy")
    for definition in names:
        expert = probes.loc[(definition, "expert")]
        assert (expert["control"] > 0.85).all() and (expert["control"] > expert["content_matched"] + 0.2).all()
    ranks = out["angles"].groupby("definition")["rank"].first()
    assert ranks[S.DEFINITIONS["paper"][0]] == ranks[S.DEFINITIONS["centred"][0]] + 1 == 8  # E and E - 1
    assert len(out["angles"]) == 2 * 5
    parts = out["clusters"].groupby("definition")["part"].unique().map(set)
    assert parts["both"] == {"full"} and all(parts[d] == {"control", "content"} for d in names)
    lines = S.verdicts(out)
    assert len(lines) == len(S.PROBE_LABELS) + 1 + len(S.CLUSTER_LABELS) + 2
    assert all(all(d in line for d in names) for line in lines[:-2])
    assert [line.split(": claim (d)")[0] for line in lines[-2:]] == [S.DEFINITIONS[n][0] for n in cfg.definitions]
