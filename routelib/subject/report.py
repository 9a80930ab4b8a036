"""Subject v3's quality report: bits per byte beside the dense model and subject v2, whether routing
matters, and generations with their repetition rates.

    python -m routelib.subject evaluate [--delta data/moe-subject-v3] [--out data/moe-subject-v3]

Writes ``quality.json`` (everything below, with the command and environment) and ``generations.jsonl``:

- **bits per byte** and per character on the same held-out text of the five domains
  (:mod:`routelib.subject.quality`) for dense SmolLM2-135M-Instruct, subject v3 (the built folder,
  through ``AutoModelForCausalLM``) and subject v2 (``data/moe-subject``, its own 8k tokenizer);
- **routing matters**: held-out loss per window with the router's experts, with k random experts (3
  draws) and with the oracle's best k, and the paired differences with 95 % t-intervals over windows;
- **generations** of dense SmolLM2 and v3 on the same HumanEval and GSM8K prompts, greedy and sampled
  (temperature and top-p recorded), with the share of generated tokens inside a repeated 4-gram.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from routelib.subject.quality import TextSample


@dataclass(frozen=True)
class ReportConfig:
    """What the report measures."""

    routing_windows: int = 8  # held-out windows of 256 tokens per domain for the routing comparison
    random_draws: int = 3  # draws of random experts
    prompts: int = 8  # prompts per benchmark (HumanEval, GSM8K) for the generations
    new_tokens: int = 96  # generated tokens per prompt
    temperature: float = 0.7  # sampled generations
    top_p: float = 0.9  # sampled generations
    seed: int = 0  # sampling


def paired_gaps(table: pd.DataFrame) -> pd.DataFrame:
    """routing_matters' per-window losses -> loss(random) - loss(router) and loss(router) - loss(oracle)
    per window (random: mean over draws), with mean and 95 % t-interval over windows."""
    from routelib.reference import t_interval

    per = table.groupby(["mode", "batch"])["loss"].mean().unstack("mode")  # (windows, modes)
    rows = []
    for name, a, b in (("random - router", "random", "router"), ("router - oracle", "router", "oracle")):
        ti = t_interval((per[a] - per[b]).to_numpy())
        rows.append(dict(comparison=name, **{k: ti[k] for k in ("n", "mean", "low", "high")},
                         a_mean=float(per[a].mean()), b_mean=float(per[b].mean())))
    return pd.DataFrame(rows)


def generations(models: dict, tokenizer, prompts: list[tuple[str, str]], cfg: ReportConfig) -> pd.DataFrame:
    """Greedy and sampled continuations of every prompt by every model (same tokenizer): one row per
    (model, mode, prompt) with the text and the share of generated tokens inside a repeated 4-gram."""
    from routelib.routing.analyse.repetition import repeated_ngram_mask

    rows = []
    for name, model in models.items():
        for mode in ("greedy", "sampled"):
            torch.manual_seed(cfg.seed)
            for pid, text in prompts:
                ids = tokenizer(text, return_tensors="pt")["input_ids"]
                kw = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=cfg.temperature,
                                                                         top_p=cfg.top_p, top_k=0)
                with torch.no_grad():
                    out = model.generate(ids, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                                         pad_token_id=tokenizer.eos_token_id, **kw)
                new = out[0, ids.shape[1]:].numpy()
                rows.append(dict(model=name, mode=mode, problem=pid, tokens=len(new),
                                 repeated_4gram_share=float(repeated_ngram_mask(new, 4).mean()),
                                 text=tokenizer.decode(new)))
    return pd.DataFrame(rows)


def quality_report(delta_dir, cfg: ReportConfig = ReportConfig(), sample: TextSample = TextSample(),
                   v2_dir: str | Path | None = None) -> dict:
    """The report's content (module docstring) -> dict, plus a DataFrame of generations under "generations"."""
    from transformers import AutoModelForCausalLM

    from routelib import paths
    from routelib.data.batching import domain_streams, eval_batches
    from routelib.data.benchmarks import load_gsm8k, load_humaneval
    from routelib.data.corpus import DOMAINS
    from routelib.data.pretrained import load_pretrained
    from routelib.data.tokenizer import load_tokenizer
    from routelib.subject.build import read_delta, subject_v3_dir
    from routelib.subject.export import apply_delta
    from routelib.subject.quality import bits_per_byte, routing_matters, text_chunks

    chunks = text_chunks(sample)
    dense, tok = load_pretrained("smollm2-135m")
    v3 = AutoModelForCausalLM.from_pretrained(subject_v3_dir(delta_dir), dtype=torch.float32).eval()
    v2_path = Path(v2_dir) if v2_dir else paths.REPO_ROOT / "data" / "moe-subject"
    v2 = AutoModelForCausalLM.from_pretrained(v2_path, dtype=torch.float32).eval()
    bpb = {"dense SmolLM2-135M-Instruct": bits_per_byte(dense, tok, chunks),
           "subject v3": bits_per_byte(v3, tok, chunks),
           "subject v2": bits_per_byte(v2, load_tokenizer("bpe8k"), chunks, max_len=v2.config.max_position_embeddings)}
    delta, meta = read_delta(delta_dir)
    moefied = apply_delta(load_pretrained("smollm2-135m")[0], delta, meta).eval()
    batches = [b for s in domain_streams(DOMAINS, "validation", "smollm2").values()
               for b in eval_batches(s, 256, 1, cfg.routing_windows)]
    routing = routing_matters(moefied, batches, seeds=tuple(range(cfg.random_draws)))
    prompts = [(f"humaneval/{p['task_id']}", p["prompt"]) for p in load_humaneval()[: cfg.prompts]]
    prompts += [(f"gsm8k/{i}", f"Question: {p['question']}\nAnswer:") for i, p in enumerate(load_gsm8k()[: cfg.prompts])]
    gens = generations({"dense": dense, "subject v3": v3}, tok, prompts, cfg)
    rep = gens.groupby(["model", "mode"])["repeated_4gram_share"].mean().unstack("mode")
    return dict(config=asdict(cfg), text_sample=asdict(sample),
                bits_per_byte={name: t.reset_index().to_dict("records") for name, t in bpb.items()},
                bpb_ratio_v3_to_dense=float(bpb["subject v3"].loc["overall", "bits_per_byte"]
                                            / bpb["dense SmolLM2-135M-Instruct"].loc["overall", "bits_per_byte"]),
                routing_matters=paired_gaps(routing).to_dict("records"),
                routing_losses=routing.groupby("mode")["loss"].mean().to_dict(),
                repetition={m: rep.loc[m].to_dict() for m in rep.index}, generations=gens)


def write_report(delta_dir, out: str | Path, command: str, cfg: ReportConfig = ReportConfig()) -> dict:
    """:func:`quality_report` written to ``out/quality.json`` and ``out/generations.jsonl``."""
    from routelib.io import atomic_write_bytes
    from routelib.reference import environment, git_commit

    report = quality_report(delta_dir, cfg)
    gens = report.pop("generations")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(command=command, environment=environment(), **git_commit(), **report)
    atomic_write_bytes(out / "quality.json", (json.dumps(report, indent=1, default=_plain) + "\n").encode())
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in gens.to_dict("records"))
    atomic_write_bytes(out / "generations.jsonl", lines.encode())
    return report


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = ["ReportConfig", "generations", "paired_gaps", "quality_report", "write_report"]
