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
