"""Figures and ipywidgets dashboards, one module per study (named like its study module in
:mod:`routelib.studies`), plus :mod:`.figures` for what several notebooks share. A view only draws
what a study or library computed; each dashboard's HTML is a plain function, tested without a
browser.

==============================  ==========================================================
notebook                        views
==============================  ==========================================================
01_train_pathway_llm            :mod:`.pathways` (4-panel figure, pathway explorer)
02_dynamic_attention_routing    :mod:`.attention_routing`
03_moe_speedup                  :mod:`.moe_vs_dense` (expert dashboard)
04_mixtral_routing_collection   :mod:`.routing_traces` (token-journey dashboard)
05, 06                          drawn in the notebook with seaborn
all                             :mod:`.figures` (training curves, perplexity bars, palette)
==============================  ==========================================================
"""
