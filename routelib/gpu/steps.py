"""The GPU plan: every study's GPU steps (``routelib.studies.<study>.gpu``) in one list, highest value
first. No step has run on a GPU yet, so none of the estimates has been checked against a measurement.
"""

from __future__ import annotations

from routelib.gpu.plan import Step
from routelib.studies.attention_routing import gpu as attention_routing
from routelib.studies.moe_vs_dense import gpu as moe_vs_dense
from routelib.studies.pathways import gpu as pathways


def build_plan() -> list[Step]:
    """Every step, highest value first."""
    return [
        moe_vs_dense.kernels_step(),
        pathways.mlp_step(),
        attention_routing.speed_step(),
        moe_vs_dense.reference_step(),
        *attention_routing.comparison_steps(),
        *pathways.fine_tune_steps(),
        *moe_vs_dense.subject_steps(),
    ]
