"""One module per notebook: its config dataclass (the notebook's parameters) and the pipeline
functions its cells call. Studies sit above the libraries (:mod:`routelib.models`,
:mod:`routelib.data`, :mod:`routelib.routing`, :mod:`routelib.train`, ...), which never import
them; their figures and dashboards are in :mod:`routelib.views`, one module per study.

==============================  ==========================================================
notebook                        study module
==============================  ==========================================================
01_train_pathway_llm            :mod:`.pathways`, its reference run :mod:`.pathways.reference`
                                (``python -m routelib.studies.pathways reference``)
02_dynamic_attention_routing    :mod:`.attention_routing`, its reference run :mod:`.attention_routing.reference`
03_moe_speedup                  :mod:`.moe_vs_dense` (``python -m routelib.studies.moe_vs_dense subject``)
04_mixtral_routing_collection   :mod:`.routing_traces`
05_next_expert_mlp              :mod:`.next_expert`
06_router_weight_study          :mod:`.router_weights`
==============================  ==========================================================
"""
