"""Every decimal number a reader is told has a source: README's headline rows, each study's page under
``docs/`` and each notebook's markdown are checked against the numbers of the files the study
committed -- the notebook's own outputs (what its cells printed), its reference run's files under
``data/reference/<notebook>/`` and the benchmark files under ``data/reference/bench/`` -- and, for the
few figures quoted from outside the project, a list below that names their source.

A number written with d decimals is found when some number in those files rounds to it at d decimals,
read as it is, as a percentage (x 100) or in thousands, millions or billions (k, M, G). This catches a
stale or invented number; it does not prove that a number is paired with the right quantity (the
headline claims are checked one by one in ``test_published_numbers.py``). Integers are not checked
(counts, layer indices and sizes are too often exact by construction), nor numbers inside code
(```` ``` ```` blocks and `inline code`: commands and their options), nor arXiv identifiers.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import pytest

from routelib import paths

ROOT = paths.REPO_ROOT
REF = ROOT / "data" / "reference"
STUDIES = {n: next(paths.NOTEBOOKS_DIR.glob(f"0{n}_*.ipynb")).stem for n in range(1, 7)}

#: Numbers quoted from outside the project, per study: value -> where it comes from.
ORIGINAL = "the original project's README, whose claims the notebook tests (quoted as such)"
EXTERNAL: dict[int, dict[str, str]] = {
    1: {},
    2: {"3.83": ORIGINAL, "4.43": ORIGINAL, "46.8": ORIGINAL, "83.6": ORIGINAL},
    3: {},
    4: {},
    5: {"4.5": ORIGINAL, "55.6": ORIGINAL, "73.2": ORIGINAL},
    6: {},
}


def _wall_minutes(n: int, k: int) -> float:
    """Minutes of the k-th recorded invocation of study n's reference run."""
    return json.loads((REF / STUDIES[n] / "invocations.json").read_text())[k]["wall_s"] / 60


def _train_minutes_02() -> float:
    """Notebook 02's reference runs: one-thread training minutes, tokens / measured training speed."""
    runs = [json.loads(p.read_text()) for p in (REF / STUDIES[2] / "final").glob("*.json")]
    return sum(r["tokens"] / r["train_tokens_per_s"] for r in runs) / 60


#: Numbers the text derives from result files by a computation more than a change of unit: value ->
#: that computation, checked to give the value at the decimals written.
DERIVED: dict[int, dict[str, object]] = {
    1: {"72.5": lambda: _wall_minutes(1, 0), "39.7": lambda: _wall_minutes(1, 2)},
    2: {"153.6": _train_minutes_02},
}
#: Extra result files a study's text quotes besides its notebook and data/reference/<notebook>/.
EXTRA_SOURCES: dict[int, tuple[str, ...]] = {
    4: ("data/moe-subject/README.md", "data/moe-subject/config.json"),
    5: ("data/moe-subject/README.md",),
}

_DECIMAL = re.compile(r"(?<![\w.])[-+−]?\d+\.\d+(?![\w.])")
_ANY = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_SCALES = (1.0, 100.0, 1e-3, 1e-6, 1e-9)


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"arXiv:? ?\d{4}\.\d{4,5}", " ", text)  # paper identifiers are not measurements
    return re.sub(r"`[^`\n]*`", " ", text)


def decimals(text: str) -> list[str]:
    """The decimal numbers written in the prose of ``text`` (signs and the minus sign − dropped)."""
    return [m.group(0).lstrip("+-−") for m in _DECIMAL.finditer(prose(text))]


def numbers_in(text: str) -> set[float]:
    return {float(m.group(0)) for m in _ANY.finditer(text)}


def notebook_outputs(name: str) -> str:
    cells = json.loads((paths.NOTEBOOKS_DIR / f"{name}.ipynb").read_text())["cells"]
    parts = []
    for cell in cells:
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", [])))
            for kind in ("text/plain", "text/markdown", "text/html"):
                parts.append("".join(out.get("data", {}).get(kind, [])))
    return "\n".join(parts)


def notebook_markdown(name: str) -> str:
    cells = json.loads((paths.NOTEBOOKS_DIR / f"{name}.ipynb").read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


@lru_cache(maxsize=None)
def source_numbers(n: int) -> frozenset[float]:
    """Every number in study ``n``'s committed result files (see the module docstring)."""
    name = STUDIES[n]
    found = numbers_in(notebook_outputs(name))
    folders = [*REF.glob(f"{name}*"), REF / "bench"]  # the reference run (and one in progress), benchmarks
    files = [p for folder in folders if folder.is_dir() for p in folder.rglob("*")]
    files += [ROOT / f for f in EXTRA_SOURCES.get(n, ())]
    for path in files:
        if path.is_file() and path.suffix in (".csv", ".json", ".md") and path.stat().st_size < 20_000_000:
            found |= numbers_in(path.read_text(errors="replace"))
    return frozenset(found)


def has_source(value: str, pool: frozenset[float]) -> bool:
    d = len(value.split(".")[1])
    target = round(float(value), d)
    return any(abs(round(abs(p) * s, d) - target) < 10 ** -(d + 3) for p in pool for s in _SCALES)


def unsourced(text: str, n: int) -> list[str]:
    pool, external, derived = source_numbers(n), EXTERNAL[n], DERIVED.get(n, {})
    return [v for v in decimals(text) if v not in external and v not in derived and not has_source(v, pool)]


@pytest.mark.parametrize("n,value", [(n, v) for n, d in sorted(DERIVED.items()) for v in d])
def test_derived_numbers_recompute(n, value):
    got = DERIVED[n][value]()
    assert f"{got:.{len(value.split('.')[1])}f}" == value, f"study {n}: the text says {value}, the files give {got}"


def readme_row(n: int) -> str:
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(f"| `{STUDIES[n]}` |")]
    assert len(rows) == 1, f"README has {len(rows)} headline rows for {STUDIES[n]}"
    return rows[0]


def texts(n: int) -> dict[str, str]:
    page = next((ROOT / "docs").glob(f"0{n}_*.md"))
    return {"README row": readme_row(n), str(page.relative_to(ROOT)): page.read_text(),
            f"notebook {STUDIES[n]} (markdown)": notebook_markdown(STUDIES[n])}


@pytest.mark.parametrize("n", sorted(STUDIES))
def test_every_number_has_a_source(n):
    bad = {where: miss for where, text in texts(n).items() if (miss := unsourced(text, n))}
    assert not bad, f"numbers with no source among study {n}'s result files: {bad}"


def test_a_changed_number_fails():
    """The check can fail: a README number moved to a value no result file holds is reported."""
    row = readme_row(2)
    value = decimals(row)[0]
    pool = source_numbers(2)
    d = len(value.split(".")[1])
    step = 10 ** -d
    changed = next(f"{float(value) + k * step:.{d}f}" for k in range(1, 1000)
                   if not has_source(f"{float(value) + k * step:.{d}f}", pool))
    assert unsourced(row, 2) == [] and unsourced(row.replace(value, changed, 1), 2) == [changed]


def test_prose_skips_code():
    assert decimals("lr `0.002` and\n```\n--lr 0.003\n```\n a gap of −0.142 nats") == ["0.142"]
