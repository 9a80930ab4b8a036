"""Crash-safe file writes shared by checkpoints (routelib.train) and traces (routelib.routing):
after a crash a reader finds the old file or the new one, never a mix."""

from __future__ import annotations

import os
from pathlib import Path


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, tmp: str | os.PathLike | None = None,
                       strict_dir_sync: bool = True) -> None:
    """Write ``data`` to ``tmp`` (default ``<path>.tmp``, same folder), fsync it, rename it over
    ``path`` and fsync the folder."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent, strict=strict_dir_sync)
