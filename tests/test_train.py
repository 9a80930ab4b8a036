"""routelib.train: schedule, config checks, determinism, exact resume, atomic checkpoints, DDP."""

import importlib.util
import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from routelib import train as T
from routelib.errors import ConfigError
from routelib.train import Callback, TrainConfig, latest_checkpoint, load_checkpoint, lr_at, train
from torchrun_helper import run_command

_spec = importlib.util.spec_from_file_location("ddp_worker", Path(__file__).with_name("ddp_worker.py"))
W = sys.modules.setdefault("ddp_worker", importlib.util.module_from_spec(_spec))  # tiny model + data
_spec.loader.exec_module(W)

N = 12  # steps of the reference run


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=N, lr=1e-2, warmup_steps=3, min_lr_ratio=0.1, log_every=1, seed=0, device="cpu",
                progress=False)
    return TrainConfig(**{**base, **kw})


def run(c: TrainConfig, **kw):
    return train(W.make_model(), W.make_batch_fn(), c, **kw)


@pytest.fixture(scope="module")
def reference():
    """An unbroken N-step run with dropout (no checkpoints), the yardstick for every resume."""
    return run(cfg())


# ---- schedule and config -------------------------------------------------------------------------

def test_lr_schedule_warms_up_linearly_then_cosine_decays_to_min_lr():
    c = cfg(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, c) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear up to the peak
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)  # peak, then the floor
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay
    assert lrs[10 + 89 // 2] == pytest.approx(0.55, abs=0.01)  # cosine: halfway at mid-decay
    assert lr_at(0, cfg(warmup_steps=0, lr=0.5)) == 0.5


@pytest.mark.parametrize("bad", [
    pytest.param(dict(lr=-1e-3), id="negative-lr"),
    pytest.param(dict(lr=0.0), id="zero-lr"),
    pytest.param(dict(warmup_steps=N + 1), id="warmup-gt-max"),
    pytest.param(dict(max_steps=0), id="zero-steps"),
    pytest.param(dict(min_lr_ratio=1.5), id="min-lr-ratio"),
    pytest.param(dict(betas=(0.9, 1.0)), id="beta2"),
    pytest.param(dict(grad_clip=-1.0), id="grad-clip"),
    pytest.param(dict(log_every=0), id="log-every"),
    pytest.param(dict(dtype="fp16"), id="dtype"),
    pytest.param(dict(device="tpu"), id="device"),
    pytest.param(dict(stop_step=N + 1), id="stop-after-max"),
    pytest.param(dict(max_steps="10"), id="str-for-int"),
    pytest.param(dict(seed=1.5), id="float-for-int"),
    pytest.param(dict(stop_step="5"), id="str-for-optional-int"),
    pytest.param(dict(progress=1), id="int-for-bool"),
])
def test_bad_config_values_raise_config_error(bad):
    with pytest.raises(ConfigError, match="TrainConfig"):
        cfg(**bad)


def test_config_accepts_ints_for_floats_and_paths_for_out_dir(tmp_path):
    c = cfg(lr=1, betas=[0.9, 0.99], out_dir=tmp_path)
    assert c.betas == (0.9, 0.99) and c.out_dir == str(tmp_path)


# ---- the loop --------------------------------------------------------------------------------------

def test_same_seed_gives_identical_losses_on_cpu(reference):
    again = run(cfg())
    assert again.losses == reference.losses  # exact
    assert run(cfg(seed=1)).losses != reference.losses  # the seed drives dropout
    assert len(reference.history) == N and reference.step == N
    assert reference.losses[-1] < reference.losses[0]  # it learns
    assert all(r["tokens_per_s"] > 0 and "grad_norm" in r for r in reference.history)
    assert [r["lr"] for r in reference.history] == [lr_at(s, cfg()) for s in range(N)]


def test_aux_loss_is_added_and_logged_eval_and_callbacks_fire():
    events = []

    class Recorder(Callback):
        def on_step(self, state):
            events.append(("step", state.step))

        def on_eval(self, state):
            events.append(("eval", state.record["eval_loss"]))

        def on_end(self, state):
            events.append(("end", state.step))

    seen = []
    c = cfg(max_steps=6, log_every=2, eval_every=3)
    res = train(W.make_model(aux=True), W.make_batch_fn(), c, eval_data=W.eval_batches(),
                callbacks=[Recorder(), lambda event, state: seen.append(event)])
    assert [r["step"] for r in res.history] == [2, 3, 4, 6]  # log_every, plus every eval step
    for r in res.history:
        assert r["aux_loss"] > 0 and r["loss"] == pytest.approx(r["lm_loss"] + r["aux_loss"], rel=1e-5)
    evals = [r for r in res.history if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    assert res.eval == {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
    assert [e for e in events if e[0] != "eval"] == [("step", 2), ("step", 3), ("step", 4), ("step", 6), ("end", 6)]
    assert seen.count("eval") == 2 and seen[-1] == "end"


def test_eval_and_callbacks_do_not_disturb_training_rng(reference):
    def sample(event, state):  # a plotting callback that draws random numbers
        torch.rand(5)

    res = run(cfg(eval_every=2), eval_data=W.eval_batches(), callbacks=[sample])
    assert res.losses == reference.losses


def test_custom_loss_fn_overrides_the_default():
    def loss_fn(model, x, y):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        return 2 * loss, {"half": loss.detach()}

    res = run(cfg(max_steps=2, warmup_steps=0), loss_fn=loss_fn)
    assert all(r["loss"] == pytest.approx(2 * r["half"]) for r in res.history)


def test_progress_bar_is_quiet_under_tqdm_disable(capfd, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # read when the bar is made, whenever tqdm was imported
    run(cfg(max_steps=3, progress=True))
    assert capfd.readouterr().err == ""
    monkeypatch.setenv("TQDM_DISABLE", "0")
    run(cfg(max_steps=3, progress=True))
    assert "train" in capfd.readouterr().err  # the bar is there when not disabled


# ---- checkpoints and resume ----------------------------------------------------------------------

def test_resume_after_stop_matches_unbroken_run_exactly(tmp_path, reference):
    first = run(cfg(out_dir=tmp_path, ckpt_every=4, stop_step=7))  # "killed" after step 7
    assert first.step == 7 and first.losses == reference.losses[:7]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000004", "step_000007"]
    assert latest_checkpoint(tmp_path).name == "step_000007"
    resumed = run(cfg(out_dir=tmp_path, ckpt_every=4), resume=True)
    assert resumed.step == N and [r["step"] for r in resumed.history] == list(range(1, N + 1))
    assert resumed.losses == reference.losses  # bitwise, steps 8..12 included


def test_trains_in_training_mode_and_restores_the_callers_mode():
    seen = []
    model = W.make_model().eval()
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training) and None)
    train(model, W.make_batch_fn(), cfg(max_steps=2, warmup_steps=1))
    assert seen == [True, True] and not model.training


def frozen_model():
    """The test model with its embedding frozen (a "pretrained base") and a buffer that training moves."""
    model = W.make_model()
    model.emb.weight.requires_grad_(False)
    model.register_buffer("seen", torch.zeros(()))

    def count(module, args):  # a pre-hook's return value would replace the input: return None
        if module.training:
            module.seen.add_(1)

    model.register_forward_pre_hook(count)
    return model


def test_trainable_only_checkpoints_resume_exactly_and_refuse_another_freezing(tmp_path):
    from safetensors.torch import load_file

    full = train(frozen_model(), W.make_batch_fn(), cfg())
    first = train(frozen_model(), W.make_batch_fn(), cfg(out_dir=tmp_path, ckpt_every=4, stop_step=7, save_frozen=False))
    saved = load_file(str(tmp_path / "step_000007" / "model.safetensors"))
    assert "emb.weight" not in saved and "fc.weight" in saved and saved["seen"].item() == 7
    resumed_model = frozen_model()
    resumed = train(resumed_model, W.make_batch_fn(), cfg(out_dir=tmp_path, save_frozen=False), resume=True)
    assert first.losses == full.losses[:7] and resumed.losses == full.losses  # bitwise
    assert resumed_model.seen.item() == N
    other = W.make_model()  # nothing frozen: the embedding would silently stay at its init
    other.register_buffer("seen", torch.zeros(()))
    with pytest.raises(ConfigError, match="trainable but absent.*emb.weight"):
        load_checkpoint(tmp_path / "step_000007", other)


def test_resume_from_an_older_checkpoint_when_the_newest_is_gone(tmp_path, reference):
    run(cfg(out_dir=tmp_path, ckpt_every=4, stop_step=7))
    shutil.rmtree(tmp_path / "step_000007")  # a kill -9 before the step-7 checkpoint was written
    assert latest_checkpoint(tmp_path).name == "step_000004"  # stale pointer -> newest complete folder
    resumed = run(cfg(out_dir=tmp_path), resume=True)
    assert resumed.losses == reference.losses


def test_prune_checkpoints_keeps_the_newest_and_resume_still_exact(tmp_path, reference):
    run(cfg(out_dir=tmp_path, ckpt_every=2, stop_step=7))
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [f"step_{s:06d}" for s in (2, 4, 6, 7)]
    gone = T.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in gone] == ["step_000002", "step_000004"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000006", "step_000007"]
    T.prune_checkpoints(tmp_path)
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_000007"] == [latest_checkpoint(tmp_path).name]
    assert run(cfg(out_dir=tmp_path), resume=True).losses == reference.losses
    with pytest.raises(ConfigError, match="keep must be >= 1"):
        T.prune_checkpoints(tmp_path, keep=0)
    assert T.prune_checkpoints(tmp_path / "none") == []  # no folder: nothing to delete


@pytest.fixture(params=["foreground", "background"])
def caller_sigint(request):
    """The SIGINT disposition the test starts with: Python's default, or ignored (as in a job started
    with `make test &` or nohup); restored afterwards."""
    old = signal.getsignal(signal.SIGINT)
    if request.param == "background":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield request.param
    signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("how", ["raise", "sigint"])
def test_keyboard_interrupt_writes_a_checkpoint_and_resume_is_exact(tmp_path, reference, how, caller_sigint):
    def interrupt(event, state):
        if event == "step" and state.step == 5:
            if how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the loop finishes step 5, then stops

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background
    with pytest.raises(KeyboardInterrupt):
        run(cfg(out_dir=tmp_path, ckpt_every=4), callbacks=[interrupt])
    assert latest_checkpoint(tmp_path).name == "step_000005"
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler restored
    resumed = run(cfg(out_dir=tmp_path, ckpt_every=4), resume=True)
    assert resumed.losses == reference.losses


def test_checkpoint_holds_what_it_promises_and_loads_into_a_fresh_model(tmp_path):
    res = run(cfg(max_steps=3, out_dir=tmp_path))
    ckpt = Path(res.checkpoint)
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json"}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 3 and state["config"]["max_steps"] == 3 and len(state["history"]) == 3
    assert state["model_config"] == {"vocab": 32, "dim": 16, "dropout": 0.1, "aux": False}
    trained, fresh = W.make_model(), W.make_model(seed=99)
    train(trained, W.make_batch_fn(), cfg(max_steps=3))
    loaded = load_checkpoint(tmp_path, fresh)  # an out_dir resolves to its latest checkpoint
    assert loaded["step"] == 3
    for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_failed_checkpoint_write_leaves_no_partial_folder(tmp_path, monkeypatch):
    run(cfg(max_steps=4, stop_step=2, out_dir=tmp_path))  # a good step-2 checkpoint
    good = {p.name: p.read_bytes() for p in (tmp_path / "step_000002").iterdir()}

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(T, "save_file", broken_save_file)  # fails after model.safetensors is written
    with pytest.raises(OSError, match="disk full"):
        run(cfg(max_steps=4, out_dir=tmp_path, ckpt_every=1), resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000002"]  # no temp, no step_3
    assert (tmp_path / "latest").read_text().strip() == "step_000002"
    assert {p.name: p.read_bytes() for p in (tmp_path / "step_000002").iterdir()} == good


# ---- data parallel -------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_process_ddp_matches_single_process_on_the_global_batch(tmp_path):
    out_json, out_dir = tmp_path / "ddp.json", tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(T.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",  # free port
           str(Path(__file__).with_name("ddp_worker.py")), str(out_json), str(out_dir)]
    proc = run_command(cmd, env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads(out_json.read_text())
    single = train(W.make_model(dropout=0.0), W.make_batch_fn(), W.ddp_config(), eval_data=W.eval_batches())
    assert ddp["world_size"] == 2 and len(ddp["history"]) == len(single.history) == 6
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in ddp["history"]] == pytest.approx([r[key] for r in single.history], rel=1e-5)
    eval_ddp = [r["eval_loss"] for r in ddp["history"] if "eval_loss" in r]
    assert eval_ddp == pytest.approx([r["eval_loss"] for r in single.history if "eval_loss" in r], rel=1e-5)
    state = json.loads((out_dir / "step_000006" / "state.json").read_text())  # rank 0 wrote checkpoints
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert sorted(p.name for p in out_dir.iterdir()) == ["latest", "step_000003", "step_000006"]
