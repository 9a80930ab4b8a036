"""One folder per notebook, the same plan in each: ``__init__`` (its config dataclass, the notebook's
parameters, and the pipeline functions its cells call), ``reference`` (its reference run, where it has
one: ``python -m routelib.studies.<study> reference``), ``views`` (its figures and dashboards; figures
several notebooks share are in :mod:`routelib.plots`) and ``gpu`` (its GPU steps, listed in order by
:mod:`routelib.gpu.steps`). Studies sit above the libraries (:mod:`routelib.models`, :mod:`routelib.data`,
:mod:`routelib.routing`, :mod:`routelib.train`, ...), which never import them, and never import each other.

==============================  ==========================================================
notebook                        study folder
==============================  ==========================================================
01_train_pathway_llm            :mod:`.pathways` (reference, views, gpu)
02_dynamic_attention_routing    :mod:`.attention_routing` (reference, views, gpu)
03_moe_speedup                  :mod:`.moe_vs_dense` (reference, subject, views, gpu;
                                ``python -m routelib.studies.moe_vs_dense subject|reference``)
04_mixtral_routing_collection   :mod:`.routing_traces` (views)
05_next_expert_mlp              :mod:`.next_expert`
06_router_weight_study          :mod:`.router_weights`
==============================  ==========================================================
"""
