"""routelib.studies.moe_vs_dense (notebook 03's logic), routelib.plots and routelib.studies.moe_vs_dense.views on a tiny study."""

import math

import matplotlib
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from routelib.studies import moe_vs_dense as study
from routelib.studies.moe_vs_dense import reference, subject
from routelib import plots  # noqa: E402
from routelib.studies.moe_vs_dense import views  # noqa: E402
from routelib.data import load_tokenizer  # noqa: E402
from routelib.errors import ConfigError  # noqa: E402
from torchrun_helper import run_module

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = study.MoEStudyConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=32,
                               num_experts=4, top_k=2, seq_len=32, batch_size=4, steps=4, warmup_steps=1,
                               ckpt_every=2, eval_windows=2, bench_tokens=64, bench_min_time_s=0.01,
                               device="cpu", out_dir=str(tmp_path_factory.mktemp("study")))
    eval_data = study.domain_eval_data(cfg)
    model, result = study.train_arm("moe", cfg.moe_config(), cfg, study.training_batches(cfg))
    return cfg, eval_data, model, result


@pytest.mark.parametrize("kw, match", [
    (dict(capacity_factors="0.5,x"), "capacity_factors"),
    (dict(capacity_factors="0,1"), "positive"),
    (dict(moe_impl="fast"), "moe_impl"),
    (dict(top_k=5, num_experts=4), "top_k"),
])
def test_bad_config_is_rejected(kw, match):
    with pytest.raises(ConfigError, match=match):
        study.MoEStudyConfig(**kw)


def test_dense_arms_match_active_and_total_parameters():
    from routelib.models import LM

    cfg = study.MoEStudyConfig(hidden_size=32, intermediate_size=32)
    arms = {n: LM(c) for n, c in cfg.arm_configs().items()}
    router = cfg.num_layers * cfg.hidden_size * cfg.num_experts  # the only parameters dense arms lack
    assert arms["dense_active"].num_parameters() == arms["moe"].num_parameters(active=True) - router
    assert arms["dense_total"].num_parameters() == arms["moe"].num_parameters() - router


def test_train_arm_checkpoints_and_reuses_a_finished_run(tiny):
    cfg, _, model, result = tiny
    ckpts = sorted(p.name for p in (cfg.run_dir() / "checkpoints").glob("moe-*/step_*"))
    assert ckpts == ["step_000002", "step_000004"] and result.step == 4
    again, result2 = study.train_arm("moe", cfg.moe_config(), cfg, study.training_batches(cfg))
    assert result2.step == 4 and result2.history == result.history  # loaded, not retrained
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_perplexity_routing_and_capacity(tiny):
    cfg, eval_data, model, _ = tiny
    ppl = study.perplexity_by_domain(model, eval_data)
    assert set(ppl) == set(eval_data) | {"overall"} and all(1 < v < 2 * cfg.moe_config().vocab_size for v in ppl.values())
    records = study.routing_records(model, eval_data)
    sums = records.groupby(["domain", "layer"])["fraction"].sum()
    assert len(sums) == len(eval_data) * cfg.num_layers and (sums - 1).abs().max() < 1e-6
    sweep = study.capacity_sweep(model, eval_data, [0.25, 1.0, 8.0])
    assert list(sweep["drop_rate"]) == sorted(sweep["drop_rate"], reverse=True)  # more seats, fewer drops
    assert sweep["drop_rate"].iloc[0] > 0.3 and sweep["drop_rate"].iloc[-1] == 0  # 0.25 seats a quarter of the assignments
    assert sweep["perplexity"].iloc[-1] == pytest.approx(ppl["overall"], rel=1e-5)
    assert sweep["perplexity"].iloc[-2] == pytest.approx(ppl["overall"], rel=1e-5)  # factor 8: nothing dropped


def test_load_balance_cv():
    even = pd.DataFrame(dict(layer=0, expert=range(4), count=[5, 5, 5, 5], domain="a"))
    collapsed = pd.DataFrame(dict(layer=0, expert=range(4), count=[20, 0, 0, 0], domain="a"))
    assert study.load_balance(even)["cv"].iloc[0] == 0
    assert study.load_balance(collapsed)["cv"].iloc[0] == pytest.approx(math.sqrt(3))


def test_latency_of_every_arm(tiny):
    cfg, _, model, _ = tiny
    lat = study.latency({"a": model, "b": model}, cfg, rounds=2)
    assert set(lat) == {"a", "b"} and all(v["prefill_ms"] > 0 and v["decode_ms_per_token"] >= 0 for v in lat.values())


def test_layer_benchmark_covers_every_implementation(tiny):
    bench = study.moe_layer_benchmark(tiny[0])
    assert list(bench["name"]) == ["moe_naive", "moe_padded", "moe_grouped", "dense_equal_total", "dense_equal_active"]
    assert (bench["median_ms"] > 0).all()


def test_export_reproduces_perplexity_through_transformers(tiny, tmp_path):
    cfg, eval_data, model, result = tiny
    card = subject.export_subject(model, cfg, result, eval_data, tmp_path / "export", "test")
    ours = study.perplexity_by_domain(model, eval_data)
    assert card["validation_perplexity"]["overall"] == pytest.approx(ours["overall"], rel=1e-4)
    assert (tmp_path / "export" / "README.md").read_text().count("|") > 10


def test_dashboard_html_and_figures(tiny):
    cfg, eval_data, model, result = tiny
    tok = load_tokenizer(cfg.tokenizer)
    routes = views.token_routes(model, tok, "def f(x):\n    return x + 1")
    assert len(routes) == len(tok("def f(x):\n    return x + 1")["input_ids"])
    assert all(len(r["experts"]) == cfg.num_layers and len(r["experts"][0]) == cfg.top_k for r in routes)
    html = views.routes_html(routes, layer=1)
    assert html.count("<span title=") == len(routes) and "return" in html
    box = views.expert_dashboard(model, tok, {"a": "x = 1", "b": "Once upon a time"})
    assert "x" in box.children[2].value
    records = study.routing_records(model, eval_data)
    assert len(views.plot_expert_heatmaps(records).axes) >= cfg.num_layers
    assert plots.plot_training_curves({"moe": result.history}).axes
    assert views.plot_capacity_sweep(study.capacity_sweep(model, eval_data, [0.5, 1.0])).axes


def test_matched_arm_trains_on_the_moes_training_flops():
    from routelib.models import LM

    cfg = study.MoEStudyConfig(hidden_size=32, intermediate_size=32, num_experts=8, top_k=2, steps=100, warmup_steps=10)
    m = reference.matched_config(cfg)
    arms = cfg.arm_configs()
    moe, dense = (LM(arms[a]).flops_per_token(cfg.seq_len) for a in ("moe", "dense_total"))
    assert m.steps < cfg.steps and abs(m.steps * dense - cfg.steps * moe) <= dense  # within one step's FLOPs
    assert m.warmup_steps == round(10 * moe / dense)


@pytest.mark.parametrize("name", ["moe", "moe_seedx", "sparse_seed0", "dense_total_matched_seed"])
def test_bad_run_names_are_refused(name):
    with pytest.raises(ConfigError, match="run"):
        reference.parse_run_name(name)


def test_train_runs_writes_history_and_record(tiny, tmp_path):
    cfg = tiny[0]
    records = reference.train_runs(cfg, ("moe_seed0", "dense_total_matched_seed1"), tmp_path, eval_every=2, log_every=1)
    for name in ("moe_seed0", "dense_total_matched_seed1"):
        assert (tmp_path / "history" / f"{name}.csv").is_file() and (tmp_path / "final" / f"{name}.json").is_file()
    assert reference.parse_run_name("dense_total_matched_seed1") == ("dense_total_matched", 1)
    r = records["dense_total_matched_seed1"]
    assert r["steps"] == reference.matched_config(cfg).steps and r["seed"] == 1
    assert math.isclose(r["loss_nats"]["overall"], math.log(r["perplexity"]["overall"]))
    assert records["moe_seed0"]["steps"] == cfg.steps


def test_flops_split_matches_an_independent_count_of_every_matmul():
    """torch's FlopCounterMode counts the matmuls a forward pass really runs (the MoE's on its naive path,
    routed tokens only); it leaves out SDPA's attention scores, which the split adds analytically."""
    from torch.utils.flop_counter import FlopCounterMode

    from routelib.models import LM

    cfg = study.MoEStudyConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=32,
                               num_experts=4, top_k=2, seq_len=32, moe_impl="naive")
    for arm, lm_cfg in cfg.arm_configs().items():
        model = LM(lm_cfg).eval()
        x = torch.randint(0, lm_cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        split = study.flops_split(lm_cfg, cfg.seq_len)
        counted = counter.get_total_flops() / x.numel()  # per token
        assert counted == split["non_embedding"] + split["lm_head"] - split["attention_scores"], arm
        share_all = split["ffn"] / (split["non_embedding"] + split["lm_head"])
        assert 0 < share_all < split["ffn_share"] < 1, arm  # the head is in one denominator only


TINY_REFERENCE = ["--hidden_size", "32", "--num_layers", "1", "--num_heads", "2", "--num_kv_heads", "1",
                  "--intermediate_size", "32", "--num_experts", "4", "--top_k", "2", "--seq_len", "32",
                  "--batch_size", "4", "--steps", "4", "--warmup_steps", "1", "--eval_windows", "2",
                  "--eval_every", "2", "--log_every", "1", "--ckpt_every", "2", "--threads", "1",
                  "--only_runs", "moe_seed0,dense_active_seed0"]


def test_reference_runs_under_torchrun_give_the_single_process_answer(tmp_path):
    """Two gloo processes (torchrun) on the same global batch against one process: the recorded losses
    and the held-out perplexities agree (data parallelism changes only the order of float sums); rank 0
    alone writes."""
    import json

    def launch(nproc: int, name: str):
        out, ckpt = tmp_path / name, tmp_path / f"{name}-runs"
        args = ["-m", "routelib.studies.moe_vs_dense", "reference", "--out", str(out), "--out_dir", str(ckpt),
                *TINY_REFERENCE]
        return out, run_module(args, nproc)

    (one, _), (two, printed) = launch(1, "one"), launch(2, "two")
    assert printed.count("moe_seed0: perplexity") == 1  # rank 0 alone reports
    for run in ("moe_seed0", "dense_active_seed0"):
        a, b = (json.loads((d / "final" / f"{run}.json").read_text()) for d in (one, two))
        assert b["perplexity"]["overall"] == pytest.approx(a["perplexity"]["overall"], rel=1e-4)
        ha, hb = (pd.read_csv(d / "history" / f"{run}.csv") for d in (one, two))
        assert ha["step"].tolist() == hb["step"].tolist()
        for key in ("loss", "lm_loss"):
            assert hb[key].dropna().to_numpy() == pytest.approx(ha[key].dropna().to_numpy(), rel=1e-4, abs=1e-5), key
    logs = json.loads((two / "invocations.json").read_text())
    assert len(logs) == 1 and logs[0]["finished"]  # rank 0 alone recorded the invocation
