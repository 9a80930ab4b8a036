"""A tiny LM and a step-deterministic batch function for the training tests, and the worker that
tests/test_train.py launches under ``python -m torch.distributed.run --nproc_per_node=2``.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT_JSON OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TinyConfig:
    vocab: int = 32  # vocabulary size
    dim: int = 16  # hidden width
    dropout: float = 0.1  # dropout after the embedding (makes RNG restore matter)
    aux: bool = False  # also return an aux_loss, like an MoE model


class TinyLM(nn.Module):
    """Embedding -> dropout -> residual GELU MLP -> LayerNorm -> vocab logits."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.fc = nn.Linear(config.dim, config.dim)
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab)

    def forward(self, x):
        h = self.drop(self.emb(x))  # (B, T, C)
        h = self.norm(h + F.gelu(self.fc(h)))  # (B, T, C)
        logits = self.head(h)  # (B, T, V)
        if self.config.aux:
            return SimpleNamespace(logits=logits, aux_loss=0.01 * h.pow(2).mean())
        return logits


def make_model(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(TinyConfig(**kw))


def make_batch_fn(global_batch: int = 8, seq: int = 12, vocab: int = 32, rows: int = 64):
    """batch_fn(step, rank, world) -> (x, y) (B_local, T): rank r gets the r-th slice of step's global batch."""
    cols = [torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(123))]
    for _ in range(seq):
        cols.append((5 * cols[-1] + 3) % vocab)  # a learnable bigram rule
    data = torch.stack(cols, dim=1)  # (N, T+1)

    def batch_fn(step: int, rank: int, world_size: int):
        idx = torch.randint(0, rows, (global_batch,), generator=torch.Generator().manual_seed(1000 + step))
        local = idx.view(world_size, -1)[rank]  # (B_local,)
        return data[local, :-1], data[local, 1:]

    return batch_fn


def eval_batches(n: int = 3):
    fn = make_batch_fn()
    return [fn(10_000 + i, 0, 1) for i in range(n)]


def ddp_config(out_dir=None):
    from routelib.train import TrainConfig

    return TrainConfig(max_steps=6, lr=1e-2, warmup_steps=2, log_every=1, eval_every=3, ckpt_every=3,
                       out_dir=out_dir, seed=0, device="cpu", progress=False)


if __name__ == "__main__":
    import torch.distributed as dist

    from routelib.train import train

    out_json, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    result = train(make_model(dropout=0.0), make_batch_fn(), ddp_config(out_dir), eval_data=eval_batches())
    assert not dist.is_initialized(), "train() should tear down the group it created"
    if int(os.environ["RANK"]) == 0:
        with open(out_json, "w") as f:
            json.dump({"history": result.history, "world_size": int(os.environ["WORLD_SIZE"])}, f)
