"""Is the Hugging Face Hub reachable? Answered in at most ~2 seconds, never a minute of retries.

Every hub code path (``source="hub"`` benchmarks, ``load_pretrained("org/name")``) calls
:func:`require_hub` first, so that an offline machine gets one clear :class:`OfflineError`.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path

from routelib.errors import ModelNotFoundError, OfflineError

HUB_HOST = "huggingface.co"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_env_var() -> str | None:
    """The name of an offline switch that is set (``HF_HUB_OFFLINE=1`` ...), else None."""
    for name in _OFFLINE_VARS:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when a TCP connection to huggingface.co:443 opens within ``timeout`` seconds.

    Name resolution ignores socket timeouts, so the probe runs in a daemon thread that is
    abandoned after ``timeout``.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def require_hub(what: str) -> None:
    """Raise :class:`OfflineError` explaining that ``what`` needs the Hub, when it is unreachable."""
    var = offline_env_var()
    if var is not None:
        reason, remedy = f"{var}={os.environ[var]} is set", f"unset {var} on a machine with internet"
    elif not hub_reachable():
        reason, remedy = f"{HUB_HOST}:443 cannot be reached", "connect to the internet"
    else:
        return
    raise OfflineError(
        f"{what} needs the Hugging Face Hub, but {reason}. Use the offline source instead "
        f"(source='local', or a local model directory), or {remedy}."
    )


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # a Hub model id: "org/name" or a legacy "name"


def candidate_folders(name_or_path: str) -> list[Path]:
    """Where a model path may be: as given (absolute, or from the working directory), then from the
    repository root."""
    from routelib.paths import REPO_ROOT

    given = Path(str(name_or_path)).expanduser()
    return [given] if given.is_absolute() else [given, REPO_ROOT / given]


def local_model_folder(name_or_path: str) -> Path | None:
    """The local transformers model folder ``name_or_path`` names, or None when it names none and can be a
    Hub id (``HUB_ID``). A relative path is tried from the working directory, then from the repository
    root (notebook parameters mean the same from any directory). The one rule every loader follows
    (``load_pretrained``, the routing collector, the router-weight study; the last two through
    :func:`routelib.subject.build.model_folder`, which also takes subject v3's delta folder). Raises
    :class:`ModelNotFoundError` for a folder without ``config.json`` and for a path that does not exist
    and cannot be a Hub id (it starts with ".", "/" or "~", or has more than one "/")."""
    text = str(name_or_path)
    given = Path(text).expanduser()
    for folder in candidate_folders(text):
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise ModelNotFoundError(f"{folder} has no config.json: not a transformers model folder "
                                         "(written by save_pretrained)")
            return folder
    if given.exists() or text.startswith((".", "~")) or not HUB_ID.fullmatch(text):
        raise ModelNotFoundError(f"model folder {text!r} does not exist (resolved: {given.resolve()}), and it is "
                                 "not a Hugging Face Hub id like 'org/name'")
    return None
