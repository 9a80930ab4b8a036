"""Shared fixtures for the unit tests."""

import os

import pytest
import torch

# Notebook fixtures are driven by their own tests (test_nbval_can_fail.py), never collected by nbval.
collect_ignore_glob = ["fixtures/*"]

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is faster than two, and immune to a busy machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny randomly initialised Llama (4 layers, hidden 32, MLP 64 wide, vocabulary 8192) + the shipped
    bpe8k tokenizer, saved as ``routelib.data.load_pretrained`` reads a model folder: the real corpus
    streams feed it (the pathway study's tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from routelib.data import load_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    load_tokenizer("bpe8k").save_pretrained(path)
    return path


# ---- imported routing traces: what a user brings from a GPU cluster, no model on this machine ------------

IMPORTED_LAYOUT = {"layers": 4, "top_k": 2, "experts": 8}  # MoE layers, experts per token, experts per layer


def synthetic_routing(num_tokens: int, seed: int):
    """(experts, weights) of shapes (n, L, k) that look routed: each layer's first choice follows the
    previous layer's through a fixed permutation most of the time, the second choice is any other
    expert, and the gate weights are in descending order."""
    import numpy as np

    layers, top_k, num_experts = IMPORTED_LAYOUT["layers"], IMPORTED_LAYOUT["top_k"], IMPORTED_LAYOUT["experts"]
    rng = np.random.default_rng(seed)
    perms = np.random.default_rng(0).permuted(np.tile(np.arange(num_experts), (layers, 1)), axis=1)  # (L, E)
    experts = np.zeros((num_tokens, layers, top_k), np.int64)
    for t in range(num_tokens):
        first = int(rng.integers(num_experts))
        for layer in range(layers):
            if layer and rng.random() < 0.7:
                first = int(perms[layer, first])
            elif layer:
                first = int(rng.integers(num_experts))
            others = rng.permutation([e for e in range(num_experts) if e != first])[: top_k - 1]
            experts[t, layer] = [first, *others]
    weights = np.sort(rng.dirichlet(np.ones(top_k) * 2, (num_tokens, layers)), axis=2)[..., ::-1]
    return experts, np.ascontiguousarray(weights, dtype=np.float32)


def write_jsonl_routing(path, problems: int = 8, tokens: int = 12, seed: int = 0):
    """A JSON-lines routing log of one dataset as a hand-rolled collector writes it: one record per
    (token, layer), decode tokens only (no phase, no token ids), the lines shuffled, one token dropped
    by the collector (a gap) and one token missing a layer (skipped by the import)."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    lines = []
    for p in range(problems):
        experts, weights = synthetic_routing(tokens, seed + 1 + p)
        for t in range(tokens):
            if p == 0 and t == 5:
                continue  # dropped by the collector: a gap in token_idx
            for layer in range(IMPORTED_LAYOUT["layers"]):
                if p == 1 and t == 7 and layer == 2:
                    continue  # an incomplete token
                lines.append({"dataset": "mixtral-log", "problem_id": f"log/{p}", "token_idx": t, "layer": layer,
                              "experts": experts[t, layer].tolist(), "gating_probs": weights[t, layer].tolist()})
    path.write_text("".join(json.dumps(lines[i]) + "\n" for i in rng.permutation(len(lines))))
    return path


def write_vllm_requests(folder, per_dataset: int = 4, prompt: int = 6, output: int = 8, seed: int = 0):
    """vLLM request files (.npz, as ``convert.save_vllm_output`` writes them) for two datasets: routed
    experts of every prompt and generated token (the last generated token of every other request
    never fed back), token ids, no gate weights."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for d, dataset in enumerate(("humaneval", "gsm8k")):
        for i in range(per_dataset):
            routed_tokens = prompt + output - (i % 2)
            experts, _ = synthetic_routing(routed_tokens, seed + 100 * d + i)
            np.savez(folder / f"{dataset}-{i}.npz", routed_experts=experts.astype(np.int32),
                     prompt_token_ids=rng.integers(0, 500, prompt), output_token_ids=rng.integers(0, 500, output),
                     dataset=np.array(dataset), problem_id=np.array(f"{dataset}/{i}"))
    return folder


def import_with_cli(kind: str, tmp_dir):
    """A trace folder imported with ``python -m routelib.routing.record.convert`` (its ``main``) from
    a source made by :func:`write_jsonl_routing` or :func:`write_vllm_requests`."""
    from routelib.routing.record import convert

    out = tmp_dir / f"imported-{kind}"
    if kind == "jsonl":
        args = ["jsonl", str(write_jsonl_routing(tmp_dir / "routing.jsonl")), "--num_experts",
                str(IMPORTED_LAYOUT["experts"]), "--model", "mistralai/Mixtral-8x7B-v0.1"]
    else:
        args = ["vllm", str(write_vllm_requests(tmp_dir / "requests")), "--num_experts", str(IMPORTED_LAYOUT["experts"])]
    assert convert.main(args + ["--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session", params=["jsonl", "vllm"])
def imported_traces(request, tmp_path_factory):
    """A trace folder imported from each importer's input (JSON lines, vLLM), no model anywhere."""
    return import_with_cli(request.param, tmp_path_factory.mktemp(f"import-{request.param}"))
