"""Notebook 06's parameters and pipeline: the shipped subject's router/expert geometry and routing
on domain text, and routing evolution over the checkpoints of notebook 03's training run.

The training-evolution part re-uses notebook 03's MoE run: :func:`training_checkpoints` calls
``routelib.studies.moe_vs_dense.train_arm`` with notebook 03's parameters (its defaults, or the ``evo_*`` values
given), which loads the finished run from ``runs/03_moe_speedup`` when notebook 03 already made it
and trains it (about 40 s on 2 CPU cores at the defaults) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from routelib import paths
from routelib.errors import ConfigError
from routelib.routing import geometry as G


@dataclass
class RouterStudyConfig:
    model: str = "data/moe-subject"  # transformers MoE to study (a local folder or a hub name)
    subspace_rank: int = 16  # r: dimensions of each expert's input subspace in the alignment test
    seq_len: int = 128  # tokens per held-out window routed for co-activation and load balance
    windows_per_domain: int = 16  # held-out windows per domain (validation split)
    evo_num_layers: int = 2  # notebook 03's MoE run whose checkpoints are studied: decoder layers
    evo_num_experts: int = 4  # ... experts per layer
    evo_steps: int = 100  # ... training steps
    evo_ckpt_every: int = 25  # ... checkpoint interval
    evo_out_dir: str = "runs/03_moe_speedup"  # ... its out_dir (where notebook 03 keeps checkpoints)
    seed: int = 0  # random baselines

    def __post_init__(self):
        for name in ("subspace_rank", "seq_len", "windows_per_domain", "evo_num_layers", "evo_num_experts",
                     "evo_steps", "evo_ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.evo_ckpt_every >= self.evo_steps:
            raise ConfigError(f"evo_ckpt_every={self.evo_ckpt_every} leaves fewer than two checkpoints in "
                              f"{self.evo_steps} steps: nothing to compare")

    def study_config(self):
        """Notebook 03's :class:`~routelib.studies.moe_vs_dense.MoEStudyConfig` with the ``evo_*`` values."""
        from routelib.studies.moe_vs_dense import MoEStudyConfig

        return MoEStudyConfig(num_layers=self.evo_num_layers, num_experts=self.evo_num_experts, steps=self.evo_steps,
                              ckpt_every=self.evo_ckpt_every, out_dir=self.evo_out_dir, seq_len=self.seq_len,
                              eval_windows=self.windows_per_domain)


def load_subject(cfg: RouterStudyConfig):
    """The studied transformers MoE (eval mode) from ``cfg.model`` (relative paths: from the repo root)."""
    from transformers import AutoModelForCausalLM

    local = paths.in_repo(cfg.model)
    return AutoModelForCausalLM.from_pretrained(str(local) if local.exists() else cfg.model).eval()


def domain_routing(model, cfg: RouterStudyConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Route held-out windows of every corpus domain through ``model``: experts (N, L, k), router
    log-probabilities (N, L, E) and the domain of each token (N,)."""
    from routelib.evaluation import domain_eval_data

    experts, logprobs, domains = [], [], []
    for domain, batches in domain_eval_data(cfg.study_config()).items():
        ex, lp = G.route_batches(model, batches)
        experts.append(ex)
        logprobs.append(lp)
        domains += [domain] * len(ex)
    return np.concatenate(experts), np.concatenate(logprobs), np.asarray(domains)


def training_checkpoints(cfg: RouterStudyConfig) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint of notebook 03's MoE run with these parameters (trained
    here if notebook 03 has not made it; an interrupted run resumes)."""
    from routelib.studies.moe_vs_dense import train_arm, training_batches
    from routelib.routing.weights import checkpoint_steps

    study = cfg.study_config()
    lm_cfg = study.arm_configs()["moe"]
    train_arm("moe", lm_cfg, study, training_batches(study))
    runs = sorted((study.run_dir() / "checkpoints").glob("moe-*"))
    for run in runs:
        state = run / "step_{:06d}".format(study.steps) / "state.json"
        if state.is_file() and _same_model(state, lm_cfg):
            return checkpoint_steps(run)
    raise FileNotFoundError(f"train_arm finished but no checkpoint folder of this configuration in {study.run_dir()}")


def _same_model(state_json: Path, lm_cfg) -> bool:
    import dataclasses
    import json

    return json.loads(state_json.read_text()).get("model_config") == json.loads(
        json.dumps(dataclasses.asdict(lm_cfg), default=str))


def evolution(cfg: RouterStudyConfig) -> dict[str, pd.DataFrame]:
    """Routing over notebook 03's checkpoints on the same held-out tokens: ``saturation`` (OLMoE),
    ``drift`` (router cosine to the final checkpoint, relative change), ``specialisation``
    (U(domain | top-1 expert)) and ``balance`` (load CV), each per step and layer."""
    from routelib.routing.weights import hf_from_checkpoint, moe_weights

    experts, routers, special, balance = {}, {}, [], []
    for step, folder in training_checkpoints(cfg):
        model = hf_from_checkpoint(folder)
        ex, _, domains = domain_routing(model, cfg)
        experts[step] = ex
        routers[step] = moe_weights(model).routers().clone()
        num_experts = routers[step].shape[1]
        special.append(G.domain_specialisation(ex, domains, num_experts).assign(step=step))
        balance.append(G.load_balance(ex, num_experts).assign(step=step))
    return {"saturation": G.saturation(experts), "drift": G.router_drift(routers),
            "specialisation": pd.concat(special, ignore_index=True), "balance": pd.concat(balance, ignore_index=True)}


def save_tables(tables: dict[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Write each table as CSV under ``out_dir`` (relative: from the repo root); returns the files."""
    out = paths.in_repo(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in tables.items():
        path = out / f"{name}.csv"
        table.to_csv(path, index=not isinstance(table.index, pd.RangeIndex))
        written.append(path)
    return written


