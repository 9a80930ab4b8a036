"""Dashboards render where notebooks are read: the committed notebooks carry their widget state
(nbclient stores it when papermill executes them, `make notebooks` keeps it), so nbconvert's HTML
export -- and nbviewer -- show each dashboard's default view instead of the `VBox(children=...)` text."""

import json

import pytest

from routelib import paths

DASHBOARDS = {  # notebook: what its dashboard shows by default (an HTML view built by the study's views module)
    "01_train_pathway_llm": "pathway",
    "03_moe_speedup": "layer",
    "04_mixtral_routing_collection": "position",
}
STATE = "application/vnd.jupyter.widget-state+json"
VIEW = "application/vnd.jupyter.widget-view+json"


def widget_views(nb: dict) -> list[str]:
    return [o["data"][VIEW]["model_id"] for c in nb["cells"] if c["cell_type"] == "code"
            for o in c.get("outputs", []) if VIEW in o.get("data", {})]


@pytest.mark.parametrize("name", DASHBOARDS)
def test_committed_notebook_saves_the_state_of_every_widget_view(name):
    nb = json.loads((paths.NOTEBOOKS_DIR / f"{name}.ipynb").read_text())
    views = widget_views(nb)
    assert views, f"{name}: no widget output"
    state = nb["metadata"].get("widgets", {}).get(STATE, {}).get("state", {})
    assert set(views) <= set(state), f"{name}: views without saved state {set(views) - set(state)}"
    html_values = [m["state"].get("value", "") for m in state.values() if m.get("model_name") == "HTMLModel"]
    assert any(DASHBOARDS[name] in v for v in html_values), f"{name}: no rendered HTML view in the saved state"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_html_export_embeds_the_dashboard(name):
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(paths.NOTEBOOKS_DIR / f"{name}.ipynb"))
    assert "VBox(children=" not in body and "HBox(children=" not in body
    assert STATE in body and body.count(VIEW) >= len(widget_views(json.loads(
        (paths.NOTEBOOKS_DIR / f"{name}.ipynb").read_text())))
