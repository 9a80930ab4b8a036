"""README's figure: the deciding effect of each reference run, with its 95 % interval, from the files.

One panel per study with a committed reference run, each effect read from that run's result files
(``data/reference/<notebook>/``), nothing typed in:

- 01: purity of the trained pathways minus that of the untrained router's picks (whole model, all
  domains), per run of the main arm, with its paired bootstrap interval (``purity.csv``);
- 02: validation loss of dynamic routing minus the static hybrid at the shared learning rate, per seed
  and the mean with its t-interval over seeds (``delta.csv``);
- 03: the MoE against the dense arms in held-out loss (nats), per comparison: mean over seeds with its
  t-interval (``gaps.csv``).

    python -m routelib.headline --out docs/figures      # headline.csv + headline.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from routelib import paths

REF = paths.REPO_ROOT / "data" / "reference"


def effects() -> pd.DataFrame:
    """One row per plotted effect: study, label, estimate, low, high, unit."""
    from routelib.reference import load_manifest, t_interval

    rows = []
    folder = REF / "01_train_pathway_llm"
    load_manifest(folder)
    purity = pd.read_csv(folder / "purity.csv")
    whole = purity[purity["router"].eq("untrained") & purity["layer"].eq("all") & purity["domain"].eq("all")
                   & purity["run"].str.startswith("glbl-coactivation")]
    rows += [dict(study="01 pathways", label=f"trained − untrained router, {r.run}", estimate=r.trained_minus,
                  low=r.trained_minus_low, high=r.trained_minus_high, unit="purity") for r in whole.itertuples()]
    folder = REF / "02_dynamic_attention_routing"
    load_manifest(folder)
    delta = pd.read_csv(folder / "delta.csv")
    rows += [dict(study="02 attention routing", label=f"dynamic − static, seed {r.seed}", estimate=r.delta,
                  low=float("nan"), high=float("nan"), unit="nats") for r in delta.itertuples()]
    ti = t_interval(delta["delta"].to_numpy())
    rows.append(dict(study="02 attention routing", label=f"dynamic − static, mean of {ti['n']}", estimate=ti["mean"],
                     low=ti["low"], high=ti["high"], unit="nats"))
    folder = REF / "03_moe_speedup"
    load_manifest(folder)
    if (folder / "gaps.csv").is_file():
        gaps = pd.read_csv(folder / "gaps.csv")
        names = {"moe - dense_active": "MoE − equal active", "moe - dense_total": "MoE − equal total",
                 "dense_total_matched - moe": "equal-FLOPs dense − MoE"}
        for r in gaps[gaps["seed"].astype(str).eq("mean")].itertuples():
            label = names.get(r.comparison, r.comparison)
            rows.append(dict(study="03 MoE vs dense", label=f"{label}, mean of {int(r.n)}", estimate=r.gap_nats,
                             low=r.low, high=r.high, unit="nats"))
    return pd.DataFrame(rows)


def plot_headline(table: pd.DataFrame):
    """Forest plot of :func:`effects`: one panel per study, zero marked."""
    import matplotlib.pyplot as plt

    studies = list(dict.fromkeys(table["study"]))
    fig, axes = plt.subplots(1, len(studies), figsize=(4.6 * len(studies), 3.2), squeeze=False)
    for ax, study in zip(axes[0], studies):
        part = table[table["study"] == study].reset_index(drop=True)
        y = range(len(part))[::-1]
        err = [(part["estimate"] - part["low"]).fillna(0), (part["high"] - part["estimate"]).fillna(0)]
        ax.errorbar(part["estimate"], list(y), xerr=err, fmt="o", color="#1f77b4", capsize=3)
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(list(y), part["label"], fontsize=7)
        ax.set(title=study, xlabel=f"difference ({part['unit'].iloc[0]})")
    fig.suptitle("What the reference runs found (95 % intervals)", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    import argparse

    from routelib.io import atomic_write

    parser = argparse.ArgumentParser(prog="python -m routelib.headline", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/figures", help="folder for headline.csv and headline.png")
    args = parser.parse_args(argv)
    out = paths.in_repo(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = effects()
    with atomic_write(out / "headline.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    fig = plot_headline(table)
    with atomic_write(Path(out) / "headline.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
