"""Subject v3's training: SmolLM2-135M-Instruct MoEfied, its routers fitted, then trained further.

Two stages, as MoEfication (Zhang et al. 2022) and LLaMA-MoE (Zhu et al. 2024) build an MoE from a dense
model:

1. :func:`initial_model`: every MLP split by co-activation on ``fit_tokens`` tokens of the training
   split (all five domains) and given a router fitted to pick the experts whose outputs matter most
   (:mod:`routelib.subject.router_fit`). The split and the fitted routers are saved to
   ``out_dir/init.safetensors``, so a resumed run does not recompute them.
2. :func:`train_subject`: further training on the corpus's training split with the project's training
   loop (``routelib.train``: AdamW, warm-up + cosine, checkpoints, resume, torchrun) -- next-token loss
   plus ``aux_loss_coef`` x the load-balancing loss (mean over layers). What trains is small, so that
   the result ships as a delta of a few MB: the routers, the shared experts' gates, low-rank updates of
   every expert weight (LoRA, rank ``lora_rank``) and, with ``train_norms``, the RMSNorm weights.
   Gating is Mixtral's (renormalised top-k softmax, times k so equal gates give the dense sum), the
   function the exported model computes. Checkpoints hold the trained tensors only.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from routelib.errors import ConfigError
from routelib.subject.moefy import MoEfiedMLP, SplitConfig


@dataclass(frozen=True)
class SubjectConfig:
    """Subject v3: the MoE shape, the router fit and the further training."""

    num_experts: int = 8  # routed experts per layer
    top_k: int = 2  # routed experts per token
    shared_size: int = 512  # neurons of the always-on shared expert (0: Mixtral's form, no shared expert)
    fit_tokens: int = 16384  # training-split tokens for the co-activation split and the router fit
    lora_rank: int = 16  # rank of the low-rank updates of the expert weights
    lora_alpha: float = 16.0  # LoRA scale numerator (scale = alpha / rank)
    train_norms: bool = True  # also train the RMSNorm weights (576 numbers each)
    steps: int = 800  # optimizer steps (the schedule spans them)
    batch_size: int = 8  # windows per step
    seq_len: int = 256  # tokens per window
    lr: float = 1e-3  # peak learning rate of the trained tensors
    warmup_steps: int = 20  # linear warm-up steps
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss (mean over layers)
    distill: float = 0.0  # weight of KL(dense model || MoE) over next-token distributions (0: LM loss only)
    ckpt_every: int = 40  # checkpoint every this many steps (kept: the training snapshots read them)
    eval_every: int = 40  # held-out loss on the training curve every this many steps
    eval_windows: int = 2  # held-out windows per domain on the training curve
    seed: int = 0  # windows, k-means initialisation, LoRA initialisation
    out_dir: str = "runs/subject-v3"  # init.safetensors, checkpoints/, history

    def split(self) -> SplitConfig:
        return SplitConfig(num_experts=self.num_experts, top_k=self.top_k, shared_size=self.shared_size,
                           seed=self.seed)

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "lora_rank", "fit_tokens", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SubjectConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.fit_tokens % self.seq_len:
            raise ConfigError(f"fit_tokens={self.fit_tokens} must be a multiple of seq_len={self.seq_len}")


def moe_layers(model) -> list[MoEfiedMLP]:
    from routelib.models.pathways import decoder_layers

    return [blk.mlp for blk in decoder_layers(model) if isinstance(blk.mlp, MoEfiedMLP)]


def _init_tensors(model) -> dict[str, torch.Tensor]:
    """The stage-1 result: every layer's neuron order and fitted router."""
    out = {}
    for i, moe in enumerate(moe_layers(model)):
        out[f"layers.{i}.order"] = moe.order
        out[f"layers.{i}.router"] = moe.router.weight.detach().clone()
    return out


def initial_model(cfg: SubjectConfig, progress: bool = True):
    """Stage 1 (see the module docstring) -> (model, tokenizer): SmolLM2-135M-Instruct with every MLP a
    :class:`MoEfiedMLP` in router mode with Mixtral gating. Reads ``out_dir/init.safetensors`` when it
    was written for the same configuration, else computes and writes it."""
    import json

    from safetensors.torch import load_file, save_file
    from routelib.data.batching import TokenWindows, token_stream
    from routelib.data.pretrained import load_pretrained
    from routelib.io import atomic_write
    from routelib.models.pathways import decoder_layers
    from routelib.progress import progress_bar
    from routelib.subject.pilot import mlp_inputs, moefy_model

    model, tok = load_pretrained("smollm2-135m")
    path = Path(cfg.out_dir) / "init.safetensors"
    key = json.dumps({k: v for k, v in asdict(cfg).items() if k in ("num_experts", "top_k", "shared_size",
                                                                      "fit_tokens", "seq_len", "seed")}, sort_keys=True)
    if path.is_file() and (saved := load_file(path)) and _meta(path) == key:
        for i, blk in enumerate(decoder_layers(model)):
            mlp = blk.mlp
            moe = MoEfiedMLP(mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data,
                             saved[f"layers.{i}.order"], cfg.split(), act=mlp.act_fn)
            moe.router.weight.data.copy_(saved[f"layers.{i}.router"])
            blk.mlp = moe
    else:
        stream = token_stream(None, "train", "smollm2")
        n = cfg.fit_tokens // cfg.seq_len
        x, _ = TokenWindows(stream, cfg.seq_len, n, seed=cfg.seed)(0)  # (n, T) training-split windows
        inputs = mlp_inputs(model, x, batch_size=8)
        bar = progress_bar(progress, total=len(inputs), desc="MoEfy")
        moefy_model(model, inputs, cfg.split(), progress=bar)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank computes the same; one writes
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                save_file(_init_tensors(model), str(tmp), metadata={"config": key})
    for moe in moe_layers(model):
        moe.set_mode("router", "softmax")
    return model, tok


def _meta(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("config")


def make_trainable(model, cfg: SubjectConfig) -> int:
    """Freeze everything but what the delta holds (see the module docstring); returns the number of
    trained parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for i, moe in enumerate(moe_layers(model)):
        moe.add_lora(cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed * 1000 + i)
        moe.router.weight.requires_grad_(True)
        if cfg.shared_size:
            moe.shared_gate_proj.weight.requires_grad_(True)
    if cfg.train_norms:
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def subject_loss(cfg: SubjectConfig, teacher: nn.Module | None = None):
    """``loss_fn(model, x, y)`` for ``routelib.train``: next-token loss + aux_loss_coef x mean balance loss
    (+ distill x KL(teacher || model) per token, Hinton et al. 2015, when a teacher is given)."""
    import torch.nn.functional as F

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        logits = model(x).logits.float()  # (B, T, V)
        lm = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        balance = torch.stack([m.balance_loss() for m in moe_layers(getattr(model, "module", model))]).mean()
        loss = lm + cfg.aux_loss_coef * balance
        metrics = {"lm_loss": lm.detach(), "balance": balance.detach()}
        if teacher is not None and cfg.distill > 0:
            with torch.no_grad():
                target = F.log_softmax(teacher(x).logits.float(), -1).flatten(0, 1)  # (B*T, V)
            kl = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), target, log_target=True, reduction="batchmean")
            loss = loss + cfg.distill * kl
            metrics["kl"] = kl.detach()
        return loss, metrics

    return loss_fn


def train_subject(cfg: SubjectConfig, stop_step: int | None = None, progress: bool = True):
    """Stages 1 and 2 -> (model, TrainResult); resumes from ``out_dir/checkpoints``."""
    from routelib.data.batching import TokenWindows, domain_streams, eval_batches, token_stream
    from routelib.data.corpus import DOMAINS
    from routelib.train import TrainConfig, train

    model, _ = initial_model(cfg, progress=progress)
    make_trainable(model, cfg)
    batches = TokenWindows(token_stream(None, "train", "smollm2"), cfg.seq_len, cfg.batch_size, seed=cfg.seed + 1)
    held = [b for s in domain_streams(DOMAINS, "validation", "smollm2").values()
            for b in eval_batches(s, cfg.seq_len, 1, cfg.eval_windows)]
    tcfg = TrainConfig(max_steps=cfg.steps, stop_step=stop_step, lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, cfg.steps),
                       weight_decay=0.0, log_every=max(1, min(10, cfg.eval_every)), eval_every=cfg.eval_every,
                       eval_batches=len(held), ckpt_every=cfg.ckpt_every,
                       out_dir=str(Path(cfg.out_dir) / "checkpoints"), save_frozen=False, seed=cfg.seed,
                       device="cpu", progress=progress)
    teacher = None
    if cfg.distill > 0:
        from routelib.data.pretrained import load_pretrained

        teacher, _ = load_pretrained("smollm2-135m")
        teacher.requires_grad_(False)
    result = train(model, batches, tcfg, eval_data=held, loss_fn=subject_loss(cfg, teacher), resume=True)
    return model.eval(), result


__all__ = ["SubjectConfig", "initial_model", "make_trainable", "moe_layers", "subject_loss", "train_subject"]
