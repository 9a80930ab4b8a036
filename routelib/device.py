"""Which torch device a run uses: one rule for every ``device`` setting in the package."""

from __future__ import annotations

import torch

from routelib.errors import ConfigError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None): ``cuda`` when a GPU is visible, else ``cpu``; anything else is taken as
    torch spells it (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``); a name torch does not know
    raises :class:`ConfigError`."""
    if name is None or (isinstance(name, str) and name == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:<index>'") from None
