"""Crash-safe writes and file hashes, one way for the whole package.

:func:`atomic_write` is the only place that renames a finished file or folder into place: checkpoints
(:mod:`routelib.train`), traces and their manifests (:mod:`routelib.routing.record`), reference-run
results and manifests (:mod:`routelib.reference`), caches of tokenised corpora and converted models
(:mod:`routelib.data`) and GPU step folders (:mod:`routelib.gpu.plan`) all go through it. After a
crash a reader finds the old version or the new one, never a mix.

The temporary sits beside the target (same folder, so the rename is atomic) under a hidden name,
``.<name>.tmp-<pid>-<random>``: no two processes share one, and no glob of the folder's real files
(``step_*``, ``*.parquet``) sees it.

fsync policy, stated once: with ``sync=True`` (the default) the temporary -- every file of it, for a
folder -- is fsynced before the rename and the parent folder after it, so a finished write survives a
power loss (checkpoints, traces, manifests, results). ``sync=False`` is for caches that are rebuilt
when missing (tokenised corpora, converted models): the rename is still atomic, only durability is
left to the operating system. A filesystem that refuses to fsync a folder is tolerated.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"  # in every temporary's name: .<name>.tmp-<pid>-<random>


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh hidden temporary name beside ``path``, unique to this process and call."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an :func:`atomic_write` temporary (finished writers never leave one)."""
    name = Path(path).name
    return name.startswith(".") and TMP_MARK in name


def fsync_path(path: str | os.PathLike, strict: bool = True) -> None:
    """fsync a file or a directory (so a rename inside it is durable); a no-op where the platform
    cannot open directories. ``strict=False`` also ignores a failing fsync (some filesystems refuse
    it on directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            fsync_path(p, strict=not p.is_dir())
    fsync_path(path, strict=not path.is_dir())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: str | os.PathLike, *, sync: bool = True, keep_existing: bool = False) -> Iterator[Path]:
    """Write ``path`` (a file or a folder) all at once: yields a temporary path beside it; whatever the
    block writes there (a file, or a folder of files) replaces ``path`` when the block ends, and is
    removed if the block raises (``path`` is then untouched).

    ``sync``: fsync before and after the rename (the module docstring's policy). ``keep_existing``: if
    ``path`` exists when the block ends (another process finished the same cache first), keep it and
    drop ours. A folder replacing an existing folder: the old one is moved aside, the new one renamed
    in, the old one deleted (a reader sees the old or the new folder, never a mix).

    Example::

        with atomic_write(out / "table.parquet") as tmp:
            df.to_parquet(tmp)
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_write({path}): the block wrote nothing at {tmp}")
        if sync:
            _fsync_tree(tmp)
        if path.exists() and keep_existing:
            _remove(tmp)
            return
        if path.is_dir() and not path.is_symlink():
            old = temporary_path(path)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
        if sync:
            fsync_path(path.parent, strict=False)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, sync: bool = True) -> None:
    """``data`` written to ``path`` through :func:`atomic_write`."""
    with atomic_write(path, sync=sync) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
