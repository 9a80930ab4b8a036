"""README's figure: its committed table is what the reference runs' files give today."""

from __future__ import annotations

import pandas as pd

from routelib import paths
from routelib.headline import effects

FIGURES = paths.REPO_ROOT / "docs" / "figures"


def test_committed_figure_table_is_the_files():
    committed = pd.read_csv(FIGURES / "headline.csv")
    now = effects()
    assert list(committed["label"]) == list(now["label"]), "rerun: python -m routelib.headline --out docs/figures"
    pd.testing.assert_frame_equal(committed[["estimate", "low", "high"]], now[["estimate", "low", "high"]],
                                  rtol=1e-5, check_dtype=False)
    assert (FIGURES / "headline.png").stat().st_size > 10_000


def test_every_study_with_a_reference_run_is_drawn():
    studies = set(effects()["study"])
    assert {"01 pathways", "02 attention routing", "03 MoE vs dense"} <= studies
