"""The one training loop every notebook uses.

nanoGPT-style (Karpathy, 2022): AdamW (Loshchilov & Hutter, ICLR 2019) with weight decay on
matrices only, linear warm-up then cosine decay (SGDR, Loshchilov & Hutter, ICLR 2017) to
``lr * min_lr_ratio``, gradient clipping, bf16 autocast and optional ``torch.compile`` on CUDA.
The notebook owns the data, the config values and what to plot (callbacks).

Data: a *batch function* ``batch_fn(step, rank, world_size) -> (x, y)``, two LongTensors
(B_local, T), deterministic in its arguments. Resuming therefore needs no data-loader state: a run
killed at step k and resumed from a checkpoint sees the same batches and, on CPU, the same losses bit
for bit (model, optimizer and RNG states are restored; evaluation and callbacks run on a forked RNG).

Model: ``model(x)`` returns logits (B, T, V) or an object with ``.logits`` and optionally
``.aux_loss``. Hugging Face MoE models return the *unweighted* load-balancing loss there (with
``output_router_logits=True``) and weight it by ``model.router_aux_loss_coef`` only inside their
own ``.loss``; we apply the same weight when the model has that attribute (else 1.0), add it to the
LM loss and log it separately. ``loss_fn(model, x, y) -> (loss, metrics)`` overrides all of this.

Checkpoints: ``out_dir/step_000100/{model,optimizer}.safetensors + state.json``, written into a
temporary folder, fsynced and renamed into place; ``out_dir/latest`` names the newest.

Data parallel: under torchrun/accelerate (``WORLD_SIZE > 1``) the loop joins the process group (gloo
on CPU, nccl on CUDA), wraps the model in DistributedDataParallel and calls
``batch_fn(step, rank, world_size)`` on each rank; logged metrics are means over ranks; rank 0 shows
the bar and writes checkpoints.

Ctrl-C finishes the current step, writes a checkpoint and re-raises KeyboardInterrupt (a second
Ctrl-C stops at once); under DDP the stop is agreed at the next logged step.
"""

from __future__ import annotations

from contextlib import contextmanager

import base64
import json
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model

from routelib.device import resolve_device
from routelib.errors import ConfigError
from routelib.io import atomic_write, atomic_write_bytes
from routelib.progress import progress_bar

BatchFn = Callable[[int, int, int], "tuple[torch.Tensor, torch.Tensor]"]  # (step, rank, world) -> (x, y)
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict[str, Any]]"]


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps in the run; the lr schedule spans them
    stop_step: int | None = None  # end early after this many steps, schedule unchanged (chunked runs)
    lr: float = 3e-4  # peak learning rate, reached at the end of warm-up
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps up to lr
    weight_decay: float = 0.1  # AdamW decay on >= 2-D params; none on biases, norm weights, 1-D
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW (beta1, beta2)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 0  # evaluate every this many steps (0: only after the last step)
    eval_batches: int = 20  # use at most this many batches of a list of eval batches
    log_every: int = 10  # append a history record (window means) every this many steps
    ckpt_every: int = 0  # checkpoint every this many steps (0: only at the end); needs out_dir
    out_dir: str | None = None  # checkpoint folder; None writes no checkpoints
    save_frozen: bool = True  # False: checkpoints keep trainable parameters + buffers only (frozen ones,
    #   e.g. a pretrained base's, are restored from the model the run starts from, not stored again)
    seed: int = 0  # seeds torch / numpy / random at the start (rank r uses seed + r)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda" or "cuda:N"
    dtype: str = "auto"  # "auto" or "bf16": bf16 autocast on CUDA; "fp32": none. CPU runs fp32
    compile: bool = False  # torch.compile the model (CUDA only; ignored on CPU)
    ddp_find_unused: bool = False  # DDP find_unused_parameters, for models that skip parameters
    progress: bool = True  # tqdm bar on rank 0 (env TQDM_DISABLE=1 hides it too)

    def __post_init__(self):
        if isinstance(self.out_dir, os.PathLike):
            self.out_dir = os.fspath(self.out_dir)
        kinds = {"int": int, "float": (int, float), "bool": bool, "str": str,
                 "int | None": (int, type(None)), "str | None": (str, type(None))}
        for f in fields(self):
            v, want = getattr(self, f.name), kinds.get(f.type)
            if want and (not isinstance(v, want) or ("bool" not in f.type and isinstance(v, bool))):
                raise ConfigError(f"TrainConfig.{f.name} must be {f.type}, got {v!r}")
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            raise ConfigError(f"TrainConfig.betas must be two floats, got {self.betas!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        checks = [
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.stop_step is None or 1 <= self.stop_step <= self.max_steps,
             f"stop_step must be None or in [1, max_steps={self.max_steps}], got {self.stop_step}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (0 <= self.warmup_steps <= self.max_steps,
             f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (all(0 <= b < 1 for b in self.betas), f"betas must lie in [0, 1), got {self.betas}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}"),
            (self.eval_every >= 0, f"eval_every must be >= 0 (0 = at the end), got {self.eval_every}"),
            (self.eval_batches >= 1, f"eval_batches must be >= 1, got {self.eval_batches}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.ckpt_every >= 0, f"ckpt_every must be >= 0 (0 = at the end), got {self.ckpt_every}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"),
            (self.dtype in ("auto", "bf16", "fp32"), f"dtype must be 'auto', 'bf16' or 'fp32', got {self.dtype!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"TrainConfig: {msg}")


@dataclass
class TrainState:
    """What a callback sees; updated in place as training goes."""

    step: int  # optimizer steps completed
    model: nn.Module  # the bare model (not DDP-wrapped or compiled)
    optimizer: torch.optim.Optimizer  # the AdamW optimizer
    config: TrainConfig  # the run's config
    history: list[dict]  # one record per logged step
    record: dict = field(default_factory=dict)  # the newest history record
    rank: int = 0  # data-parallel rank of this process


@dataclass
class TrainResult:
    history: list[dict]  # one record per logged step: step, loss, lr, tokens_per_s, eval_* ...
    step: int  # optimizer steps completed, counting those before a resume
    checkpoint: str | None  # newest checkpoint written or resumed from (None without out_dir)
    wall_s: float  # wall-clock seconds of this call

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.history]

    @property
    def eval(self) -> dict:
        """The newest evaluation's metrics ({} if none ran)."""
        return next(({k: v for k, v in r.items() if k.startswith("eval_")}
                     for r in reversed(self.history) if "eval_loss" in r), {})


class Callback:
    """Override what you need; any callable ``cb(event, state)`` works as well.
    Events: "step" (each logged step), "eval" (after an evaluation), "end"."""

    def __call__(self, event: str, state: TrainState) -> None:
        getattr(self, f"on_{event}")(state)

    def on_step(self, state: TrainState) -> None: ...
    def on_eval(self, state: TrainState) -> None: ...
    def on_end(self, state: TrainState) -> None: ...


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to the floor."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    span = cfg.max_steps - 1 - cfg.warmup_steps  # the last step lands exactly on min_lr
    frac = min(1.0, (step - cfg.warmup_steps) / span) if span > 0 else 0.0
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.lr - min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: >= 2-D params decay, biases / norm weights / other 1-D params do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, aux_weight: float = 1.0):
    """Next-token cross-entropy (targets -100 ignored) + ``aux_weight * out.aux_loss`` if present."""
    out = model(x)
    logits = out if isinstance(out, torch.Tensor) else out.logits  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
    metrics = {"lm_loss": loss.detach()}
    aux = None if isinstance(out, torch.Tensor) else getattr(out, "aux_loss", None)
    if aux is not None:
        aux = aux_weight * aux.to(loss.device)  # ()
        metrics["aux_loss"] = aux.detach()
        loss = loss + aux
    return loss, metrics


@torch.no_grad()
def evaluate(model: nn.Module, eval_data, *, loss_fn: LossFn | None = None, max_batches: int | None = None,
             rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """``eval_fn(model) -> {name: value}`` or mean LM loss and perplexity over a list of (x, y)."""
    was_training = model.training
    model.eval()
    try:
        if callable(eval_data):
            return {(k if k.startswith("eval_") else f"eval_{k}"): float(v) for k, v in eval_data(model).items()}
        loss_fn = loss_fn or lm_loss
        device = next(model.parameters()).device
        batches = list(eval_data)[:max_batches]
        total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, batches)
        for x, y in batches[rank::world_size]:  # ranks split the batches
            loss, metrics = loss_fn(model, x.to(device), y.to(device))
            total += torch.stack([torch.as_tensor(metrics.get("lm_loss", loss)).double(), total.new_ones(())])
        if world_size > 1:
            dist.all_reduce(total)
        mean = (total[0] / total[1].clamp(min=1)).item()
        return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0))}
    finally:
        model.train(was_training)


# ---- checkpoints ---------------------------------------------------------------------------------

def _rng_state() -> dict:
    b64 = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    np_state = np.random.get_state()
    state = {"torch": b64(torch.get_rng_state()), "python": list(random.getstate()),
             "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    unb64 = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(unb64(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([unb64(s) for s in state["cuda"]])


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad and every buffer, by state-dict name (shared tensors once)."""
    keep = {id(p) for p in model.parameters() if p.requires_grad} | {id(b) for b in model.buffers()}
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in keep and id(t) not in seen:
            out[name] = t.detach().cpu().contiguous()
            seen.add(id(t))
    return out


def _load_trainable(model: nn.Module, path: Path) -> None:
    """Load a ``save_frozen=False`` checkpoint: every state-dict entry it lacks must be a frozen
    parameter (or share storage with one it has), else the model is not the one that was trained."""
    saved = load_file(str(path))
    state = model.state_dict(keep_vars=True)
    loaded = {id(state[n]) for n in saved if n in state}
    unknown = sorted(set(saved) - set(state))
    missing = [n for n, t in state.items() if n not in saved and id(t) not in loaded
               and not (isinstance(t, nn.Parameter) and not t.requires_grad)]
    if unknown or missing:
        raise ConfigError(f"{path}: a trainable-only checkpoint that does not fit this model "
                          f"(unknown {unknown[:3]}, trainable but absent {missing[:3]}); freeze the same parameters "
                          f"as the run that wrote it")
    model.load_state_dict(saved, strict=False)


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, save_frozen: bool = True) -> Path:
    """Write ``out_dir/step_{step:06d}/`` atomically (:func:`routelib.io.atomic_write`), then ``latest``.
    ``save_frozen=False`` stores only trainable parameters and buffers (``state["weights"]`` says so)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"step_{step:06d}"
    with atomic_write(final) as tmp:  # the same step written again (resumed, then interrupted): swapped whole
        tmp.mkdir()
        if save_frozen:
            save_model(model, str(tmp / "model.safetensors"))
        else:
            save_file(_trainable_state(model), str(tmp / "model.safetensors"))
            state = {**state, "weights": "trainable+buffers"}
        opt = optimizer.state_dict()
        tensors, extra = {}, {}
        for i, entry in opt["state"].items():
            for k, v in entry.items():
                if torch.is_tensor(v):
                    tensors[f"{i}.{k}"] = v.detach().cpu().contiguous()
                else:
                    extra.setdefault(str(i), {})[k] = v
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {**state, "optimizer": {"param_groups": opt["param_groups"], "state": extra}}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
    atomic_write_bytes(out_dir / "latest", (final.name + "\n").encode())
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The folder ``out_dir/latest`` names, else the highest complete ``step_*`` folder, else None."""
    out_dir = Path(out_dir)
    pointer = out_dir / "latest"
    if pointer.is_file() and (out_dir / pointer.read_text().strip() / "state.json").is_file():
        return out_dir / pointer.read_text().strip()
    done = [p for p in out_dir.glob("step_*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name[5:]), default=None)


def prune_checkpoints(out_dir: str | Path, keep: int = 1) -> list[Path]:
    """Delete all but the newest ``keep`` complete ``step_*`` folders of ``out_dir`` (never the one
    ``latest`` names), for long runs whose checkpoints are large; returns the folders deleted."""
    if keep < 1:
        raise ConfigError(f"prune_checkpoints: keep must be >= 1, got {keep}")
    out_dir = Path(out_dir)
    newest = latest_checkpoint(out_dir)
    done = sorted((p for p in out_dir.glob("step_*") if (p / "state.json").is_file()), key=lambda p: int(p.name[5:]))
    gone = [p for p in done[:-keep] if newest is None or p.resolve() != newest.resolve()]
    for p in gone:
        shutil.rmtree(p)
    return gone


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load weights (and optimizer state) from a ``step_*`` folder, or an out_dir's latest one.
    Returns the checkpoint's state.json (config, step, history, rng, model_config) plus its "path"."""
    path = Path(path)
    if not (path / "state.json").is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint in {path}")
        path = found
    state = json.loads((path / "state.json").read_text())
    if state.get("weights") == "trainable+buffers":
        _load_trainable(model, path / "model.safetensors")
    else:
        load_model(model, str(path / "model.safetensors"))
    if optimizer is not None:
        meta = state["optimizer"]
        entries = {int(i): dict(v) for i, v in meta["state"].items()}
        for key, t in load_file(str(path / "optimizer.safetensors")).items():
            i, k = key.split(".", 1)
            entries.setdefault(int(i), {})[k] = t
        groups = meta["param_groups"]
        for saved, now in zip(groups, optimizer.param_groups):  # keep this machine's implementation
            saved.update({k: now[k] for k in ("fused", "foreach", "capturable") if k in now})
        optimizer.load_state_dict({"state": entries, "param_groups": groups})
    state["path"] = str(path)
    return state


# ---- the loop ------------------------------------------------------------------------------------

class _DeferSigint:
    """Ctrl-C sets a flag the loop reads between steps; a second Ctrl-C raises at once."""

    def __enter__(self):
        self.hit, self.old = False, None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGINT, self._handle)
            self.old = old if old is not None else signal.default_int_handler
        return self

    def _handle(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def _setup(cfg: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, whether we created the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = str(resolve_device(cfg.device))
    if name == "cuda" and world > 1:
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if world <= 1:
        return 0, 1, device, False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, own


@contextmanager
def process_group(backend: str | None = None):
    """One data-parallel process group for a block that trains several times (a study's runs under
    ``torchrun``): :func:`train` then joins it instead of creating and destroying its own each time
    (torch's env:// rendezvous cannot be set up twice in one process). Yields (rank, world_size);
    a single process (no ``WORLD_SIZE`` > 1) yields (0, 1) and creates nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":  # collectives outside train() (rank0_value) run on this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield dist.get_rank(), dist.get_world_size()
        dist.barrier()  # every rank done before the group closes
    finally:
        dist.destroy_process_group()


def rank0_value(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object), so that the ranks of a
    :func:`process_group` act on one decision (e.g. which runs are still to train, read from files
    another process may be writing); ``value`` itself outside a group. Every rank must call it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _model_config(model: nn.Module) -> Any:
    mc = getattr(model, "config", None)
    if is_dataclass(mc):
        return asdict(mc)
    return mc.to_dict() if hasattr(mc, "to_dict") else None


def _resume(path: Path, model: nn.Module, optimizer, cfg: TrainConfig, rank: int, world: int):
    """Load model, optimizer and this rank's RNG state; returns (step, history, checkpoint path)."""
    saved = load_checkpoint(path, model, optimizer)
    for group, wd in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):  # this config's values win
        group.update(weight_decay=wd, betas=cfg.betas)
    now = json.loads(json.dumps(asdict(cfg)))
    changed = [k for k in ("max_steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas",
                           "grad_clip", "dtype") if saved["config"].get(k) != now[k]]
    if changed:
        warnings.warn(f"resuming {path} with changed {changed}: losses will differ from an unbroken run")
    if len(saved["rng"]) == world:
        _set_rng_state(saved["rng"][rank])
    else:  # another world size: fresh per-rank streams
        torch.manual_seed(cfg.seed + rank + saved["step"])
    return saved["step"], saved["history"], saved["path"]


def train(model: nn.Module, batch_fn: BatchFn, cfg: TrainConfig, *, eval_data=None, loss_fn: LossFn | None = None,
          callbacks: Iterable[Callable[[str, TrainState], None]] = (), resume: bool = False) -> TrainResult:
    """Train ``model`` in place on ``batch_fn`` batches; see the module docstring for the contracts.

    eval_data: ``eval_fn(model) -> dict`` (called on every rank) or a list of (x, y) batches.
    loss_fn: ``(model, x, y) -> (loss, metrics)``, the same metric names every step.
    callbacks: ``cb(event, state)`` callables or :class:`Callback` objects.
    resume: continue from ``cfg.out_dir``'s latest checkpoint if there is one (else start fresh).
    """
    t_start = time.perf_counter()
    rank, world, device, own_group = _setup(cfg)
    raw = model.to(device)
    was_training = raw.training
    raw.train()  # dropout, router noise and running statistics behave as in training; restored at the end
    for seed_fn in (torch.manual_seed, random.seed, np.random.seed):
        seed_fn(cfg.seed + rank)
    optimizer = make_optimizer(raw, cfg)
    start, history, last_ckpt = 0, [], None
    if resume and cfg.out_dir and (found := latest_checkpoint(cfg.out_dir)) is not None:
        start, history, last_ckpt = _resume(found, raw, optimizer, cfg, rank, world)
    saved_step = start if last_ckpt else -1
    fwd = torch.compile(raw) if cfg.compile and device.type == "cuda" else raw
    net = fwd
    if world > 1:
        net = nn.parallel.DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=cfg.ddp_find_unused)
    if loss_fn is None:
        aux_weight = float(getattr(raw, "router_aux_loss_coef", 1.0))
        loss_fn = lambda m, x, y: lm_loss(m, x, y, aux_weight)  # noqa: E731
    bf16 = device.type == "cuda" and cfg.dtype in ("auto", "bf16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    end = cfg.stop_step or cfg.max_steps
    state = TrainState(start, raw, optimizer, cfg, history, rank=rank)
    rng_devices = [device] if device.type == "cuda" else []

    def checkpoint(done: int) -> str:
        rng = [_rng_state()]
        if world > 1:
            rng = [None] * world
            dist.all_gather_object(rng, _rng_state())
        if rank != 0:
            return last_ckpt
        body = {"config": asdict(cfg), "step": done, "history": history, "rng": rng, "world_size": world,
                "model_class": type(raw).__qualname__, "model_config": _model_config(raw)}
        return str(save_checkpoint(cfg.out_dir, done, raw, optimizer, body, save_frozen=cfg.save_frozen))

    bar = progress_bar(rank == 0 and cfg.progress, total=cfg.max_steps, initial=start, desc="train",
                       dynamic_ncols=True)
    done, in_step, stop_agreed, window, n_window, tokens = start, False, False, None, 0, 0
    finished = False  # set after the last step: only then do ranks meet at a barrier to tear down
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    try:
        with _DeferSigint() as sigint:
            t0 = time.perf_counter()
            for step in range(start, end):
                in_step = True
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = batch_fn(step, rank, world)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (B_local, T)
                with autocast():
                    loss, metrics = loss_fn(net, x, y)
                loss.backward()
                if cfg.grad_clip > 0:
                    metrics = {**metrics, "grad_norm": nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)}
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done, in_step = step + 1, False
                bar.update(1)
                tokens += x.numel() * world
                names = ["loss", *metrics]
                vals = torch.stack([loss.detach().float()] + [torch.as_tensor(v, dtype=torch.float32, device=device)
                                                              for v in metrics.values()])  # (M,)
                window, n_window = (vals if window is None else window + vals), n_window + 1
                eval_now = eval_data is not None and (done == end or (cfg.eval_every and done % cfg.eval_every == 0))
                if done % cfg.log_every == 0 or eval_now or done == end:
                    stop = torch.tensor([float(sigint.hit)], device=device)
                    if world > 1:
                        dist.all_reduce(window)
                        dist.all_reduce(stop)
                        window = window / world
                    sync()
                    record = {"step": done, "lr": lr, **dict(zip(names, (window / n_window).tolist())),
                              "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9)}
                    stop_agreed = stop.item() > 0
                    with torch.random.fork_rng(devices=rng_devices):  # eval and plots leave training RNG alone
                        if eval_now:
                            with autocast():
                                record.update(evaluate(raw if callable(eval_data) else fwd, eval_data, loss_fn=loss_fn,
                                                       max_batches=cfg.eval_batches, rank=rank, world_size=world))
                        history.append(record)
                        state.step, state.record = done, record
                        bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "eval_loss")},
                                        refresh=False)
                        for cb in callbacks:
                            cb("step", state)
                            if eval_now:
                                cb("eval", state)
                    window, n_window, tokens = None, 0, 0
                    t0 = time.perf_counter()
                if cfg.out_dir and (done == end or (cfg.ckpt_every and done % cfg.ckpt_every == 0)):
                    sync()
                    t_ckpt = time.perf_counter()
                    last_ckpt, saved_step = checkpoint(done), done
                    t0 += time.perf_counter() - t_ckpt  # keep checkpoint time out of tokens/s
                if (sigint.hit and world == 1) or stop_agreed:  # under DDP all ranks stop at one step
                    raise KeyboardInterrupt
        state.step = done
        for cb in callbacks:
            cb("end", state)
        finished = True
    except KeyboardInterrupt:
        if cfg.out_dir and not in_step and saved_step != done and (world == 1 or stop_agreed):
            last_ckpt = checkpoint(done)
            if rank == 0:
                bar.write(f"interrupted after step {done}: checkpoint {last_ckpt}")
        elif in_step:
            warnings.warn(f"interrupted during step {done + 1}: no checkpoint written; newest is {last_ckpt}")
        raise
    finally:
        bar.close()
        raw.train(was_training)
        if own_group:
            if finished:  # every rank reaches this point: let all finish before gloo's pairs close
                dist.barrier()
            dist.destroy_process_group()
    return TrainResult(history=history, step=done, checkpoint=last_ckpt, wall_s=time.perf_counter() - t_start)
