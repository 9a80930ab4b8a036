"""The notebooks as researchers meet them: a real JupyterLab in a real browser.

    make browser-test          # this file alone; `make test` runs it after nbval

JupyterLab starts from this environment on a free local port (token-protected, its kernels import
this checkout's routelib); Playwright drives Debian's Chromium (``/usr/bin/chromium``, or
``$ROUTELIB_CHROMIUM``; never ``playwright install``). For every notebook the test opens a copy
under ``runs/browser/`` (committed outputs cleared, committed parameters), clicks Run > Run All
Cells, waits until the kernel is idle and fails on any error output or cell left unexecuted. Then,
for every interactive widget (a widget output with a dropdown, slider or button), it changes each
control in turn and fails unless what the view shows -- its HTML text, highlighted token, grid
values or images -- changes within a timeout. Each dashboard is saved before and after as
``runs/screenshots/<notebook>-widget<k>-before.png`` / ``-after.png``.

Time: the notebooks run at their committed parameters except for ``BROWSER_PARAMS`` (analysis no
dashboard shows, switched off through papermill's ``prepare_only``, which writes the parameterised
copy without executing it). Their training runs are reused from the checkpoints in ``runs/`` when
nbval has just run them (``make test`` runs this file after nbval), so the browser pass costs the
notebooks' evaluation cells, not their training. On a clone where nothing has run yet it trains too
and takes about as long as nbval. JupyterLab records each cell's timing in the executed copies.

A missing browser is an error naming the install command, never a skip. Collected only with
``-m browser`` (pyproject's addopts deselect it from plain pytest runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from routelib import paths
from routelib.notebooks import KERNEL, list_notebooks

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]

CHROMIUM = os.environ.get("ROUTELIB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
COPIES = paths.RUNS_DIR / "browser"
SCREENSHOTS = paths.RUNS_DIR / "screenshots"
# Parameters that differ from the committed ones in the browser, to save time: analysis that no
# dashboard shows and no later cell needs (01's layer-sensitivity probe: ~40 s on the CPU), and notebook
# 06 on the small 6-layer subject v2 (the same cells and widgets, a tenth of the model). Training
# parameters stay as committed, so nbval's runs in runs/ are reused.
SUBJECT_V2 = {"model": "data/moe-subject", "snapshots": "data/moe-subject/training_snapshots.npz"}
BROWSER_PARAMS = {"01_train_pathway_llm": {"probe_windows": 0, "paper_claims": False},  # sections 8-9: tables
                  "06_router_weight_study": {**SUBJECT_V2, "control_traces": None}}  # section 6: probes, no dashboard
RUN_ALL_TIMEOUT_S = 600  # one notebook, all cells
VIEW_TIMEOUT_S = 60  # a control change reaching the view (one kernel round trip plus the callback)
# JupyterLab user settings for the test: every cell stays in the DOM (no windowing), cell timings are
# saved in the executed copies, no news toast.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none", "recordTiming": True},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                      "checkForUpdates": False},
}
# Widgets are identified by their JupyterLab/ipywidgets 8 classes (a widget view's root sits directly
# in its output, which has no data-mime-type); a control is what a user changes.
WIDGET_OUTPUT = ".jp-OutputArea-output > .jupyter-widgets"
CONTROLS = ".widget-dropdown select, .widget-slider .noUi-handle, button.widget-button"
# The same controls in a notebook's saved widget state (ipywidgets model names).
CONTROL_MODELS = {"DropdownModel", "IntSliderModel", "FloatSliderModel", "ButtonModel"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chromium() -> str:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"no Chromium at {CHROMIUM}: install it with `apt-get install chromium` (Debian/Ubuntu), "
                    "or point ROUTELIB_CHROMIUM at a Chromium binary; never `playwright install`", pytrace=False)
    return CHROMIUM


@pytest.fixture(scope="module")
def lab():
    """A JupyterLab server from this environment: yields (base url, token); always stopped. Its
    settings, workspaces and runtime files live in a temporary folder of its own."""
    with tempfile.TemporaryDirectory(prefix="routelib-lab-") as tmp:
        yield from _serve(Path(tmp))


def _serve(home: Path):
    """Start ``jupyter lab`` with its user folders under ``home``, wait until it answers, yield, stop it."""
    for name, value in LAB_SETTINGS.items():
        (home / "settings" / name).parent.mkdir(parents=True, exist_ok=True)
        (home / "settings" / name).write_text(json.dumps(value))
    port, token = _free_port(), secrets.token_hex(16)
    pythonpath = os.pathsep.join(filter(None, [str(paths.REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath,  # the kernels import this checkout's routelib
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"))
    COPIES.mkdir(parents=True, exist_ok=True)
    log = (COPIES / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--port-retries=0", "--allow-root", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={paths.REPO_ROOT}",
         "--ServerApp.open_browser=False", "--ServerApp.terminals_enabled=False",
         "--LabApp.expose_app_in_browser=True"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=paths.REPO_ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with status {server.returncode}; see {log.name}", pytrace=False)
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer on {base} within 90 s; see {log.name}", pytrace=False)
            time.sleep(0.5)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


def saved_dashboards(nb_path: Path) -> list[int]:
    """Per widget output of the committed notebook that holds controls, how many: read from the
    widget state the notebook carries (tests/test_notebook_widgets.py), so a dashboard that does not
    render in the browser is missed, not silently passed."""
    nb = json.loads(nb_path.read_text())
    state = nb["metadata"].get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})

    def controls(model_id: str) -> int:
        model = state.get(model_id, {})
        children = [c.removeprefix("IPY_MODEL_") for c in model.get("state", {}).get("children", [])]
        return (model.get("model_name") in CONTROL_MODELS) + sum(controls(c) for c in children)

    views = [o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] for c in nb["cells"]
             if c["cell_type"] == "code" for o in c.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    return [n for n in map(controls, views) if n]


def fresh_copy(nb_path: Path) -> Path:
    """``runs/browser/<name>.ipynb``: the committed notebook, parameterised with ``BROWSER_PARAMS``
    by papermill (``prepare_only``: written, not executed) and with outputs, counts and saved widget
    state removed, so everything the test sees comes from this run (and the committed file, which
    JupyterLab would autosave, is never opened)."""
    import nbformat
    import papermill as pm

    out = COPIES / nb_path.name
    pm.execute_notebook(str(nb_path), str(out), parameters=BROWSER_PARAMS.get(nb_path.stem, {}),
                        prepare_only=True, kernel_name=KERNEL, progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, out)
    return out


# Read from the notebook model in the page (LabApp.expose_app_in_browser): the kernel's status, and
# per code cell its execution count and its error outputs (ename: evalue, last traceback line).
NOTEBOOK_STATE_JS = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return null;
  const kernel = panel.sessionContext.session?.kernel;
  const cells = [];
  for (const cell of panel.content.model.cells) {
    if (cell.type !== 'code') continue;
    const errors = [];
    for (let i = 0; i < cell.outputs.length; i++) {
      const o = cell.outputs.get(i).toJSON();
      if (o.output_type === 'error') errors.push(`${o.ename}: ${o.evalue}`);
    }
    cells.push({count: cell.executionCount, errors});
  }
  return {status: kernel ? kernel.status : 'no kernel', pending: panel.sessionContext.pendingInput, cells};
}"""


def _notebook_state(page) -> dict | None:
    return page.evaluate(NOTEBOOK_STATE_JS)


def _wait_idle(page, timeout_s: float, settle_s: float = 1.0) -> None:
    """Until the kernel has been idle for ``settle_s`` (a queue of cells passes through idle between cells)."""
    deadline, idle_since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        state = _notebook_state(page)
        if state and state["status"] == "idle" and not page.locator(".jp-InputPrompt", has_text="[*]").count():
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= settle_s:
                return
        else:
            idle_since = None
        page.wait_for_timeout(250)
    raise AssertionError(f"the kernel was still busy after {timeout_s:.0f} s")


def open_and_run_all(page, base: str, token: str, copy: Path) -> dict:
    """Open ``copy`` in JupyterLab, wait for its kernel, click Run > Run All Cells, wait until done."""
    rel = copy.relative_to(paths.REPO_ROOT).as_posix()
    page.goto(f"{base}/lab/tree/{rel}?reset&token={token}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext?.session?.kernel", timeout=90_000)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
    _wait_idle(page, 90)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_function("() => window.jupyterapp.shell.currentWidget.content.model.cells.get(0).executionCount"
                           " !== null || window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status"
                           " === 'busy'", timeout=30_000)
    _wait_idle(page, RUN_ALL_TIMEOUT_S, settle_s=2.0)
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    return _notebook_state(page)


def view_signature(dashboard) -> str:
    """What a dashboard shows, apart from its controls: the HTML of its HTML/Output views and the
    sources of its images."""
    return dashboard.evaluate("""el => {
      const parts = [];
      el.querySelectorAll('.widget-html-content, .widget-output, .jp-OutputArea-output').forEach(
        v => { if (!v.querySelector('.widget-html-content')) parts.push(v.innerHTML); });
      el.querySelectorAll('img').forEach(img => parts.push(img.src));
      return parts.join('\\n');
    }""")


def change(page, control) -> str:
    """Change one control as a user would; returns a description for messages."""
    tag = control.evaluate("el => el.tagName.toLowerCase()")
    if tag == "select":
        options = control.locator("option").all_inner_texts()
        current = control.evaluate("el => el.options[el.selectedIndex] ? el.options[el.selectedIndex].text : ''")
        other = next((o for o in options if o != current), None)
        assert other is not None, f"dropdown with the single option {current!r}: nothing to change"
        control.select_option(label=other)
        return f"dropdown {current!r} -> {other!r}"
    if tag == "button":
        control.click()
        return f"button {control.inner_text()!r}"
    before = control.get_attribute("aria-valuenow")  # a noUiSlider handle: the arrow keys move it one step
    control.focus()
    key = "ArrowLeft" if before == control.get_attribute("aria-valuemax") else "ArrowRight"
    control.press(key)
    after = control.get_attribute("aria-valuenow")
    assert after != before, f"slider at {before}: {key} did not move it"
    return f"slider {before} -> {after}"


def exercise(page, dashboard, shot: str) -> list[str]:
    """Screenshot, change every control of ``dashboard`` in turn (each must change the view),
    screenshot again. Returns what was changed."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    dashboard.scroll_into_view_if_needed()
    dashboard.screenshot(path=SCREENSHOTS / f"{shot}-before.png")
    done = []
    for i in range(dashboard.locator(CONTROLS).count()):
        control = dashboard.locator(CONTROLS).nth(i)
        before = view_signature(dashboard)
        what = change(page, control)
        deadline = time.monotonic() + VIEW_TIMEOUT_S
        while view_signature(dashboard) == before:
            assert time.monotonic() < deadline, f"{shot}: {what} did not change the view within {VIEW_TIMEOUT_S} s"
            page.wait_for_timeout(200)
        _wait_idle(page, VIEW_TIMEOUT_S)
        done.append(what)
    dashboard.screenshot(path=SCREENSHOTS / f"{shot}-after.png")
    return done


@pytest.mark.parametrize("nb_path", list_notebooks(os.environ.get("ROUTELIB_BROWSER_ONLY", "").split(",")),
                         ids=lambda p: p.stem)
def test_notebook_runs_in_jupyterlab_and_its_widgets_respond(nb_path, browser, lab):
    """Run All Cells without an error; every saved dashboard renders and each of its controls changes its view."""
    base, token = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        state = open_and_run_all(page, base, token, fresh_copy(nb_path))
        errors = [f"code cell {i}: {e}" for i, c in enumerate(state["cells"]) for e in c["errors"]]
        assert not errors, (f"{nb_path.name}: error output in JupyterLab (executed copy in {COPIES}):\n"
                            + "\n".join(errors))
        unrun = [i for i, c in enumerate(state["cells"]) if c["count"] is None]
        assert not unrun, f"{nb_path.name}: code cells {unrun} did not run"
        widgets = [w for w in page.locator(WIDGET_OUTPUT).all() if w.locator(CONTROLS).count()]
        shown = [w.locator(CONTROLS).count() for w in widgets]
        assert shown == saved_dashboards(nb_path), (
            f"{nb_path.name}: controls per rendered widget {shown}, per widget in the committed notebook "
            f"{saved_dashboards(nb_path)}")
        for k, widget in enumerate(widgets, 1):
            changed = exercise(page, widget, f"{nb_path.stem}-widget{k}")
            print(f"{nb_path.stem} widget {k}: {'; '.join(changed)}")
    finally:
        page.close()
        _shutdown_kernels(base, token)


def _shutdown_kernels(base: str, token: str) -> None:
    """Stop every kernel of the server (one notebook's kernel at a time: memory and the CPU)."""
    with urllib.request.urlopen(f"{base}/api/kernels?token={token}", timeout=10) as r:
        kernels = json.load(r)
    for k in kernels:
        req = urllib.request.Request(f"{base}/api/kernels/{k['id']}?token={token}", method="DELETE")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(req, timeout=30).close()
