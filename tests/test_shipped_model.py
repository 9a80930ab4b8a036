"""The shipped routing subject (data/moe-subject, v2): transformers loads it offline as a Mixtral model,
it reproduces the validation perplexities written in its model card, and its training snapshots load."""

import json

import pytest
import torch

from routelib import paths
from routelib.routing.analyse.snapshots import load_snapshots
from routelib.studies import moe_vs_dense as study
from routelib.studies.moe_vs_dense import subject

SUBJECT = paths.DATA_DIR / "moe-subject"
V1_OVERALL_PERPLEXITY = 71.87  # subject v1 (4.1 M tokens, 256-token context) on the same 256-token windows


@pytest.fixture(scope="module")
def card():
    return json.loads((SUBJECT / "model_card.json").read_text())


def test_card_names_the_command_and_the_sizes(card):
    assert card["command"].startswith("python -m routelib.studies.moe_vs_dense subject --out data/moe-subject")
    lm = card["lm_config"]
    assert lm["num_experts"] == 8 and lm["top_k"] == 2 and lm["num_layers"] >= 6
    assert card["tokens_seen"] >= 12e6 and card["train_wall_s"] > 0
    assert (SUBJECT / "model.safetensors").stat().st_size < 50e6


def test_transformers_loads_it_and_reproduces_the_card_perplexities(card):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SUBJECT, dtype=torch.float32).eval()
    assert isinstance(model, MixtralForCausalLM)
    assert model.config.max_position_embeddings >= card["study_config"]["seq_len"]
    headline, at_context = subject.card_eval_sets(study.MoEStudyConfig(**card["study_config"]))
    for key, data in (("validation_perplexity", headline), ("validation_perplexity_at_context", at_context)):
        ppl = study.perplexity_by_domain(model, data)
        for domain, expected in card[key].items():
            assert ppl[domain] == pytest.approx(expected, rel=1e-3), (key, domain)
    assert card["validation_perplexity"]["overall"] < V1_OVERALL_PERPLEXITY


def test_training_snapshots_load_and_end_at_the_shipped_routers(card):
    from routelib.routing.analyse.weights import moe_weights
    from transformers import AutoModelForCausalLM

    snaps = load_snapshots(SUBJECT / subject.SNAPSHOTS_FILE)
    assert snaps.steps.tolist() == card["training_snapshots"]["steps"] and len(snaps.steps) >= 11  # init + >= 10
    assert snaps.steps[-1] == card["steps"]
    routers = moe_weights(AutoModelForCausalLM.from_pretrained(SUBJECT, dtype=torch.float32)).routers().numpy()
    assert (snaps.routers[-1] == routers).all()
    assert sum(p.stat().st_size for p in SUBJECT.iterdir()) < 50e6
