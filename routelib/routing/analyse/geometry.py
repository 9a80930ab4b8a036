"""Router and expert weight geometry, co-activation across layers, and routing over training -- the
analyses of the MoE router study that notebook 06 follows, on weights from :mod:`routelib.routing.analyse.weights`.

* **Router similarity across layers.** Expert order is arbitrary in every layer, so the cosine of
  router rows "expert e at layer i vs expert e at layer j" means little; we also report it after an
  optimal one-to-one matching of experts (Hungarian algorithm on the cosine matrix), against the
  same matching of random Gaussian routers (matching alone inflates the mean cosine). Linear CKA
  (Kornblith et al., ICML 2019) is invariant to expert permutations by construction: on the weights,
  with the H residual dimensions as the examples (routers read the same residual stream), and on the
  router logits of the same tokens.
* **Subspaces.** Singular values and effective rank (Roy & Vetterli 2007) of each router; the
  alignment of router row e with each expert's input subspace (the top-r right singular vectors of its
  stacked gate/up read-in): the fraction of the row's squared norm inside that subspace, against
  r / H for a random direction.
* **Co-activation.** Correlation between the events "expert a chosen at layer i" and "expert b at
  layer j" over the tokens of a domain; summarised per layer pair by the strongest partner of each
  expert.
* **Training evolution.** Routing saturation as in OLMoE (Muennighoff et al., 2024, §5): per layer,
  the share of the final checkpoint's top-k experts that an earlier checkpoint already picks for the
  same tokens; router drift (cosine of each checkpoint's router to the final one); and domain
  specialisation, the uncertainty coefficient U(domain | top-1 expert).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from routelib.errors import RoutelibError
from routelib.routing.analyse.predictability import expert_usage, joint_counts, uncertainty_coefficient


class GeometryError(RoutelibError, ValueError):
    """Weights or routing arrays these analyses cannot use (shapes that do not agree, too few tokens)."""


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def expert_cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(E, E) cosine between router rows: [e, f] = cos(a[e], b[f]); a, b: (E, H)."""
    return (_unit_rows(a.double()) @ _unit_rows(b.double()).T).numpy()


def matched_cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[float, np.ndarray]:
    """Mean cosine of router rows after the one-to-one expert matching that maximises it, and the
    matching (perm[e] = the expert of ``b`` matched to expert e of ``a``)."""
    from scipy.optimize import linear_sum_assignment

    cos = expert_cosines(a, b)
    rows, cols = linear_sum_assignment(cos, maximize=True)
    perm = np.empty(len(rows), np.int64)
    perm[rows] = cols
    return float(cos[rows, cols].mean()), perm


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA of two representations of the same n examples, x (n, p) and y (n, q):
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc (Kornblith et al. 2019).
    1 for representations equal up to rotation/permutation and isotropic scaling."""
    x, y = torch.as_tensor(np.asarray(x), dtype=torch.float64), torch.as_tensor(np.asarray(y), dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise GeometryError(f"CKA needs (n, p) and (n, q) with the same n, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x - x.mean(0), y - y.mean(0)
    den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if den == 0:
        raise GeometryError("CKA of a constant representation is undefined")
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / den)


def centre_routers(routers: torch.Tensor) -> torch.Tensor:
    """Routers (..., E, H) minus their mean row. Softmax routing cannot see a vector added to every
    row (all logits shift by the same amount), so only the centred rows decide which expert wins."""
    return routers - routers.mean(-2, keepdim=True)


def router_similarity(routers: torch.Tensor, seed: int = 0, centre: bool = True) -> dict[str, pd.DataFrame]:
    """Layer x layer similarity of routers (L, E, H): ``cosine`` (same expert index), ``matched``
    (after optimal expert matching), ``cka`` (weights, H as examples). Each carries in
    ``attrs["null"]`` its value for independent Gaussian routers of the same shape (20 draws).
    centre: compare the centred routers (:func:`centre_routers`), the part that decides routing."""
    routers = routers.detach().double().cpu()
    routers = centre_routers(routers) if centre else routers
    num_layers = routers.shape[0]
    names = [f"L{i}" for i in range(num_layers)]
    cos, matched, cka = (np.eye(num_layers) for _ in range(3))
    for i in range(num_layers):
        for j in range(num_layers):
            if i != j:
                cos[i, j] = float(np.diag(expert_cosines(routers[i], routers[j])).mean())
                matched[i, j] = matched_cosine(routers[i], routers[j])[0]
                cka[i, j] = linear_cka(routers[i].T, routers[j].T)
    gen = torch.Generator().manual_seed(seed)
    pairs = [[torch.randn(routers.shape[1:], generator=gen, dtype=torch.float64) for _ in range(2)] for _ in range(20)]
    if centre:
        pairs = [[centre_routers(a), centre_routers(b)] for a, b in pairs]
    out = {k: pd.DataFrame(v, index=names, columns=names) for k, v in
           (("cosine", cos), ("matched", matched), ("cka", cka))}
    out["cosine"].attrs["null"] = 0.0
    out["matched"].attrs["null"] = float(np.mean([matched_cosine(a, b)[0] for a, b in pairs]))
    out["cka"].attrs["null"] = float(np.mean([linear_cka(a.T, b.T) for a, b in pairs]))
    return out


def effective_rank(s: np.ndarray) -> float:
    """exp(entropy of the normalised singular values) (Roy & Vetterli 2007): between 1 and len(s)."""
    p = np.asarray(s, np.float64) / np.sum(s)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def router_spectra(routers: torch.Tensor, centre: bool = True) -> pd.DataFrame:
    """Per layer: the router's singular values (descending), share of energy in the top one, and
    effective rank (E at most; E - 1 for centred routers, whose rows sum to zero)."""
    rows = []
    routers = routers.detach().double().cpu()
    for layer, w in enumerate(centre_routers(routers) if centre else routers):
        s = torch.linalg.svdvals(w).numpy()
        rows.append({"layer": layer, "singular_values": np.round(s, 4).tolist(),
                     "top1_energy": float(s[0] ** 2 / (s ** 2).sum()), "effective_rank": effective_rank(s)})
    return pd.DataFrame(rows)


def expert_input_subspaces(expert_input: torch.Tensor, rank: int) -> torch.Tensor:
    """(E, H, r) orthonormal bases: the top-``rank`` right singular vectors of each expert's read-in
    (E, 2I, H) -- the directions of the residual stream the expert reads most."""
    if not 1 <= rank <= min(expert_input.shape[1:]):
        raise GeometryError(f"rank must be in 1..{min(expert_input.shape[1:])}, got {rank}")
    from routelib.reference import torch_threads

    with torch_threads(1):  # a batch of small SVDs: threads beyond the free cores slow LAPACK ~200x (measured)
        _, _, vh = torch.linalg.svd(expert_input.detach().double().cpu(), full_matrices=False)  # vh: (E, min, H)
    return vh[:, :rank].transpose(1, 2)  # (E, H, r)


def router_expert_alignment(router: torch.Tensor, expert_input: torch.Tensor, rank: int) -> np.ndarray:
    """(E, E) alignment [e, f] = ||U_f^T r_e||^2 / ||r_e||^2: the share of (centred) router row e inside
    expert f's top-``rank`` input subspace (a random direction: rank / H on average)."""
    bases = expert_input_subspaces(expert_input, rank)  # (E, H, r)
    rows = _unit_rows(centre_routers(router.detach().double().cpu()))  # (E, H): the part that decides routing
    proj = torch.einsum("eh,fhr->efr", rows, bases)  # (E_router, E_expert, r)
    return (proj ** 2).sum(-1).numpy()


def alignment_summary(weights, rank: int) -> pd.DataFrame:
    """Per MoE layer: mean alignment of each router row with its own expert's input subspace
    (diagonal), with the other experts' (off-diagonal), and the random-direction baseline rank / H;
    plus the cosine of the smallest principal angle between the router's row space and each expert's
    subspace (mean over experts)."""
    from scipy.linalg import subspace_angles

    rows = []
    for i, layer in enumerate(weights.layers):
        a = router_expert_alignment(layer.router, layer.expert_input(), rank)
        off = a[~np.eye(len(a), dtype=bool)]
        bases = expert_input_subspaces(layer.expert_input(), rank).numpy()
        router_rows = centre_routers(layer.router.detach().double().cpu()).numpy().T  # (H, E), rank E - 1
        first = [float(np.cos(subspace_angles(router_rows, b)).max()) for b in bases]
        rows.append({"layer": i, "own_expert": float(np.diag(a).mean()), "other_experts": float(off.mean()),
                     "random_direction": rank / layer.router.shape[1], "own_minus_other": float(np.diag(a).mean() - off.mean()),
                     "max_principal_cosine": float(np.mean(first))})
    return pd.DataFrame(rows)


# ---- routing on text ----------------------------------------------------------------------------


@torch.no_grad()
def route_batches(model, batches: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Run (x, y) batches through a transformers MoE model (no generation) and return every token's
    top-k experts (N, L, k) and router log-probabilities (N, L, E), via the collection hooks."""
    from routelib.routing.record.routers import RoutingRecorder

    experts, logprobs = [], []
    device = next(model.parameters()).device
    with RoutingRecorder(model, keep_logits=True) as rec:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch  # (B, T)
            rec.reset()
            model(input_ids=x.to(device))
            ids, _, probs = rec.gather(x.shape[0], x.shape[1])  # (B, T, L, k), (B, T, L, E)
            experts.append(ids.reshape(-1, *ids.shape[2:]).numpy())
            logprobs.append(probs.clamp_min(1e-30).log().reshape(-1, *probs.shape[2:]).numpy())
    return np.concatenate(experts), np.concatenate(logprobs)


def logit_cka(logprobs: np.ndarray) -> pd.DataFrame:
    """(L, L) linear CKA between layers' router log-probabilities on the same tokens (N, L, E), each
    token's row centred over experts (so it equals the centred logits)."""
    z = logprobs - logprobs.mean(-1, keepdims=True)  # (N, L, E)
    num_layers = z.shape[1]
    out = np.eye(num_layers)
    for i in range(num_layers):
        for j in range(i + 1, num_layers):
            out[i, j] = out[j, i] = linear_cka(z[:, i], z[:, j])
    names = [f"L{i}" for i in range(num_layers)]
    return pd.DataFrame(out, index=names, columns=names)


def coactivation(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """(L*E, L*E) Pearson correlation of the indicators "expert e in the top-k at layer l" over the
    tokens (N, L, k); index l*E + e. Experts never (or always) chosen get correlation 0."""
    n, num_layers, _ = experts.shape
    z = np.zeros((n, num_layers, num_experts), np.float64)
    np.put_along_axis(z, experts.astype(np.int64), 1.0, axis=2)
    z = z.reshape(n, -1)
    z -= z.mean(0)
    std = z.std(0)
    cov = z.T @ z / n
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = cov / np.outer(std, std)
    return np.nan_to_num(corr)


def coactivation_summary(corr: np.ndarray, num_experts: int) -> pd.DataFrame:
    """(L, L) mean over layer i's experts of the strongest correlation with any expert of layer j."""
    num_layers = corr.shape[0] // num_experts
    blocks = corr.reshape(num_layers, num_experts, num_layers, num_experts)
    out = blocks.max(-1).mean(1)  # (L, L)
    np.fill_diagonal(out, np.nan)
    names = [f"L{i}" for i in range(num_layers)]
    return pd.DataFrame(out, index=names, columns=names)


def load_balance(experts: np.ndarray, num_experts: int) -> pd.DataFrame:
    """Per layer: coefficient of variation of expert load, normalised entropy of the load (1 = even),
    and the busiest expert's share relative to even (E * max share)."""
    usage = expert_usage(experts, num_experts)  # (L, E)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -(np.where(usage > 0, usage * np.log(usage), 0)).sum(1) / np.log(num_experts)
    return pd.DataFrame({"layer": np.arange(len(usage)), "cv": usage.std(1) / usage.mean(1),
                         "entropy_norm": entropy, "max_over_even": usage.max(1) * num_experts})


# ---- training evolution ---------------------------------------------------------------------------


def saturation(experts_by_step: Mapping[int, np.ndarray]) -> pd.DataFrame:
    """OLMoE's routing saturation: for every checkpoint and layer, the mean over tokens of
    |top-k at the checkpoint ∩ top-k at the final checkpoint| / k (same tokens, (N, L, k) each)."""
    steps = sorted(experts_by_step)
    final = np.sort(experts_by_step[steps[-1]], -1)
    rows = []
    for step in steps:
        ex = np.sort(experts_by_step[step], -1)
        if ex.shape != final.shape:
            raise GeometryError(f"step {step}: routing of shape {ex.shape}, the final one is {final.shape}")
        overlap = (ex[..., :, None] == final[..., None, :]).any(-1).mean(-1)  # (N, L)
        rows += [{"step": step, "layer": l, "saturation": float(overlap[:, l].mean())} for l in range(ex.shape[1])]
    return pd.DataFrame(rows)


def router_drift(routers_by_step: Mapping[int, torch.Tensor]) -> pd.DataFrame:
    """Per checkpoint and layer: mean cosine of each (centred) router row to the same row at the final
    checkpoint, and relative change ||W_t - W_prev|| / ||W_prev|| since the previous checkpoint."""
    steps = sorted(routers_by_step)
    final = centre_routers(routers_by_step[steps[-1]].double())
    rows, prev = [], None
    for step in steps:
        w = centre_routers(routers_by_step[step].double())
        for l in range(w.shape[0]):
            change = float((w[l] - prev[l]).norm() / prev[l].norm()) if prev is not None else float("nan")
            rows.append({"step": step, "layer": l, "cosine_to_final": float(np.diag(expert_cosines(w[l], final[l])).mean()),
                         "relative_change": change})
        prev = w
    return pd.DataFrame(rows)


def domain_predictability(experts: np.ndarray, domains: Sequence[str], num_experts: int) -> pd.DataFrame:
    """Per layer: U(domain | top-1 expert) -- the share of the domain's entropy that the token's top-1
    expert removes (0: experts ignore the domain; 1: the expert tells the domain)."""
    domains = np.asarray(domains)
    names, codes = np.unique(domains, return_inverse=True)
    if len(codes) != len(experts):
        raise GeometryError(f"{len(codes)} domain labels for {len(experts)} tokens")
    size = max(num_experts, len(names))
    rows = []
    for l in range(experts.shape[1]):
        joint = joint_counts(experts[:, l, 0].astype(np.int64), codes, size)  # rows expert, columns domain
        rows.append({"layer": l, "u_domain_given_expert": uncertainty_coefficient(joint)})
    return pd.DataFrame(rows)
