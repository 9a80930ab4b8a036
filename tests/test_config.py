from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from routelib.config import from_namespace, from_params
from routelib.errors import ConfigError


@dataclass
class Cfg:
    steps: int = 10  # optimizer steps
    lr: float = 1e-3  # peak learning rate
    name: str = "moe"  # run name
    kind: Literal["naive", "grouped"] = "grouped"  # implementation
    ckpt: Optional[str] = None  # checkpoint dir


def test_defaults_and_overrides():
    cfg = from_params(Cfg, {"steps": 3, "lr": 1})  # an int for a float field is fine
    assert cfg == Cfg(steps=3, lr=1.0) and isinstance(cfg.lr, float)


def test_misspelt_name_is_rejected_with_a_hint():
    with pytest.raises(ConfigError, match=r"'lrr' \(did you mean 'lr'\?\)"):
        from_params(Cfg, {"lrr": 0.1})


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"steps": "ten"}, id="str-for-int"),
        pytest.param({"steps": True}, id="bool-for-int"),
        pytest.param({"steps": 2.5}, id="float-for-int"),
        pytest.param({"kind": "padded"}, id="literal"),
        pytest.param({"ckpt": 3}, id="optional"),
    ],
)
def test_wrong_types_are_rejected(params):
    with pytest.raises(ConfigError, match=next(iter(params))):
        from_params(Cfg, params)


def test_from_namespace_picks_parameters_and_rejects_injected_typos():
    import math

    ns = {"__name__": "__main__", "math": math, "In": [], "steps": 5, "kind": "naive", "_hidden": 1, "f": len}
    assert from_namespace(Cfg, ns) == Cfg(steps=5, kind="naive")
    ns["stepz"] = 7  # what papermill -p stepz 7 would inject
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        from_namespace(Cfg, ns)
