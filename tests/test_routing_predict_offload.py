"""routelib.routing.predict.offload: the simulator against cases computed by hand."""

import numpy as np
import pytest

from routelib.errors import ConfigError
from routelib.routing.predict.offload import PROFILES, HardwareProfile, expert_bytes, simulate

T, L, E, K = 10, 4, 4, 2


def alternating() -> np.ndarray:
    """Every token needs the experts the previous token did not, at every layer: {0,1}, {2,3}, {0,1}, ..."""
    req = np.zeros((T, L, K), np.int64)
    for t in range(T):
        req[t] = [[0, 1]] * L if t % 2 == 0 else [[2, 3]] * L
    return req


def profile(slots: int, copy_s: float, compute_s: float, overlap: bool = True) -> HardwareProfile:
    return HardwareProfile("test", expert_bytes=copy_s * 1e9, slots_per_layer=slots, h2d_bytes_per_s=1e9,
                           layer_compute_s=compute_s, overlap=overlap, max_inflight=8)


def test_everything_in_gpu_memory_never_stalls():
    result = simulate(alternating(), E, profile(slots=E, copy_s=1.0, compute_s=0.01))
    assert result.stall_s == 0 and result.bytes_moved == 0
    assert result.time_per_token_s == pytest.approx(L * 0.01)


@pytest.mark.parametrize("overlap", [True, False])
def test_no_reuse_and_no_prediction_copies_every_expert_every_layer(overlap):
    """Slots for one layer's experts and tokens that never reuse them: time = compute + k copies a layer."""
    copy, compute = 0.004, 0.001
    result = simulate(alternating(), E, profile(K, copy, compute, overlap))
    assert result.hit_rate == 0
    assert result.time_per_token_s == pytest.approx(L * (compute + K * copy))
    assert result.bytes_moved == pytest.approx(T * L * K * copy * 1e9)


def test_a_perfect_predictor_with_enough_lead_hides_every_copy_but_the_first():
    copy, compute = 0.001, 0.003  # k copies (2 ms) fit in one layer's compute (3 ms)
    req = alternating()
    result = simulate(req, E, profile(K, copy, compute), predictions=req, lead=1)
    assert result.stall_s == pytest.approx(K * copy)  # only the first layer of the first token waits
    assert result.compute_s == pytest.approx(T * L * compute)


def test_a_perfect_predictor_stalls_by_what_the_copy_exceeds_the_lead():
    copy, compute = 0.002, 0.003  # k copies take 4 ms against 3 ms of compute: 1 ms short every layer
    req = alternating()
    result = simulate(req, E, profile(K, copy, compute), predictions=req, lead=1)
    assert result.stall_s == pytest.approx(K * copy + (T * L - 1) * (K * copy - compute))


def test_without_overlap_a_prediction_buys_nothing():
    copy, compute = 0.001, 0.003
    req = alternating()
    plain = simulate(req, E, profile(K, copy, compute, overlap=False))
    predicted = simulate(req, E, profile(K, copy, compute, overlap=False), predictions=req)
    assert predicted.time_per_token_s == pytest.approx(plain.time_per_token_s)


def test_a_cache_with_reuse_needs_fewer_copies():
    req = np.tile(np.array([[0, 1]]), (T, L, 1))  # the same experts every token
    result = simulate(req, E, profile(K, 0.004, 0.001))
    assert result.bytes_moved == pytest.approx(L * K * 0.004 * 1e9)  # each expert copied once
    assert result.hit_rate == pytest.approx(1 - 1 / T)


def test_belady_is_never_slower_than_lru_on_random_traces():
    rng = np.random.default_rng(0)
    req = np.stack([[rng.choice(8, 2, replace=False) for _ in range(L)] for _ in range(40)])
    prof = profile(3, 0.002, 0.001)
    assert simulate(req, 8, prof, policy="belady").bytes_moved <= simulate(req, 8, prof, policy="lru").bytes_moved


def test_profiles_state_their_sources():
    for prof in PROFILES.values():
        assert {"expert_bytes", "slots_per_layer", "h2d_bytes_per_s", "layer_compute_s"} <= set(prof.sources)
        assert 2 <= prof.slots_per_layer <= 8 and prof.copy_s > 0
    assert expert_bytes(bits=16) == 3 * 4096 * 14336 * 2


@pytest.mark.parametrize("kw, match", [(dict(policy="static"), "policy='static'"), (dict(lead=0), "lead=0")])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        simulate(alternating(), E, profile(K, 0.001, 0.001), **kw)


def test_too_few_slots_is_refused():
    with pytest.raises(ConfigError, match="cannot hold"):
        simulate(alternating(), E, profile(1, 0.001, 0.001))


@pytest.mark.parametrize("policy", ["lru", "lfu", "least_stale", "belady"])
def test_a_perfect_prefetch_moves_no_more_bytes_and_never_slows_decoding(policy):
    rng = np.random.default_rng(1)
    req = np.stack([[rng.choice(8, 2, replace=False) for _ in range(L)] for _ in range(40)])
    prof = profile(3, 0.002, 0.001)
    plain = simulate(req, 8, prof, policy=policy)
    ahead = simulate(req, 8, prof, policy=policy, predictions=req)
    assert ahead.bytes_moved == pytest.approx(plain.bytes_moved) and ahead.time_per_token_s <= plain.time_per_token_s
    wrong = simulate(req, 8, prof, policy=policy, predictions=(req + 4) % 8)  # never right
    assert wrong.bytes_moved > plain.bytes_moved


def test_a_trained_predictor_drives_prefetch_without_seeing_the_layer_it_predicts(tmp_path):
    from routelib.routing.predict.offload import decoding_requests, predictor_predictions
    from routelib.routing.predict.predictors import LookupPredictor
    from test_routing_predict_dataset import make_data

    data = make_data(tmp_path, "deterministic")  # layer l+1's set is a function of layer l's
    lookup = LookupPredictor().fit(data, [(layer, 1) for layer in range(data.num_layers - 1)])
    requests, predictions = predictor_predictions(data, lookup, m=data.top_k)
    np.testing.assert_array_equal(requests, decoding_requests(data))
    np.testing.assert_array_equal(np.sort(predictions[:, 1:], 2), np.sort(requests[:, 1:], 2))  # learnt exactly
    np.testing.assert_array_equal(predictions[1:, 0], requests[:-1, 0])  # layer 0: the previous token's
    scrambled = data.experts.copy()  # change what layer 2 routed: layer 2's guesses must not move
    scrambled[:, 2] = (scrambled[:, 2] + 3) % data.num_experts
    data.experts = scrambled
    _, again = predictor_predictions(data, lookup, m=data.top_k)
    np.testing.assert_array_equal(again[:, 2], predictions[:, 2])


def test_a_two_hop_predictor_reads_two_layers_back(tmp_path):
    from routelib.routing.predict.offload import predictor_predictions
    from routelib.routing.predict.predictors import LookupPredictor
    from test_routing_predict_dataset import make_data

    data = make_data(tmp_path, "deterministic")
    lookup = LookupPredictor().fit(data, [(layer, 2) for layer in range(data.num_layers - 2)])
    requests, predictions = predictor_predictions(data, lookup, m=data.top_k, hop=2)
    np.testing.assert_array_equal(np.sort(predictions[:, 2:], 2), np.sort(requests[:, 2:], 2))
    np.testing.assert_array_equal(predictions[1:, :2], requests[:-1, :2])  # layers 0, 1: the previous token's
    scrambled = data.experts.copy()  # change what layer 1 routed: layer 2's guesses (from layer 0) must not move
    scrambled[:, 1] = (scrambled[:, 1] + 3) % data.num_experts
    data.experts = scrambled
    _, again = predictor_predictions(data, lookup, m=data.top_k, hop=2)
    np.testing.assert_array_equal(again[:, 2], predictions[:, 2])
    assert not np.array_equal(again[:, 3], predictions[:, 3])  # layer 3's come from layer 1: they move
    with pytest.raises(ConfigError, match="hop=4"):
        predictor_predictions(data, lookup, m=2, hop=4)
