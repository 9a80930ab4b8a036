"""The shipped routing subject (data/moe-subject): transformers loads it offline as a Mixtral model
and it reproduces the validation perplexity written in its model card."""

import json

import pytest
import torch

from routelib import paths
from routelib.studies import moe_vs_dense as study

SUBJECT = paths.DATA_DIR / "moe-subject"


@pytest.fixture(scope="module")
def card():
    return json.loads((SUBJECT / "model_card.json").read_text())


def test_card_names_the_command_and_the_sizes(card):
    # v1 was made before the layout move; routelib.moe_study is now routelib.studies.moe_vs_dense (same code)
    assert card["command"].startswith(("python -m routelib.studies.moe_vs_dense subject", "python -m routelib.moe_study subject"))
    assert card["lm_config"]["num_experts"] == 8 and card["lm_config"]["top_k"] == 2
    assert (SUBJECT / "model.safetensors").stat().st_size < 50e6


def test_transformers_loads_it_and_reproduces_the_card_perplexity(card):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SUBJECT, dtype=torch.float32).eval()
    assert isinstance(model, MixtralForCausalLM)
    keep = {k: v for k, v in card["study_config"].items() if k in ("tokenizer", "seq_len", "eval_windows")}
    cfg = study.MoEStudyConfig(**keep)
    ppl = study.perplexity_by_domain(model, study.domain_eval_data(cfg))
    for domain, expected in card["validation_perplexity"].items():
        assert ppl[domain] == pytest.approx(expected, rel=1e-3), domain
