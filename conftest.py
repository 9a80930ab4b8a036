"""pytest hooks shared by unit tests and nbval (docs/design.md §4).

nbval compares a notebook's fresh outputs with the committed ones in cells marked
``# NBVAL_CHECK_OUTPUT`` (we run it with --nbval-lax). Streams that are volatile by nature are
never compared: stderr (warnings, tqdm bars) and widget views (their model ids change every run).
"""

SKIP_COMPARE = (
    "stderr",
    "application/vnd.jupyter.widget-view+json",
    "application/vnd.jupyter.widget-state+json",
    "text/html",  # DataFrame HTML repeats text/plain with styling ids; text/plain is compared
    "image/png",  # figures are checked through the numbers they plot, not pixels
    "image/svg+xml",
)


def pytest_collectstart(collector):
    path = getattr(collector, "path", None)
    if path is not None and str(path).endswith(".ipynb") and hasattr(collector, "skip_compare"):
        collector.skip_compare = tuple(collector.skip_compare) + SKIP_COMPARE
