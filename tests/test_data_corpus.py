"""routelib.data.corpus: domains, document splits, errors, decontamination and caching."""

import collections
import time

import pytest

from routelib.data import corpus
from routelib.data.benchmarks import load_gsm8k, load_humaneval
from routelib.data.batching import corpus_stats
from routelib.data.corpus import DOMAINS, Document, load_corpus, split_of
from routelib.errors import ConfigError


@pytest.fixture(scope="module")
def everything():
    return load_corpus(split="all")


def test_domain_sizes(everything):
    counts = collections.Counter(d.domain for d in everything)
    assert counts["math"] == 5000  # MATH: 7 subjects
    assert counts["fiction"] == 5151 + 100  # unique LAMBADA passages + CoQA Gutenberg stories
    assert counts["encyclopedic"] == 803 + 100  # SQuAD paragraphs + CoQA Wikipedia stories
    assert counts["news"] == 99
    assert 400 < counts["code"] < 1000
    chars = collections.Counter()
    for d in everything:
        chars[d.domain] += len(d.text)
    assert 7e6 < chars["code"] < 14e6
    assert 3.0e6 < chars["math"] < 4.5e6
    assert 1.6e6 < chars["fiction"] < 2.2e6


def test_document_formats(everything):
    by_id = {(d.domain, d.doc_id): d for d in everything}
    assert "class JSONDecoder" in by_id["code", "json/decoder.py"].text
    code_ids = [d.doc_id for d in everything if d.domain == "code"]
    assert not any(i.startswith(("test/", "idlelib/", "site-packages/")) or "/tests/" in i for i in code_ids)
    math = by_id["math", "algebra/0"].text
    assert math.startswith("Problem: How many vertical asymptotes") and "\nSolution: " in math
    assert by_id["fiction", "lambada/0"].text.endswith("I don't care about signs")
    squad = [d.text for d in everything if d.source == "squad"]
    assert all(not t.startswith(("Title:", "Background:")) and "\nQuestion:" not in t for t in squad)
    assert len({d.text for d in everything}) == len(everything)  # no duplicate documents


def test_splits_are_disjoint_complete_and_about_90_5_5(everything):
    parts = {s: load_corpus(split=s) for s in ("train", "validation", "test")}
    ids = {s: {(d.domain, d.doc_id) for d in docs} for s, docs in parts.items()}
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert set().union(*ids.values()) == {(d.domain, d.doc_id) for d in everything}
    n = len(everything)
    assert abs(len(ids["train"]) / n - 0.90) < 0.02
    assert abs(len(ids["validation"]) / n - 0.05) < 0.01


def test_split_assignment_is_a_fixed_hash():
    # The same on every machine and run: these values must never change.
    assert split_of("news", "coqa/3hrmw88u16qu8099nphhnncvov10mb") == "validation"
    assert split_of("code", "inspect.py") == "test"
    assert split_of("code", "json/decoder.py") == "train"
    assert split_of("math", "algebra/0") == "train"
    assert Document("code", "copy.py", "").split == "test"


def test_domains_filter_and_order():
    docs = load_corpus(["news", "math"], "validation")
    domains = [d.domain for d in docs]
    assert domains == sorted(domains, key=["news", "math"].index)
    assert set(domains) == {"news", "math"}
    assert load_corpus("news", "test") == [d for d in load_corpus(None, "test") if d.domain == "news"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(domains="poetry"), r"unknown domain.*'poetry'.*valid domains: \['code', 'math'"),
    (dict(domains=["code", "lyrics"]), r"'lyrics'"),
    (dict(split="dev"), r"unknown split 'dev'.*'train', 'validation', 'test'"),
], ids=["domain", "one-bad-domain", "split"])
def test_bad_domain_or_split(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_corpus(**kwargs)


def test_evaluation_prompts_are_not_in_the_corpus(everything):
    text = "\n".join(d.text for d in everything)
    for p in load_humaneval():
        assert p["prompt"] not in text
    for q in load_gsm8k()[::20]:
        assert q["question"] not in text


def test_contamination_filter_catches_an_evaluation_prompt():
    question = load_gsm8k()[5]["question"]
    assert corpus.is_contaminated(f"Some text.\n{question}\nMore text.")
    prompt = load_humaneval()[0]["prompt"]
    assert corpus.is_contaminated(prompt.replace("    ", "  "))  # whitespace is normalised
    assert not corpus.is_contaminated(load_corpus("fiction", "test")[0].text)


def test_parsed_corpus_is_cached_on_disk(monkeypatch):
    load_corpus()
    path = corpus._cache_path(corpus.sources_fingerprint())
    assert path.is_file()
    corpus._all_documents.cache_clear()
    monkeypatch.setattr(corpus, "build_corpus", lambda: pytest.fail("rebuilt despite the cache"))
    start = time.perf_counter()
    docs = load_corpus(split="all")
    assert time.perf_counter() - start < 3
    assert len(docs) > 11000


def test_corpus_stats_table():
    stats = corpus_stats()
    assert list(stats.columns) == ["domain", "split", "documents", "chars"]
    assert len(stats) == len(DOMAINS) * 3
    assert stats.documents.sum() == len(load_corpus(split="all"))
    with_tokens = corpus_stats("bpe8k", domains="news")
    assert list(with_tokens.columns)[-2:] == ["tokens", "tokens_per_char"]
    assert ((with_tokens.tokens_per_char > 0.15) & (with_tokens.tokens_per_char < 0.5)).all()
