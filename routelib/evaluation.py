"""Held-out evaluation shared by the training studies (notebooks 02, 03, 06): the per-domain
held-out batches, perplexity per domain, and training throughput from a run's history."""

from __future__ import annotations

import math

import numpy as np
import torch

from routelib.data import domain_streams, eval_batches
from routelib.train import TrainResult


def domain_eval_data(cfg, split: str = "validation", batch_size: int = 8) -> dict[str, list]:
    """Held-out (x, y) batches per corpus domain: up to ``cfg.eval_windows`` non-overlapping windows
    of ``cfg.seq_len`` tokens each, spread over the domain's ``split``, tokenised with ``cfg.tokenizer``
    (any config with those three fields: the study configs of notebooks 02 and 03)."""
    streams = domain_streams(split=split, tokenizer=cfg.tokenizer)
    return {d: eval_batches(s, cfg.seq_len, batch_size, max_windows=cfg.eval_windows) for d, s in streams.items()}


def train_tokens_per_s(result: TrainResult) -> float:
    """Median training throughput over the logged windows (the first window includes warm-up)."""
    rates = [r["tokens_per_s"] for r in result.history[1:] if "tokens_per_s" in r] or \
            [r["tokens_per_s"] for r in result.history if "tokens_per_s" in r]
    return float(np.median(rates)) if rates else float("nan")


@torch.no_grad()
def perplexity_by_domain(model: torch.nn.Module, eval_data: dict[str, list]) -> dict[str, float]:
    """exp(mean next-token loss) per domain, and ``overall`` = exp of the token-weighted mean.
    ``model(x).logits`` is all it needs: a routelib LM, a hybrid, or a transformers causal LM."""
    device = next(model.parameters()).device
    out, total_loss, total_tokens = {}, 0.0, 0
    for domain, batches in eval_data.items():
        loss_sum, n = 0.0, 0
        for x, y in batches:
            logits = model(x.to(device)).logits.float()  # (B, T, V)
            loss_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
            n += y.numel()
        out[domain] = math.exp(loss_sum / n)
        total_loss, total_tokens = total_loss + loss_sum, total_tokens + n
    out["overall"] = math.exp(total_loss / total_tokens)
    return out
