"""Shared fixtures for the unit tests."""

import os

# Notebook fixtures are driven by their own tests (test_nbval_can_fail.py), never collected by nbval.
collect_ignore_glob = ["fixtures/*"]

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
