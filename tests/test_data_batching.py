"""routelib.data.batching: token streams, deterministic rank-split training windows, eval windows."""

import numpy as np
import pytest
import torch

from routelib.data import batching
from routelib.data.batching import TokenWindows, domain_streams, eval_batches, token_stream
from routelib.data.corpus import load_corpus
from routelib.data.tokenizer import load_tokenizer
from routelib.errors import ConfigError

STREAM = np.arange(10_000, dtype=np.uint16)  # a window's first token is its start offset


def test_windows_are_slices_of_the_stream_with_shifted_targets():
    fn = TokenWindows(STREAM, seq_len=16, batch_size=8, seed=0)
    x, y = fn(0)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row, start in zip(x, fn.global_starts(0), strict=True):
        assert torch.equal(row, torch.from_numpy(STREAM[start:start + 16].astype(np.int64)))
    assert fn.global_starts(0).max() <= len(STREAM) - 17
    assert fn.tokens_per_step == 128


def test_windows_are_deterministic_in_seed_and_step():
    a, b = TokenWindows(STREAM, 16, 8, seed=1), TokenWindows(STREAM, 16, 8, seed=1)
    assert torch.equal(a(3)[0], b(3)[0])
    assert not torch.equal(a(3)[0], a(4)[0])
    assert not torch.equal(a(3)[0], TokenWindows(STREAM, 16, 8, seed=2)(3)[0])
    assert torch.equal(a(3)[0], a(3)[0])  # calling again (any order) gives the same batch


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_ranks_split_the_global_batch(world_size):
    fn = TokenWindows(torch.from_numpy(STREAM.astype(np.int64)), seq_len=12, batch_size=8, seed=5)
    x_all, y_all = fn(7, 0, 1)
    parts = [fn(7, rank, world_size) for rank in range(world_size)]
    assert all(p[0].shape == (8 // world_size, 12) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), x_all)
    assert torch.equal(torch.cat([p[1] for p in parts]), y_all)


@pytest.mark.parametrize("call, message", [
    (lambda: TokenWindows(STREAM, 16, 6)(0, 0, 4), "not divisible by world_size"),
    (lambda: TokenWindows(STREAM, 16, 8)(0, 4, 4), "rank < world_size"),
    (lambda: TokenWindows(STREAM, 16, 8)(-1), "step must be >= 0"),
    (lambda: TokenWindows(STREAM[:10], 16, 8), "too short"),
    (lambda: TokenWindows(STREAM.reshape(100, 100), 16, 8), "1-D integer"),
], ids=["indivisible", "rank", "step", "short", "2-d"])
def test_bad_arguments(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_eval_batches_are_non_overlapping_and_fixed():
    batches = eval_batches(STREAM, seq_len=100, batch_size=32)
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (99, 100)  # (10000 - 1) // 100 full windows
    assert [len(b[0]) for b in batches] == [32, 32, 32, 3]
    assert torch.equal(x.flatten(), torch.from_numpy(STREAM[:9900].astype(np.int64)))
    assert torch.equal(batches[0][1][0, -1], torch.tensor(int(STREAM[100])))
    few = eval_batches(STREAM, seq_len=100, batch_size=4, max_windows=5)
    starts = [int(row[0]) for b in few for row in b[0]]
    assert starts == [0, 2400, 4900, 7400, 9800]  # spread over the whole stream


def test_token_stream_joins_documents_with_the_separator():
    tok = load_tokenizer("bpe8k")
    docs = load_corpus("news", "validation")
    stream = token_stream("news", "validation", "bpe8k")
    assert stream.dtype == np.uint16
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    assert (stream == sep).sum() == len(docs) and stream[-1] == sep
    texts = tok.decode(stream.tolist()).split("<|endoftext|>")
    assert texts[:-1] == [d.text for d in docs]


def test_token_streams_are_cached_and_concatenate_by_domain():
    a = token_stream("news", "test")
    assert token_stream("news", "test") is a  # in-process memo
    batching._MEMO.clear()
    b = token_stream("news", "test")  # from the .npy file
    assert b is not a and np.array_equal(a, b)
    both = token_stream(["news", "encyclopedic"], "test")
    assert np.array_equal(both, np.concatenate([a, token_stream("encyclopedic", "test")]))
    streams = domain_streams(["news", "encyclopedic"], "test")
    assert list(streams) == ["news", "encyclopedic"] and np.array_equal(streams["news"], a)
