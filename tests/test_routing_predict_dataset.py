"""routelib.routing.predict.dataset: the synthetic traces every routing-prediction test reads (a known
structure per layer, written as a valid trace folder); gate vectors; the hidden states recomputed on a
tiny Mixtral reproduce the traced routing, and another model or a torn sequence is refused."""

import numpy as np
import pytest
import torch

from routelib.routing import predict as P
from routelib.routing.predict import dataset as D
from routelib.routing.record import traces as T
from routelib.routing.predict.dataset import HiddenStatesUnavailable, PredictorError

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, EXPERTS, K = 4, 8, 2


# ---- synthetic traces ------------------------------------------------------------------------------


def random_sets(rng, n, num_experts=EXPERTS, k=K):
    """(n, k) distinct expert ids per row, uniformly random."""
    return np.argsort(rng.random((n, num_experts)), axis=1)[:, :k]


def synthetic_arrays(kind, n, seed=0, num_layers=LAYERS, num_experts=EXPERTS, k=K):
    """experts and weights (n, L, k) with a known structure:
    deterministic: the set of layer l+1 = (the set of layer l + l + 1) mod E, the lower id first;
    same: every layer repeats layer 0; xor: layer 2 depends on layers 0 and 1 together, on neither
    alone; independent: every layer uniformly random, gate weights random."""
    rng = np.random.default_rng(seed)
    experts = np.zeros((n, num_layers, k), np.int64)
    experts[:, 0] = random_sets(rng, n, num_experts, k)
    for layer in range(1, num_layers):
        if kind == "deterministic":  # the next set, lower id in slot 0: a function of the previous set
            experts[:, layer] = np.sort((experts[:, layer - 1] + layer) % num_experts, axis=1)
        elif kind == "same":
            experts[:, layer] = experts[:, 0]
        elif kind == "independent":
            experts[:, layer] = random_sets(rng, n, num_experts, k)
        elif kind == "xor":  # layer 1 random in {0,1}x{2,3}; layer 2 = {4,5} if parities agree else {6,7}
            experts[:, layer] = random_sets(rng, n, num_experts, k) if layer != 2 else 0
    if kind == "xor":
        bits0, bits1 = rng.integers(0, 2, n), rng.integers(0, 2, n)
        experts[:, 0] = np.stack([bits0, 2 + bits0], 1)  # layer-0 sets {0,2} or {1,3}
        experts[:, 1] = np.stack([bits1, 2 + bits1], 1)
        experts[:, 2] = np.where((bits0 == bits1)[:, None], [4, 5], [6, 7])
    if kind == "independent":
        weights = np.sort(rng.dirichlet(np.ones(k), (n, num_layers)), axis=2)[..., ::-1]
    else:
        weights = np.broadcast_to(np.linspace(0.6, 0.4, k) / np.linspace(0.6, 0.4, k).sum(), (n, num_layers, k))
    return experts, np.ascontiguousarray(weights, dtype=np.float32)


def write_traces(out, experts, weights, problems, num_experts=EXPERTS, token_ids=None, model="no/such-model"):
    """A valid trace folder: ``problems`` is a list of (dataset, problem_id, length) covering the rows
    in order; one shard per dataset; first half of each problem "prompt", the rest "generated"."""
    out.mkdir(parents=True, exist_ok=True)
    rows = sum(length for _, _, length in problems)
    assert rows == len(experts)
    token_ids = np.arange(rows) % 50 if token_ids is None else token_ids
    num_layers, k = experts.shape[1:]
    shards, datasets, start = [], {}, 0
    for name in dict.fromkeys(d for d, _, _ in problems):
        cols = {c: [] for c in T.SCALAR_COLUMNS}
        index, first = 0, start
        for d, pid, length in problems:
            if d != name:
                continue
            cols["dataset"] += [d] * length
            cols["problem_id"] += [pid] * length
            cols["problem_index"] += [index] * length
            cols["position"] += list(range(length))
            cols["phase"] += ["prompt"] * (length // 2) + ["generated"] * (length - length // 2)
            index += 1
        n = len(cols["dataset"])
        cols["token_id"] = [int(t) for t in token_ids[first:first + n]]
        cols["token_text"] = [str(t) for t in cols["token_id"]]
        table = T.shard_table(cols, experts[first:first + n], weights[first:first + n], None, num_experts)
        fname = T.shard_name(name, 0)
        shards.append({"file": fname, "dataset": name, "rows": n, **T.shard_counts(table),
                       **T.write_shard(out / fname, table)})
        datasets[name] = {"num_problems": index}
        start += n
    manifest = {"format": T.FORMAT, "format_version": T.FORMAT_VERSION, "model": {"name_or_path": model},
                "tokenizer": {"vocab_size": 50},
                "layout": {"num_moe_layers": num_layers, "moe_layers": list(range(num_layers)), "top_k": k,
                           "num_experts": num_experts, "full_distribution": False},
                "datasets": datasets, "shards": shards}
    T.write_trace_manifest(out, manifest)
    return out


def problem_list(per_dataset, length, datasets=("code", "math")):
    return [(d, f"{d}/{i}", length) for d in datasets for i in range(per_dataset)]


def make_data(tmp_path, kind, per_dataset=10, length=40, seed=0, **kw):
    problems = problem_list(per_dataset, length)
    experts, weights = synthetic_arrays(kind, sum(p[2] for p in problems), seed, **kw)
    out = write_traces(tmp_path / kind, experts, weights, problems, num_experts=kw.get("num_experts", EXPERTS))
    return D.load_routing(out)


@pytest.fixture(scope="module")
def deterministic(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("det"), "deterministic")


# ---- the data ------------------------------------------------------------------------------------


def test_gate_vectors_renormalise():
    g = D.gate_vectors(np.array([[3, 1]]), np.array([[0.3, 0.1]], np.float32), 4)
    np.testing.assert_allclose(g, [[0, 0.25, 0, 0.75]])


# ---- the hidden states on a real (tiny) model ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_traces(tmp_path_factory):
    from test_routing_record_collect import run, tiny_model

    from routelib.data.tokenizer import load_tokenizer

    model = tiny_model("mixtral")
    prompts = {f"p{i}": text for i, text in enumerate(
        ["def add(a, b):", "Question: 2 + 2?\nAnswer:", "Once upon a time", "import os\nimport sys", "x = [1, 2, 3]",
         "The capital of France is", "for i in range(10):", "class A:\n    pass"])}
    out = tmp_path_factory.mktemp("tiny") / "traces"
    run(model, load_tokenizer("bpe8k"), out, prompts=prompts, max_new_tokens=10, batch_size=4)
    return model, out


def test_hidden_states_reproduce_the_traced_routing(tiny_traces):
    model, out = tiny_traces
    data = D.load_routing(out)
    hidden = D.attach_hidden_states(data, model, batch_tokens=64, progress=False)  # several padded batches
    assert hidden.agreement == 1.0 and hidden.x.shape == (len(data), 3, 32) and hidden.x.dtype == np.float16
    routers = [layer.mlp.gate for layer in model.model.layers]
    zero_shot = P.HiddenRouterPredictor().fit(data, [(0, 1), (0, 2), (1, 1)])
    for layer, hop in [(0, 1), (0, 2), (1, 1)]:
        with torch.no_grad():
            logits = routers[layer + hop](torch.from_numpy(hidden.x[:, layer]).float())[0]
        np.testing.assert_allclose(zero_shot.predict_scores(data, layer, hop), torch.softmax(logits, -1).numpy(),
                                   rtol=1e-5, atol=1e-6)
    # each router applied to its own layer's input gives back the traced top-k: the input is the right one
    for layer in range(3):
        with torch.no_grad():
            ids = routers[layer](torch.from_numpy(hidden.x[:, layer]).float())[2].numpy()
        assert (np.sort(ids, 1) == np.sort(data.experts[:, layer], 1)).mean() > 0.99


def test_hidden_states_refuse_another_model(tiny_traces):
    from test_routing_record_collect import tiny_model

    _, out = tiny_traces
    with pytest.raises(HiddenStatesUnavailable, match="router weights differ"):
        D.attach_hidden_states(D.load_routing(out), tiny_model("mixtral", seed=1), progress=False)
    token_split = D.load_routing(out)
    token_split = token_split.take(np.arange(1, len(token_split)))  # position 0 of the first problem missing
    with pytest.raises(PredictorError, match="positions are not 0..n-1"):
        D.attach_hidden_states(token_split, tiny_traces[0], progress=False)
