"""Notebook 03's MoE arm as a routing subject: exported in the Hugging Face Mixtral format with a model
card, its training snapshots beside it (what notebooks 04-06 study offline);
``python -m routelib.studies.moe_vs_dense subject --out data/moe-subject`` trains and exports it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from routelib.data import load_tokenizer
from routelib.evaluation import domain_eval_data, perplexity_by_domain
from routelib.models import LM, LMConfig
from routelib.models.export import export_hf
from routelib.train import TrainResult
from routelib.studies.moe_vs_dense import MoEStudyConfig, train_arm, training_batches


# ------------------------------------------------------------------------------ export + model card
@torch.no_grad()
def hf_perplexity_by_domain(export_dir: Path, eval_data: dict[str, list]) -> dict[str, float]:
    """Validation perplexity of the exported checkpoint as ``transformers`` loads it (offline)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    return perplexity_by_domain(hf, eval_data)


def card_eval_sets(cfg: MoEStudyConfig) -> tuple[dict[str, list], dict[str, list] | None]:
    """The model card's held-out sets: the headline one (``eval_windows`` windows of ``card_seq_len``
    tokens per domain, comparable across subjects of other contexts) and, when the trained context
    differs, one at the trained context (windows of ``seq_len`` tokens, about as many tokens; else None)."""
    headline = domain_eval_data(dataclasses.replace(cfg, seq_len=cfg.card_seq_len))
    if cfg.seq_len == cfg.card_seq_len:
        return headline, None
    windows = max(1, cfg.eval_windows * cfg.card_seq_len // cfg.seq_len)
    return headline, domain_eval_data(dataclasses.replace(cfg, eval_windows=windows))


def history_train_s(result: TrainResult, tokens_per_step: int) -> float:
    """Seconds spent in training steps, from the logged throughput of every window of the history
    (window tokens / tokens_per_s; checkpoint and evaluation time excluded). Unlike
    ``result.wall_s`` (this call only) it covers every invocation of a resumed run."""
    total, prev = 0.0, 0
    for record in result.history:
        if record.get("tokens_per_s"):
            total += (record["step"] - prev) * tokens_per_step / record["tokens_per_s"]
        prev = record["step"]
    return total


def _describe(eval_data: dict[str, list]) -> str:
    counts = [sum(x.shape[0] for x, _ in batches) for batches in eval_data.values()]
    seq_len = next(x.shape[1] for batches in eval_data.values() for x, _ in batches)
    return f"validation split, up to {max(counts)} windows of {seq_len} tokens per domain"


def subject_snapshots(cfg: MoEStudyConfig, lm_cfg: LMConfig, run_dir: Path):
    """Training snapshots of the subject run (``routelib.routing.analyse.snapshots``): the initialisation
    (rebuilt from ``cfg.seed`` exactly as :func:`train_arm` builds it) and every kept checkpoint in
    ``run_dir``, each routing the same held-out windows (``snapshot_windows`` x ``snapshot_seq_len``
    tokens per domain)."""
    from routelib.routing.analyse.snapshots import collect_snapshots
    from routelib.routing.analyse.weights import checkpoint_steps, hf_from_checkpoint, hf_from_lm

    batches = domain_eval_data(dataclasses.replace(cfg, seq_len=cfg.snapshot_seq_len, eval_windows=cfg.snapshot_windows))

    def models():
        torch.manual_seed(cfg.seed)
        yield 0, hf_from_lm(LM(lm_cfg), "the initialisation")
        for step, folder in checkpoint_steps(run_dir):
            yield step, hf_from_checkpoint(folder)

    return collect_snapshots(models(), batches)


SNAPSHOTS_FILE = "training_snapshots.npz"  # beside the exported subject (notebook 06 reads it)


def export_subject(model: LM, cfg: MoEStudyConfig, result: TrainResult, eval_data: dict[str, list],
                   export_dir: Path, command: str, snapshots=None, at_context: dict[str, list] | None = None) -> dict:
    """Export the MoE arm as a Hugging Face Mixtral checkpoint with ``model_card.json`` and
    ``README.md``: config, data, steps, validation perplexity per domain on ``eval_data`` (and on
    ``at_context`` when given; see :func:`card_eval_sets`), measured on the export through
    ``AutoModelForCausalLM``, the command that made it, and the training ``snapshots`` when given
    (written beside it, ``routelib.routing.analyse.snapshots``)."""
    from routelib.routing.analyse.snapshots import save_snapshots

    export_dir = Path(export_dir)
    export_hf(model.cpu().float(), load_tokenizer(cfg.tokenizer), export_dir)
    card = dict(
        model="routelib MoE LM (Mixtral architecture), the offline routing subject of notebooks 04-06",
        command=command,
        study_config=dataclasses.asdict(cfg),
        lm_config=dataclasses.asdict(model.config),
        total_params=model.num_parameters(), active_params=model.num_parameters(active=True),
        steps=result.step, tokens_seen=result.step * cfg.batch_size * cfg.seq_len,
        data="routelib.data corpus, train split, all domains (code, math, fiction, encyclopedic, news), "
             f"random {cfg.seq_len}-token windows",
        eval=_describe(eval_data),
        validation_perplexity={k: round(v, 4) for k, v in hf_perplexity_by_domain(export_dir, eval_data).items()},
        train_wall_s=round(history_train_s(result, cfg.batch_size * cfg.seq_len), 1),
    )
    if at_context is not None:
        card["eval_at_context"] = _describe(at_context)
        card["validation_perplexity_at_context"] = {
            k: round(v, 4) for k, v in hf_perplexity_by_domain(export_dir, at_context).items()}
    if snapshots is not None:
        save_snapshots(snapshots, export_dir / SNAPSHOTS_FILE)
        card["training_snapshots"] = dict(
            file=SNAPSHOTS_FILE, steps=snapshots.steps.tolist(), tokens_per_domain=cfg.snapshot_windows * cfg.snapshot_seq_len,
            contents="per step: router matrices (L, E, H) and the top-k experts of fixed held-out tokens (N, L, k)")
    (export_dir / "model_card.json").write_text(json.dumps(card, indent=2))
    (export_dir / "README.md").write_text(subject_readme(card, model.config, cfg, export_dir.name))
    return card


def train_and_export(cfg: MoEStudyConfig, export_dir: Path, command: str) -> dict | None:
    """The ``subject`` command: train the MoE arm (checkpoints under ``cfg.out_dir``, resumed when
    there) and export it with its model card and training snapshots (:func:`export_subject`); returns
    the card. Under ``torchrun`` the ranks train data-parallel on the same global batch
    (``routelib.train.process_group``; ``batch_size`` windows a step, split over the ranks) and rank 0
    alone, after the group has closed, computes the snapshots and writes the export; the other ranks
    return None."""
    from routelib.train import process_group

    lm_cfg = cfg.moe_config()
    with process_group("nccl" if cfg.device_().type == "cuda" else "gloo") as (rank, _):
        model, result = train_arm("moe", lm_cfg, cfg, training_batches(cfg))
    if rank != 0:
        return None
    snapshots = subject_snapshots(cfg, lm_cfg, Path(result.checkpoint).parent)
    headline, at_context = card_eval_sets(cfg)
    return export_subject(model, cfg, result, headline, Path(export_dir), command, snapshots, at_context)


def subject_readme(card: dict, lm_cfg: LMConfig, cfg: MoEStudyConfig, name: str) -> str:
    """The exported subject's README.md (the model card in words)."""
    lines = [f"# {name}", "", card["model"] + ".", "", f"Made by: `{card['command']}`", "",
             f"- parameters: {card['total_params'] / 1e6:.2f} M total, {card['active_params'] / 1e6:.2f} M active per token",
             f"- architecture: {lm_cfg.num_layers} layers, hidden {lm_cfg.hidden_size}, "
             f"{lm_cfg.num_experts} experts of width {lm_cfg.intermediate_size}, top-{lm_cfg.top_k}, "
             f"vocab {lm_cfg.vocab_size} (bpe8k), tied embeddings, trained context {cfg.seq_len} tokens",
             f"- training: {card['steps']} steps x {cfg.batch_size} x {cfg.seq_len} tokens = {card['tokens_seen'] / 1e6:.2f} M tokens, "
             f"lr {cfg.lr}, {card['train_wall_s']} s", f"- data: {card['data']}", ""]
    ppl_at = card.get("validation_perplexity_at_context")
    lines += [f"Validation perplexity (transformers `AutoModelForCausalLM`, fp32); {card['eval']}"
              + (f"; at context: {card['eval_at_context']}" if ppl_at else "") + ":", "",
              "| domain | perplexity |" + (f" at context ({cfg.seq_len}) |" if ppl_at else ""),
              "|---|---:|" + ("---:|" if ppl_at else "")]
    lines += [f"| {d} | {v:.2f} |" + (f" {ppl_at[d]:.2f} |" if ppl_at else "") for d, v in card["validation_perplexity"].items()]
    if "training_snapshots" in card:
        snap = card["training_snapshots"]
        lines += ["", f"Training snapshots (`{snap['file']}`, `routelib.routing.analyse.snapshots.load_snapshots`): {snap['contents']}, "
                  f"{snap['tokens_per_domain']} held-out tokens per domain, at steps {snap['steps']}."]
    lines += ["", "Load it: `AutoModelForCausalLM.from_pretrained(path)` or `routelib.models.load_hf(path)`."]
    return "\n".join(lines) + "\n"
