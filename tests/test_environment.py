"""pyproject.toml is the one list of dependencies; environment.yml and the Makefile must agree with
it (the asset list is checked in test_data_assets.py)."""

import re
import tomllib

import yaml

from routelib import paths

PYPROJECT = tomllib.loads((paths.REPO_ROOT / "pyproject.toml").read_text())


def test_environment_yml_installs_the_project_with_the_makefile_extras():
    env = yaml.safe_load((paths.REPO_ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert python == "python=3.11"
    # the only pip line installs the project itself, so versions live in pyproject.toml alone
    assert len(pip_section) == 1 and pip_section[0].startswith("-e .[")
    env_extras = set(pip_section[0][len("-e .[") : -1].split(","))
    make_extras = set(re.search(r"^EXTRAS \?= (\S+)", (paths.REPO_ROOT / "Makefile").read_text(), re.M).group(1).split(","))
    assert env_extras == make_extras
    assert env_extras <= set(PYPROJECT["project"]["optional-dependencies"])


def test_cpu_extra_pins_the_local_torch_wheel():
    assert "torch==2.13.0" in PYPROJECT["project"]["optional-dependencies"]["cpu"]


def test_ci_calls_the_readme_test_command():
    readme = (paths.REPO_ROOT / "README.md").read_text()
    ci = (paths.REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci.splitlines()[-1]


def _lock() -> dict[str, str]:
    lines = (paths.REPO_ROOT / "requirements" / "cpu.lock").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_pins_every_dependency_of_the_cpu_setup():
    locked = {_norm(k) for k in _lock()}
    project = PYPROJECT["project"]
    wanted = project["dependencies"] + [d for extra in ("cpu", "notebooks", "dev")
                                        for d in project["optional-dependencies"][extra]]
    names = {_norm(re.match(r"[A-Za-z0-9_.-]+", d).group(0)) for d in wanted}
    assert names <= locked, sorted(names - locked)
    assert _lock()["torch"].startswith("2.13.0")


def test_this_environment_has_the_locked_versions():
    """`make setup` installs requirements/cpu.lock: the environment running the tests must hold
    exactly those versions (a CPU set-up made another way, e.g. a GPU machine, is skipped)."""
    import importlib.metadata as md

    import pytest

    torch_version = md.version("torch")
    if "+cpu" not in torch_version and not torch_version == _lock()["torch"]:
        pytest.skip(f"torch {torch_version}: not the locked CPU set-up")
    differ = {}
    for name, version in _lock().items():
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            have = None
        if have != version:
            differ[name] = (version, have)
    assert not differ, f"installed versions differ from requirements/cpu.lock (locked, installed): {differ}"
