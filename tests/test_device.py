"""routelib.device.resolve_device: the one rule for 'auto' and named devices."""

import pytest
import torch

from routelib.device import resolve_device
from routelib.errors import ConfigError


def test_auto_is_cuda_when_visible_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected


def test_named_devices_pass_through():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_an_unknown_device_is_refused_by_name():
    with pytest.raises(ConfigError, match="device='gpu0'"):
        resolve_device("gpu0")
