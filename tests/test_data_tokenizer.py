"""routelib.data.tokenizer: the shipped bpe8k, its deterministic rebuild, and SmolLM2's tokenizer."""

import hashlib
import json

import pytest

from routelib.data import tokenizer as T
from routelib.data.corpus import load_corpus, sources_fingerprint
from routelib.data.tokenizer import load_tokenizer, separator_id
from routelib.errors import ConfigError

SAMPLES = [
    "def f(x):\n    return x ** 2  # square\n",
    "Problem: Find $x$ if $2x+3=7$.\nSolution: $x=\\boxed{2}$.",
    "She whispered, \"Don't go,\" and the door closed.",
    "Unicode: naïve café – 東京 😀 \t\r\n  trailing  ",
    "",
]


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer("bpe8k")


def test_shipped_bpe8k(bpe):
    assert T.BPE8K_FILE.stat().st_size < 2_000_000
    assert len(bpe) == 8192 == T.VOCAB_SIZE
    assert bpe.convert_tokens_to_ids(["<|endoftext|>", "<|pad|>"]) == [0, 1]
    assert (bpe.eos_token_id, bpe.pad_token_id) == (0, 1)
    assert separator_id(bpe) == 0
    meta = json.loads(T.BPE8K_META.read_text())
    assert meta["sha256"] == hashlib.sha256(T.BPE8K_FILE.read_bytes()).hexdigest()
    assert meta["vocab_size"] == 8192 and meta["rebuild"] == T.REBUILD_COMMAND


@pytest.mark.parametrize("text", SAMPLES, ids=["code", "math", "prose", "unicode", "empty"])
def test_bpe8k_round_trip(bpe, text):
    ids = bpe(text)["input_ids"]
    assert all(0 <= i < 8192 for i in ids)
    assert bpe.decode(ids) == text


def test_bpe8k_compresses_every_domain(bpe):
    for domain, most in [("code", 0.32), ("math", 0.45), ("fiction", 0.35), ("encyclopedic", 0.35)]:
        text = "".join(d.text for d in load_corpus(domain, "validation")[:20])
        ratio = len(bpe(text)["input_ids"]) / len(text)
        assert 0.15 < ratio < most, (domain, ratio)


def test_training_is_deterministic():
    texts = [d.text for d in load_corpus(["math", "news"], "train")[:400]]
    a = T.train_bpe(texts, vocab_size=600).to_str()
    b = T.train_bpe(texts, vocab_size=600).to_str()
    assert a == b
    assert json.loads(a)["model"]["vocab"]["<|endoftext|>"] == 0


def test_rebuild_reproduces_the_shipped_file(tmp_path):
    import tokenizers

    meta = json.loads(T.BPE8K_META.read_text())
    if meta["corpus_fingerprint"] != sources_fingerprint() or meta["tokenizers"] != tokenizers.__version__:
        pytest.skip(f"shipped bpe8k was trained on Python {meta['python']}, "
                    f"tokenizers {meta['tokenizers']}")
    rebuilt = tmp_path / "bpe8k.json"
    assert T.main(["--rebuild", "--out", str(rebuilt)]) == 0
    assert rebuilt.read_bytes() == T.BPE8K_FILE.read_bytes()


def test_load_by_path_and_directory(bpe, tmp_path):
    by_file = load_tokenizer(T.BPE8K_FILE)
    assert by_file("hello world")["input_ids"] == bpe("hello world")["input_ids"]
    bpe.save_pretrained(tmp_path)
    by_dir = load_tokenizer(str(tmp_path))
    assert by_dir("hello world")["input_ids"] == bpe("hello world")["input_ids"]
    assert by_dir.eos_token == "<|endoftext|>"
    assert load_tokenizer(bpe) is bpe


def test_unknown_tokenizer():
    with pytest.raises(ConfigError, match=r"unknown tokenizer 'gpt5'.*\['bpe8k', 'smollm2'\]"):
        load_tokenizer("gpt5")


def test_smollm2_tokenizer():
    tok = load_tokenizer("smollm2")
    assert len(tok) == 49152
    assert tok.eos_token == "<|im_end|>"
    assert separator_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>") == 0
    ids = tok("The capital of France is")["input_ids"]
    assert ids == [504, 3575, 282, 4649, 314]
    for text in SAMPLES[:4]:
        assert tok.decode(tok(text)["input_ids"]) == text
