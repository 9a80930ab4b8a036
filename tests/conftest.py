"""Shared fixtures for the unit tests."""

import os

import pytest
import torch

# Notebook fixtures are driven by their own tests (test_nbval_can_fail.py), never collected by nbval.
collect_ignore_glob = ["fixtures/*"]

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is faster than two, and immune to a busy machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
