"""README's headline numbers, recomputed from the committed result files: a number that differs from
what its file gives (a stale README, or a file changed without the text) fails here.

Notebooks 01-03 are read from their reference runs' per-run files (``data/reference/<notebook>/``:
each run's own record, not a summary); notebooks 05 and 06 from what their committed notebooks printed
(06: the headline metrics, the saturation comparison of section 5 and the claim-(d) verdict of section 6).
The numbers of notebook 04 in README's table are not checked yet (its page quotes the notebook's outputs)."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from routelib import paths
from routelib.reference import load_manifest, t_interval

README = paths.REPO_ROOT / "README.md"
REF = paths.REPO_ROOT / "data" / "reference"


def _row(notebook: str) -> str:
    """README's headline-table row of ``notebook``."""
    rows = [line for line in README.read_text().splitlines() if line.startswith(f"| `{notebook}` |")]
    assert len(rows) == 1, f"README has {len(rows)} headline rows for {notebook}"
    return rows[0]


def claims_01() -> list[str]:
    folder = REF / "01_train_pathway_llm"
    load_manifest(folder)  # every file as the run wrote it
    purity = pd.read_csv(folder / "purity.csv")
    runs = pd.read_csv(folder / "runs.csv")
    main = runs[runs["arm"].eq("glbl") & runs["grouping"].eq("coactivation")]["run"]
    whole = purity[purity["router"].eq("untrained") & purity["layer"].eq("all") & purity["domain"].eq("all")
                   & purity["run"].isin(main)]
    gain = whole["trained_minus"].mean()
    assert (whole["trained_minus_low"] > 0).all()  # the README says: intervals exclude 0 in both seeds
    recovered = (runs["recovery_log"] >= 0.8).all()
    assert recovered
    from routelib.studies.pathways.reference import first_top_token

    table = pd.read_csv(folder / f"pathways_{main.iloc[0]}.csv")
    share = max(first_top_token(t)[1] / n for t, n in zip(table["top_tokens"], table["selections"]))
    return [f"+{gain:.3f} purity over the untrained router", f"{len(runs)} runs",
            "both seeds" if len(main) == 2 else f"{len(main)} seeds", f"more than {100 * share:.0f} % of its selections"]


def claims_02() -> list[str]:
    folder = REF / "02_dynamic_attention_routing"
    load_manifest(folder)
    finals = [json.loads(p.read_text()) for p in sorted((folder / "final").glob("*.json"))]
    # the shared-rate comparison: static and dynamic at the rate both arms share, full length, alpha of the main arm
    full = max(r["steps"] for r in finals)
    lrs = {r["lr"] for r in finals if r["steps"] == full and r["arm"] == "static"} & \
          {r["lr"] for r in finals if r["steps"] == full and r["arm"] == "dynamic"}
    shared = max(lrs, key=lambda lr: sum(r["lr"] == lr and r["steps"] == full for r in finals))
    loss = {(r["arm"], r["seed"]): r["val_loss"] for r in finals if r["steps"] == full and r["lr"] == shared
            and (r["arm"] == "static" or r["alpha"] == 0.5)}
    seeds = sorted({s for (_, s) in loss})
    d = t_interval([loss[("dynamic", s)] - loss[("static", s)] for s in seeds])
    return [f"lower by {d['mean']:.3f} nats, 95 % t-interval [{d['low']:.3f}, {d['high']:.3f}] over {d['n']} seeds"]


def claims_03() -> list[str]:
    """From each run's perplexity (``perplexity.csv``: one row per arm, seed and domain), the FLOP split
    (checked against the formula in test_reference_runs) and the side-by-side throughput."""
    import math

    folder = REF / "03_moe_speedup"
    load_manifest(folder)
    ppl = pd.read_csv(folder / "perplexity.csv")
    overall = ppl[ppl["domain"].eq("overall")].pivot_table(index="seed", columns="arm", values="perplexity")

    def gap(a: str, b: str) -> dict:
        both = overall[[a, b]].dropna()
        return t_interval([math.log(x) - math.log(y) for x, y in zip(both[a], both[b])])

    act, tot, matched = gap("moe", "dense_active"), gap("moe", "dense_total"), gap("dense_total_matched", "moe")
    sign = lambda v: f"{v:+.3f}".replace("-", "−")  # noqa: E731
    split = pd.read_csv(folder / "flops_split.csv", index_col=0).loc["moe"]
    speed = pd.read_csv(folder / "throughput.csv").set_index("arm")["tokens_per_s"]
    tokens = json.loads((folder / "manifest.json").read_text())["params"]["tokens_per_arm"]
    return [f"After {tokens / 1e6:.2f} M tokens per arm, over {act['n']} seeds",
            f"{'−' if act['mean'] < 0 else '+'}{abs(act['mean']):.3f} nats, 95 % t-interval [{sign(act['low'])}, {sign(act['high'])}])",
            f"({sign(tot['mean'])} nats, [{sign(tot['low'])}, {sign(tot['high'])}])",
            f"**ahead by {matched['mean']:.3f} nats** ([{matched['low']:.3f}, {matched['high']:.3f}])",
            f"Its FFN is {100 * split['ffn_share']:.0f} % of its non-embedding forward FLOPs, "
            f"{100 * split['ffn_share_all']:.0f} % of all of them",
            f"at {speed['moe'] / speed['dense_active']:.2f}× the equal-active model's speed"]


def _printed_table(notebook: str, index: str, row: str) -> pd.DataFrame:
    """The first table the committed ``notebook`` printed whose index is named ``index`` and which has a
    row ``row`` (pandas' text layout: a header line, the index name's line, one line per row)."""
    cells = json.loads((paths.NOTEBOOKS_DIR / f"{notebook}.ipynb").read_text())["cells"]
    for cell in cells:
        for out in cell.get("outputs", []):
            text = "".join(out.get("text", [])) or "".join(out.get("data", {}).get("text/plain", []))
            lines = text.splitlines()
            for k in range(len(lines) - 1):
                if lines[k + 1].split() != [index]:
                    continue
                header, rows = lines[k].split(), []
                for line in lines[k + 2:]:
                    if not line.strip() or len(line.split()) != len(header) + 1:
                        break
                    rows.append(line.split())
                table = pd.DataFrame([r[1:] for r in rows], index=[r[0] for r in rows], columns=header)
                if row in table.index:
                    return table.apply(pd.to_numeric, errors="coerce")
    raise AssertionError(f"{notebook}: no printed table indexed by {index!r} with a row {row!r}")


def claims_05() -> list[str]:
    table = _printed_table("05_next_expert_mlp", "predictor", "mlp")
    speed = _printed_table("05_next_expert_mlp", "prefetch", "none")["rtx4090/lru"]  # section 9: tokens/s
    order = ("none", "hidden_probe", "pre_attn_probe", "mlp")
    assert speed[list(order)].is_monotonic_decreasing  # the order the row states, on this profile
    return [(f"reaches {100 * table.loc['mlp', 'top1']:.1f} % top-1 against {100 * table.loc['lookup', 'top1']:.1f} % "
             f"for a lookup table and {100 * table.loc['chance', 'top1']:.1f} % chance"),
            "RTX 4090, LRU: " + ", ".join(f"{speed[n]:.0f}" for n in order[:-1]) + f" and {speed['mlp']:.0f} tokens/s"]


def _printed_text(notebook: str) -> str:
    """Everything the committed ``notebook``'s cells printed (streams and plain-text displays)."""
    cells = json.loads((paths.NOTEBOOKS_DIR / f"{notebook}.ipynb").read_text())["cells"]
    return "\n".join("".join(out.get("text", [])) + "".join(out.get("data", {}).get("text/plain", []))
                     for cell in cells for out in cell.get("outputs", []))


def claims_06() -> list[str]:
    """Subject v3 (the notebook's model): the centred routers' weight CKA against random routers (the
    headline metrics), the saturation at step 0 of v3 and of v2 (section 5's comparison table), and
    claim (d)'s verdict with its two intervals under the centred router (section 6's verdict line)."""
    text = _printed_text("06_router_weight_study")
    metric = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+): ([-+\d.e]+)$", text, re.M)}
    start = {m.group(1): float(m.group(2))
             for m in re.finditer(r"^\d+\s+(\S+)\s+0\s+0\.000\s+(\d\.\d+)\s", text, re.M)}
    verdict = re.search(r"^centred router \(E-1\): claim \(d\) (.+?) by the probes .*?size-matched content minus "
                        r"control, (\S+ \[\S+, \S+\]) over .*?control minus size-matched content, "
                        r"(\S+ \[\S+, \S+\]) over", text, re.M)
    assert verdict, "06: no claim-(d) verdict line for the centred router"
    minus = lambda t: re.sub(r"-(?=\d)", "−", t)  # noqa: E731  the README writes the minus sign
    holds, token, following = verdict.groups()
    return [f"centred weight CKA {metric['centred_cka_mean']:.3f}, random routers {metric['centred_cka_null']:.3f}",
            f"make {100 * start['data/moe-subject-v3']:.0f} % of the final top-2 choices before any training step "
            f"(subject v2, trained from scratch: {start['data/moe-subject']:.3f})",
            f"Claim (d) of Ye, Yuan & Sharkey **{holds}**",
            f"than from the router's control subspace ({minus(token)})",
            f"decoded *worse* from control ({minus(following)};"]


CLAIMS = {"01_train_pathway_llm": claims_01, "02_dynamic_attention_routing": claims_02, "03_moe_speedup": claims_03,
          "05_next_expert_mlp": claims_05, "06_router_weight_study": claims_06}


def missing(row: str, claims: list[str]) -> list[str]:
    """The claims (text recomputed from files) that the README row does not contain."""
    flat = re.sub(r"\s+", " ", row)
    return [c for c in claims if c not in flat]


@pytest.mark.parametrize("notebook", sorted(CLAIMS))
def test_readme_headline_numbers_are_the_files(notebook):
    claims = CLAIMS[notebook]()
    assert claims and not missing(_row(notebook), claims), f"README's {notebook} row differs from its files: {missing(_row(notebook), claims)}"


def test_a_changed_number_fails():
    row = _row("02_dynamic_attention_routing")
    claims = claims_02()
    number = re.search(r"\d\.\d{3}", claims[0]).group(0)
    changed = row.replace(number, f"{float(number) + 0.001:.3f}", 1)
    assert changed != row and missing(changed, claims) == claims
