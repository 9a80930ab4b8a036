"""Progress bars for long work (training, collection), silenced by ``TQDM_DISABLE=1``.

tqdm reads ``TQDM_*`` environment variables once, when it is first imported; a bar made here reads
``TQDM_DISABLE`` when the bar is made, so setting it later (a test, a notebook cell) works too."""

from __future__ import annotations

import os


def progress_bar(enabled: bool = True, **kwargs):
    """A ``tqdm.auto.tqdm`` bar (notebook widget or terminal); disabled when ``enabled`` is False or
    the environment says ``TQDM_DISABLE`` (any value but "", "0", "false")."""
    from tqdm.auto import tqdm

    quiet = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")
    return tqdm(disable=not enabled or quiet, **kwargs)
