"""Every MoE architecture of the installed transformers, as a tiny random model: the collected routing
equals what the experts modules received (prompt and generated tokens, gate weights included), and
``moe_weights`` reproduces every expert's output. The README table is this run's table."""

import functools

import pytest

from routelib import paths
from routelib.routing.record import architectures as C

pytestmark = pytest.mark.usefixtures("one_thread")

TYPES = list(C.moe_model_types())


@functools.lru_cache(maxsize=None)
def _tokenizer():
    return C._tokenizer()


@functools.lru_cache(maxsize=None)
def result(model_type: str) -> C.Coverage:
    return C.check_type(model_type, _tokenizer())


def test_the_registry_is_read_not_pinned():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "llama4_text"} <= set(TYPES) <= causal
    assert "llama" not in TYPES and "gpt2" not in TYPES  # dense models declare no experts
    assert set(C.UNSERVED_COLLECTION) <= set(TYPES) and set(C.UNSERVED_WEIGHTS) <= set(TYPES)


def assert_exact_or_refused_by_name(r, unserved: dict, status: str, note: str):
    """A served type passed its ground-truth check; an unserved one was refused naming the model
    (an xfail carrying the reason)."""
    if r.model_type in unserved:
        assert status == C.UNSERVED and r.architecture in note, note
        pytest.xfail(f"not served: {unserved[r.model_type]}")
    assert status == C.EXACT, note


@pytest.mark.parametrize("model_type", TYPES)
def test_collection_equals_what_the_experts_received(model_type):
    r = result(model_type)
    assert_exact_or_refused_by_name(r, C.UNSERVED_COLLECTION, r.collection, r.collection_note)
    assert r.tokens > C.NEW_TOKENS and r.layers >= 1


@pytest.mark.parametrize("model_type", TYPES)
def test_moe_weights_reproduce_every_expert(model_type):
    r = result(model_type)
    assert_exact_or_refused_by_name(r, C.UNSERVED_WEIGHTS, r.weights, r.weights_note)


TABLE_PAGE = "docs/04_mixtral_routing_collection.md"  # the page that holds the supported-architecture table


def test_readme_table_is_this_run():
    import transformers

    readme = C.readme_table(paths.in_repo(TABLE_PAGE).read_text())
    if f"transformers {transformers.__version__} " not in readme:  # pyproject does not pin transformers
        pytest.skip(f"the README table was made with another transformers than {transformers.__version__}; "
                    f"regenerate it: python -m routelib.routing.record.architectures --readme docs/04_mixtral_routing_collection.md")
    table = C.coverage_table([result(t) for t in TYPES])
    assert readme == table, "regenerate: python -m routelib.routing.record.architectures --readme docs/04_mixtral_routing_collection.md"
