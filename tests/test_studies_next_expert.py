"""routelib.studies.next_expert (notebook 05's additions to the predictor library)."""

import pandas as pd
import pytest

from routelib.studies.next_expert import NextExpertConfig, decoding_rankings


def summary(top1: dict[str, dict[str, float]]) -> pd.DataFrame:
    """A predictors.summarize-shaped table: one hop, problem split, top-1 per predictor and subset."""
    rows = [dict(split="problem", train="train", test="test", hop=1, subset=subset, predictor=p, top1=v)
            for subset, by_predictor in top1.items() for p, v in by_predictor.items()]
    rows += [dict(split="problem", train="train", test="test", hop=2, subset="all", predictor="mlp", top1=0.0)]
    return pd.DataFrame(rows)


def test_decoding_rankings_ranks_each_decoding_and_correlates_them():
    greedy = summary({"all": {"chance": 0.125, "lookup": 0.5, "ngram": 0.7, "mlp": 0.8},
                      "unique": {"chance": 0.125, "lookup": 0.4, "ngram": 0.6, "mlp": 0.55}})
    sampled = summary({"all": {"chance": 0.125, "lookup": 0.45, "ngram": 0.6, "mlp": 0.65},
                       "unique": {"chance": 0.125, "lookup": 0.4, "ngram": 0.5, "mlp": 0.6}})
    table = decoding_rankings({"greedy": greedy, "sampled": sampled})
    assert "chance" not in table.index and list(table.index) == ["mlp", "ngram", "lookup"]
    assert table[("greedy", "unique", "rank")].to_dict() == {"mlp": 2, "ngram": 1, "lookup": 3}
    assert table[("sampled", "all", "top1")]["mlp"] == 0.65  # hop 2 rows are left out
    assert table.attrs["spearman"]["all"] == pytest.approx(1.0)
    assert table.attrs["spearman"]["unique"] == pytest.approx(0.5)


def test_config_names_the_sampled_traces():
    assert NextExpertConfig().compare_dir == "routing_data_collected/moe-subject-sampled"
    assert NextExpertConfig(compare_dir=None).compare_dir is None


def hop1_table(top1: dict[str, float]) -> pd.DataFrame:
    """predictor x metric, as notebook 05's ``hop1``."""
    return pd.DataFrame({"top1": top1, "top2_hit": {p: v + 0.1 for p, v in top1.items()}})


def test_order_checks_cover_the_predictors_run():
    from routelib.studies.next_expert import order_checks

    checks = order_checks(hop1_table({"chance": 0.125, "prior": 0.2, "lookup": 0.5, "ngram": 0.4, "mlp": 0.6}))
    assert checks.set_index("order")["holds"].to_dict() == {"ngram > lookup": False, "lookup > prior": True,
                                                             "prior > chance": True, "mlp > ngram": True}
    assert order_checks(hop1_table({"chance": 0.125})).empty


def test_headline_keeps_the_numbers_the_run_has():
    from routelib.studies.next_expert import headline

    hop1 = hop1_table({"chance": 0.125, "lookup": 0.5, "ngram": 0.7, "mlp": 0.8})
    by_split = pd.DataFrame({"problem: a -> a": [0.5, 0.7, 0.8], "token: a -> a": [0.6, 0.75, 0.85]},
                            index=["lookup", "ngram", "mlp"])
    by_subset = pd.DataFrame({"all": [0.5, 0.7, 0.8], "prompt": [float("nan")] * 3, "generated": [0.5, 0.7, 0.8],
                              "unique": [0.4, 0.6, 0.7]}, index=["lookup", "ngram", "mlp"])
    out = headline(hop1, by_split, by_subset, None, None, k=2)
    assert list(out) == ["problem_split_top1_lookup", "problem_split_top1_ngram", "problem_split_top1_mlp",
                         "problem_split_top2_hit_mlp", "token_split_top1_mlp", "unique_journeys_top1_mlp",
                         "generated_top1_ngram"]
    assert out["token_split_top1_mlp"] == 0.85 and out["problem_split_top2_hit_mlp"] == pytest.approx(0.9)
    hit = pd.DataFrame({1: [0.3, 0.4], 2: [0.5, 0.6]}, index=["lru", "ngram"])
    latency = pd.DataFrame({"name": ["moe_layer", "mlp"], "batch": [1, 1], "pct_of_layer": [100.0, 3.0]})
    out = headline(hop1, by_split, by_subset, hit, latency, k=2)
    assert out["cache_hit_at_k_lru"] == 0.5 and out["cache_hit_at_k_ngram"] == 0.6
    assert out["mlp_pct_of_layer_batch1"] == 3.0


def test_hidden_state_predictors_are_left_out_by_name():
    from routelib.errors import ConfigError
    from routelib.studies.next_expert import reports_shipped_traces, without_hidden

    cfg = NextExpertConfig(predictors="lookup,hidden_router,mlp,hidden_probe")
    assert without_hidden(cfg).predictors == "lookup,mlp"
    with pytest.raises(ConfigError, match="only hidden-state predictors"):
        without_hidden(NextExpertConfig(predictors="hidden_probe"))
    assert reports_shipped_traces(NextExpertConfig())
    assert not reports_shipped_traces(NextExpertConfig(trace_dir="routing_data_collected/moe-subject-sampled"))


def test_seed_gap_lists_the_predictors_run():
    from routelib.studies.next_expert import seed_gap

    by_split = pd.DataFrame({"problem: a -> a": [0.5, 0.7], "token: a -> a": [0.6, 0.75]}, index=["lookup", "mlp"])
    gap = seed_gap(by_split, pd.DataFrame({"unique": [0.4, 0.6]}, index=["lookup", "mlp"]))
    assert list(gap.index) == ["lookup", "mlp"] and gap.loc["mlp", "ours, token split"] == 0.75
    assert gap.loc["lookup", "seed (Mixtral-8x7B, random split)"] == 0.42


def test_fit_hops_keeps_the_hops_the_layers_allow():
    from routelib.errors import ConfigError
    from routelib.studies.next_expert import fit_hops

    cfg = NextExpertConfig(hops="1,2,3,4,5")
    assert fit_hops(cfg, 6) == (cfg, None)
    fitted, dropped = fit_hops(cfg, 4)
    assert fitted.hop_list() == [1, 2, 3] and dropped == "hops 4, 5 left out: the traces have 4 MoE layers (hops up to 3)"
    with pytest.raises(ConfigError, match="no hop fits"):
        fit_hops(cfg, 1)


def test_hops_by_split_puts_the_hops_of_both_splits_side_by_side():
    from routelib.studies.next_expert import hops_by_split

    rows = [{"split": split, "train": train, "test": test, "subset": "all", "hop": hop, "predictor": p, "top1": top1}
            for split, train, test in [("problem", "a+b", "a+b"), ("dataset", "a", "b"), ("token", "a+b", "a+b")]
            for hop in (1, 2, 3, 4) for p, top1 in [("chance", 0.125), ("hidden_probe", 0.9 - 0.1 * hop)]
            if split != "token" or hop == 1]
    table = hops_by_split(pd.DataFrame(rows))
    assert list(table.columns) == [("problem", 1), ("problem", 2), ("problem", 3), ("a -> b", 1), ("a -> b", 2),
                                   ("a -> b", 3)]
    assert list(table.index) == ["chance", "hidden_probe"]
    assert table.loc["hidden_probe", ("a -> b", 3)] == pytest.approx(0.6)


def test_offload_runs_rank_the_prefetch_sources(tmp_path):
    import numpy as np

    from routelib.routing.predict.predictors import LookupPredictor
    from routelib.studies.next_expert import PREFETCH_SOURCES, offload_order, offload_runs, prefetch_guesses
    from test_routing_predict_dataset import make_data

    data = make_data(tmp_path, "deterministic", per_dataset=4, length=40)
    lookup = LookupPredictor().fit(data, [(layer, h) for h in (1, 2) for layer in range(data.num_layers - h)])
    sources = {**PREFETCH_SOURCES, "lookup_h2": ("lookup", 2), "missing": ("mlp", 1), "too far": ("perfect", 9)}
    requests, guesses = prefetch_guesses(data, {"lookup": lookup}, k=2, tokens=50, hops=(1, 2), sources=sources)
    assert requests.shape == (50, data.num_layers, 2)
    assert set(guesses) == {"none", "perfect", "perfect_h3", "lookup_h2"}  # no such predictor, no such hop: left out
    assert "lookup_h2" not in prefetch_guesses(data, {"lookup": lookup}, 2, 50, hops=(1,), sources=sources)[1]
    assert guesses["none"] == (None, 1) and guesses["perfect_h3"][1] == 3
    np.testing.assert_array_equal(np.sort(guesses["lookup_h2"][0][:, 2:], 2), np.sort(requests[:, 2:], 2))
    runs = offload_runs(requests, guesses, data.num_experts, policies=("lru",), profiles=("rtx4090-pcie4-4bit",))
    assert len(runs) == 4 and set(runs["lead"]) == {1, 2, 3}
    order = offload_order(runs, ("perfect", "none", "nothing-like-it"))
    assert list(order.columns) == ["perfect", "none", "holds"] and order["holds"].all()
    assert not offload_order(runs, ("none", "perfect"))["holds"].any()  # the reverse order fails
