"""Hybrid Gated DeltaNet / softmax-attention language models: a static layout and per-token routing.

The two 4-layer models of the "Dynamic Per-Token Layer Routing" project that notebook 02 tests:

- **static** (``HybridConfig.static()``):  [GDN, GDN, GDN, softmax] -- 3 linear-attention layers and a
  final full-attention layer (the static hybrid; Yang, Kautz & Hatamizadeh, "Gated Delta Networks",
  ICLR 2025, train such GDN/attention hybrids);
- **dynamic** (``HybridConfig.dynamic()``): [GDN, routed, routed, softmax] -- layers 1 and 2 hold both
  a GDN and a softmax-attention mixer, and every token uses exactly one of them.

Each block is pre-norm, as the project's LM (:mod:`routelib.models.lm`): ``x + mixer(RMSNorm(x))``
then ``x + SwiGLU(RMSNorm(x))``; a final RMSNorm and the LM head (tied to the embedding by default).

Routing (dynamic model):

- *Parallel routing*: one router, ``RMSNorm`` then a linear map to 2 logits [GDN, softmax] per routed
  layer, reads the residual stream after the last fixed layer before the first routed one (layer 0)
  and decides every routed layer at once ("all routing decisions made at layer 0" in the original
  project, "Dynamic Per-Token Layer Routing").
- *Training*: Gumbel-softmax straight-through (Jang, Gu & Poole, ICLR 2017; Maddison et al. 2017):
  ``p = softmax((logits + Gumbel noise) / tau)``, the forward pass takes the argmax (hard), and the
  chosen branch's output is multiplied by ``gate = 1 + (p_c - stopgrad(p_c))`` -- exactly 1 in the
  forward pass, d p_c in the backward pass, so the router learns from how useful the chosen branch's
  output was (as a Switch-Transformer router does from its gate). The unchosen branch is not
  computed, so it contributes no gradient. ``tau`` follows :meth:`HybridConfig.temperature_at`, an
  exponential anneal from ``tau_start`` to ``tau_end`` over ``tau_anneal_steps`` training forwards;
  the model counts them in the persistent buffer ``router_step``, so a resumed run continues the
  schedule.
- *Evaluation* (``model.eval()``, or any forward under ``torch.no_grad()``): deterministic argmax of
  the router logits, no noise, and the temperature counter does not move.
- *Load balancing* (Switch Transformer, Fedus, Zoph & Shazeer, JMLR 2022): per routed layer
  ``balance = 2 * sum_i f_i P_i`` over the two branches, f_i the fraction of the batch's tokens sent
  to branch i (hard decisions) and P_i the mean router probability ``softmax(logits)`` of branch i;
  1 when balanced (f = P = 1/2), 2 when collapsed (it dips below 1 when f and P disagree). ``HybridOutput.aux_loss = balance_coef * mean over routed
  layers`` (the original project's ``alpha``), added by ``routelib.train``'s default loss with weight 1. Like
  every batch-level MoE loss it couples the tokens of a batch *in the loss*, never in the outputs.

What each branch sees of a token (real compute skipping: a token runs only its chosen branch):

- **GDN branch**: ``GatedDeltaNet`` with ``write_mask = routed to GDN`` in ``mask_mode="skip"``: the
  GDN-routed tokens of each row are gathered (order kept) and the layer runs on that compacted
  sequence -- its short convolution and its recurrent state see only GDN-routed tokens. A token routed
  to softmax neither reads nor updates the GDN memory of that layer.
- **softmax branch**, ``HybridConfig.softmax_kv``:
  ``"routed"`` (default): the softmax-routed tokens are gathered and attend causally among
  themselves only (Mixture-of-Depths style, Raposo et al. 2024): queries, keys and values exist only
  for them, so the attention costs (softmax tokens)^2 and a KV cache would hold only them.
  ``"all"``: queries only for softmax-routed tokens, keys and values for *every* token of the
  sequence (the K/V projections run on all tokens; the attention costs softmax tokens x T).
  RoPE uses each token's original position in both modes, so distances are the true ones.

Both modes are causal: a token's output depends only on tokens at or before its position (the
compacted sequences keep order, and routing decisions are per token). No KV cache / incremental
decoding: forward runs whole sequences (inference speed is measured as prefill throughput).
Compaction has data-dependent lengths (a host sync per routed branch; ``torch.compile`` would
recompile per shape), and a branch no token of a batch chose gets no gradient, so under DDP set
``TrainConfig.ddp_find_unused=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from routelib.errors import ConfigError
from routelib.models.attention import AttentionConfig, SoftmaxAttention
from routelib.models.gdn import GatedDeltaNet, GDNConfig
from routelib.models.lm import Attention, RMSNorm, apply_rope, rope_cos_sin
from routelib.models.moe import DenseFFN

LAYER_KINDS = ("gdn", "softmax", "routed")
BRANCHES = ("gdn", "softmax")  # router logit order: index 0 = GDN, index 1 = softmax
STATIC_LAYOUT = ("gdn", "gdn", "gdn", "softmax")  # the original project's baseline
DYNAMIC_LAYOUT = ("gdn", "routed", "routed", "softmax")  # the original project's dynamic model
SOFTMAX_KV = ("routed", "all")


@dataclass
class HybridConfig:
    vocab_size: int = 8192  # V: tokens in the vocabulary (bpe8k: 8192)
    hidden_size: int = 256  # H: width of the residual stream (the original project: 768)
    num_heads: int = 4  # heads of every mixer, GDN and softmax (the original project: 12)
    num_kv_heads: int | None = None  # softmax key/value heads (GQA); None = num_heads
    intermediate_size: int = 512  # inner width of the SwiGLU FFN of every block
    layers: tuple[str, ...] = DYNAMIC_LAYOUT  # per block: "gdn", "softmax" or "routed" (per-token choice)
    softmax_kv: Literal["routed", "all"] = "routed"  # keys/values of a routed softmax branch: only the
    # softmax-routed tokens ("routed", Mixture-of-Depths style) or every token ("all")
    balance_coef: float = 0.01  # alpha: weight of the load-balancing loss in aux_loss (the original project: 0.01 in its text, 0.5 in its code)
    tau_start: float = 1.0  # Gumbel-softmax temperature at the first training forward
    tau_end: float = 0.5  # temperature reached after tau_anneal_steps (exponential anneal), then kept
    tau_anneal_steps: int = 1000  # training forwards over which tau goes from tau_start to tau_end
    conv_size: int = 4  # GDN short causal convolution kernel
    gdn_chunk_size: int = 64  # tokens per chunk of the pure-PyTorch GDN rule (speed only)
    gdn_backend: str = "auto"  # GDN rule: "auto" (fla on CUDA if installed, else chunked PyTorch), "torch", "naive"
    rope_theta: float = 10000.0  # RoPE base of the softmax layers
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm
    tie_embeddings: bool = True  # the LM head reuses the token embedding
    init_std: float = 0.02  # normal init std; residual projections get init_std / sqrt(2 * num_layers)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "conv_size", "gdn_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"HybridConfig.{name} must be an int >= 1, got {value!r}")
        self.layers = tuple(self.layers)
        bad = [k for k in self.layers if k not in LAYER_KINDS]
        if not self.layers or bad:
            raise ConfigError(f"HybridConfig.layers={self.layers!r}: every entry must be one of {LAYER_KINDS}")
        if self.layers[0] == "routed":
            raise ConfigError("HybridConfig.layers: the first layer cannot be routed -- the router reads the "
                              "output of the fixed layer(s) before the first routed one")
        if self.softmax_kv not in SOFTMAX_KV:
            raise ConfigError(f"HybridConfig.softmax_kv={self.softmax_kv!r}: choose one of {SOFTMAX_KV}")
        if not (self.balance_coef >= 0 and math.isfinite(self.balance_coef)):
            raise ConfigError(f"HybridConfig.balance_coef must be a finite number >= 0, got {self.balance_coef!r}")
        if not (self.tau_start > 0 and self.tau_end > 0):
            raise ConfigError(f"HybridConfig: tau_start and tau_end must be > 0, got {self.tau_start!r}, {self.tau_end!r}")
        if isinstance(self.tau_anneal_steps, bool) or not isinstance(self.tau_anneal_steps, int) \
                or self.tau_anneal_steps < 0:
            raise ConfigError(f"HybridConfig.tau_anneal_steps must be an int >= 0, got {self.tau_anneal_steps!r}")
        if not self.init_std >= 0:
            raise ConfigError(f"HybridConfig.init_std must be >= 0, got {self.init_std!r}")
        self.gdn_config()  # validates heads, backend
        self.attention_config()

    @classmethod
    def static(cls, **kw) -> HybridConfig:
        """The original project's baseline: [GDN, GDN, GDN, softmax]."""
        return cls(**{**kw, "layers": STATIC_LAYOUT})

    @classmethod
    def dynamic(cls, **kw) -> HybridConfig:
        """The original project's dynamic model: [GDN, routed, routed, softmax]."""
        return cls(**{**kw, "layers": DYNAMIC_LAYOUT})

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def routed_layers(self) -> tuple[int, ...]:
        """Indices of the routed blocks (router output r drives block routed_layers[r])."""
        return tuple(i for i, k in enumerate(self.layers) if k == "routed")

    @property
    def router_after(self) -> int | None:
        """Index of the block whose output the router reads (the one before the first routed block)."""
        return self.routed_layers[0] - 1 if self.routed_layers else None

    def temperature_at(self, step: int) -> float:
        """Gumbel-softmax temperature at training forward ``step`` (0-based):
        ``tau_start * (tau_end / tau_start) ** min(1, step / tau_anneal_steps)``; tau_end when
        tau_anneal_steps = 0."""
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        frac = 1.0 if self.tau_anneal_steps == 0 else min(1.0, step / self.tau_anneal_steps)
        return self.tau_start * (self.tau_end / self.tau_start) ** frac

    def gdn_config(self) -> GDNConfig:
        return GDNConfig(hidden_size=self.hidden_size, num_heads=self.num_heads, conv_size=self.conv_size,
                         norm_eps=self.rms_norm_eps, chunk_size=self.gdn_chunk_size, backend=self.gdn_backend,
                         mask_mode="skip", init_std=self.init_std)

    def attention_config(self) -> AttentionConfig:
        return AttentionConfig(hidden_size=self.hidden_size, num_heads=self.num_heads,
                               num_kv_heads=self.num_kv_heads, rope_theta=self.rope_theta, init_std=self.init_std)


# ----------------------------------------------------------------------------------------------
# routing


@dataclass
class RouteDecision:
    logits: torch.Tensor  # (B, T, R, 2) router logits per routed layer, [GDN, softmax]
    to_softmax: torch.Tensor  # (B, T, R) bool: the token runs the softmax branch of routed layer r
    gate: torch.Tensor | None  # (B, T, R) straight-through gate of the chosen branch (1 forward); None at eval
    temperature: float | None  # Gumbel-softmax tau used (None: argmax or given routes)

    @property
    def probs(self) -> torch.Tensor:
        """(B, T, R, 2) router probabilities softmax(logits), fp32."""
        return self.logits.float().softmax(-1)

    def balance_loss(self) -> torch.Tensor:
        """(R,) Switch load-balancing loss per routed layer, ``2 * sum_i f_i P_i`` (1 = balanced)."""
        f_soft = self.to_softmax.float().mean((0, 1))  # (R,) fraction of tokens to softmax
        frac = torch.stack((1.0 - f_soft, f_soft), dim=-1)  # (R, 2)
        return 2.0 * (frac * self.probs.mean((0, 1))).sum(-1)  # (R,)

    def entropy_bits(self) -> torch.Tensor:
        """(R,) mean over tokens of the router distribution's entropy, in bits (0 = certain, 1 = 50/50)."""
        p = self.probs
        return -(p * torch.log2(p.clamp_min(1e-12))).sum(-1).mean((0, 1))  # (R,)


def gumbel_straight_through(logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard Gumbel-softmax over the last dim (2 branches). logits (..., 2) ->
    (choice (...) int64 argmax of the noisy logits, gate (...) float = exactly 1 in the forward pass,
    gradient of the chosen branch's soft probability softmax((logits + g) / tau) in the backward pass)."""
    gumbel = -torch.empty_like(logits, dtype=torch.float32).exponential_().log()  # (..., 2) Gumbel(0, 1)
    soft = ((logits.float() + gumbel) / tau).softmax(-1)  # (..., 2)
    choice = soft.argmax(-1)  # (...)
    p_chosen = soft.gather(-1, choice[..., None]).squeeze(-1)  # (...)
    return choice, 1.0 + (p_chosen - p_chosen.detach())


class ParallelRouter(nn.Module):
    """RMSNorm then Linear(hidden -> 2 per routed layer): every routed layer's logits from one stream."""

    def __init__(self, hidden_size: int, num_routed: int, eps: float):
        super().__init__()
        self.num_routed = num_routed
        self.norm = RMSNorm(hidden_size, eps)
        self.proj = nn.Linear(hidden_size, 2 * num_routed, bias=False)  # weight (2R, H)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, T, H) -> logits (B, T, R, 2)."""
        b, t, _ = h.shape
        return self.proj(self.norm(h)).view(b, t, self.num_routed, 2)


# ----------------------------------------------------------------------------------------------
# the routed softmax branch


def compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of mask (B, T), gathered to the front of each row in order.
    Returns idx (B, T') int64 (T' = most True in any row; the tail of shorter rows holds other
    positions) and valid (B, T') bool (idx[b, j] is a True entry). One host sync (T')."""
    counts = mask.sum(1)  # (B,)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # (B, T) True positions first
    tc = int(counts.max()) if mask.shape[1] else 0
    idx = order[:, :tc]  # (B, T')
    return idx, torch.arange(tc, device=mask.device) < counts[:, None]


def _rope_rows(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin (B, 1, T', D) for per-row integer positions (B, T')."""
    b, t = positions.shape
    cos, sin = rope_cos_sin(positions.reshape(-1), head_dim, theta, dtype)  # (B*T', D) each
    return cos.view(b, 1, t, head_dim), sin.view(b, 1, t, head_dim)


def routed_softmax_attention(attn: SoftmaxAttention, x: torch.Tensor, selected: torch.Tensor,
                             kv: str = "routed") -> torch.Tensor:
    """Causal softmax attention computed for the ``selected`` (B, T) tokens of x (B, T, H) only.

    kv="routed": the selected tokens attend among themselves (keys/values of selected tokens only);
    kv="all": their queries attend to every token at or before them. RoPE at original positions.
    Returns (B, T, H), exactly 0 at unselected tokens.
    """
    b, t, hid = x.shape
    idx, valid = compact(selected)  # (B, T'), (B, T')
    tc = idx.shape[1]
    if tc == 0:
        return x.new_zeros(b, t, hid)
    gidx = idx[..., None].expand(-1, -1, hid)  # (B, T', H)
    xs = x.gather(1, gidx)  # (B, T', H)
    theta, d = attn.config.rope_theta, attn.head_dim
    cos_q, sin_q = _rope_rows(idx, d, theta, x.dtype)  # (B, 1, T', D)
    if kv == "routed":  # the compacted sequence keeps order; padding sits after every real token
        ys, _ = Attention.forward(attn, xs, cos_q, sin_q)  # (B, T', H) causal among selected tokens
    elif kv == "all":
        nh, nkv = attn.num_heads, attn.num_kv_heads
        q = apply_rope(attn.q_proj(xs).view(b, tc, nh, d).transpose(1, 2), cos_q, sin_q)  # (B, nh, T', D)
        cos_k, sin_k = rope_cos_sin(torch.arange(t, device=x.device), d, theta, x.dtype)  # (T, D)
        k = apply_rope(attn.k_proj(x).view(b, t, nkv, d).transpose(1, 2), cos_k, sin_k)  # (B, nkv, T, D)
        v = attn.v_proj(x).view(b, t, nkv, d).transpose(1, 2)  # (B, nkv, T, D)
        mask = torch.arange(t, device=x.device) <= idx[:, None, :, None]  # (B, 1, T', T) key pos <= query pos
        gqa = {"enable_gqa": True} if nkv != nh else {}
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)  # (B, nh, T', D)
        ys = attn.o_proj(y.transpose(1, 2).reshape(b, tc, nh * d))  # (B, T', H)
    else:
        raise ConfigError(f"kv={kv!r}: choose one of {SOFTMAX_KV}")
    return ys.new_zeros(b, t, hid).scatter(1, gidx, ys.masked_fill(~valid[..., None], 0.0))  # (B, T, H)


class RoutedMixer(nn.Module):
    """A GDN and a softmax-attention mixer; each token runs the one it is routed to (see module doc)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.softmax_kv = cfg.softmax_kv
        self.gdn = GatedDeltaNet(cfg.gdn_config())  # mask_mode="skip": only GDN-routed tokens exist for it
        self.attn = SoftmaxAttention(cfg.attention_config())

    def forward(self, x: torch.Tensor, to_softmax: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, H); to_softmax (B, T) bool; gate (B, T) multiplies each token's output (the
        straight-through gate; None = 1). Returns (B, T, H)."""
        n_soft, n_gdn = (int(v) for v in torch.stack((to_softmax.sum(), (~to_softmax).sum())).tolist())
        y = x.new_zeros(x.shape)  # (B, T, H)
        if n_gdn:
            xg = x
            if torch.is_autocast_enabled(x.device.type):  # GatedDeltaNet's skip path scatters its output
                xg = x.to(torch.get_autocast_dtype(x.device.type))  # into x's dtype: give it the autocast one
            y = self.gdn(xg, write_mask=~to_softmax)  # (B, T, H), 0 at softmax-routed tokens
        if n_soft:
            y = y + routed_softmax_attention(self.attn, x, to_softmax, self.softmax_kv)  # 0 at GDN tokens
        return y if gate is None else y * gate[..., None].to(y.dtype)


# ----------------------------------------------------------------------------------------------
# the model


class HybridBlock(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then x + SwiGLU(norm(x)); mixer by ``kind``."""

    def __init__(self, kind: str, cfg: HybridConfig):
        super().__init__()
        self.kind = kind
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if kind == "gdn":
            self.mixer = GatedDeltaNet(cfg.gdn_config())
        elif kind == "softmax":
            self.mixer = SoftmaxAttention(cfg.attention_config())
        else:
            self.mixer = RoutedMixer(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = DenseFFN(cfg.hidden_size, cfg.intermediate_size, cfg.init_std)

    def forward(self, x: torch.Tensor, to_softmax: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); to_softmax / gate (B, T) for a routed block."""
        h = self.mixer_norm(x)  # (B, T, H)
        x = x + (self.mixer(h, to_softmax, gate) if self.kind == "routed" else self.mixer(h))
        return x + self.ffn(self.ffn_norm(x))


@dataclass
class HybridOutput:
    logits: torch.Tensor  # (B, T, V) next-token logits
    aux_loss: torch.Tensor | None = None  # () balance_coef * mean balance loss; None without routed layers
    balance_loss: torch.Tensor | None = None  # (R,) unweighted balance loss per routed layer
    routing: RouteDecision | None = None  # with output_routing=True and routed layers


class HybridLM(nn.Module):
    """``HybridLM(HybridConfig.static() | HybridConfig.dynamic())(input_ids) -> HybridOutput``."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # weight (V, H)
        self.blocks = nn.ModuleList(HybridBlock(kind, cfg) for kind in cfg.layers)
        self.router = (ParallelRouter(cfg.hidden_size, len(cfg.routed_layers), cfg.rms_norm_eps)
                       if cfg.routed_layers else None)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # weight (V, H)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("router_step", torch.zeros((), dtype=torch.long))  # training forwards so far (tau)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 init as :class:`routelib.models.lm.LM`: matrices ~ normal(0, init_std) (router too),
        the residual projections (mixer o_proj, FFN w2) init_std / sqrt(2 L); norms 1."""
        cfg = self.config
        std = cfg.init_std
        resid_std = std / math.sqrt(2 * cfg.num_layers)  # projections writing into the residual stream
        for table in (self.embed, self.lm_head):  # the same tensor when tied
            nn.init.normal_(table.weight, 0.0, std)
        for blk in self.blocks:
            mixers = (blk.mixer.gdn, blk.mixer.attn) if blk.kind == "routed" else (blk.mixer,)
            for m in mixers:
                m.reset_parameters(out_std=resid_std)
            for lin, s in ((blk.ffn.w1, std), (blk.ffn.w3, std), (blk.ffn.w2, resid_std)):
                nn.init.normal_(lin.weight, 0.0, s)
            blk.mixer_norm.weight.fill_(1.0)
            blk.ffn_norm.weight.fill_(1.0)
        if self.router is not None:
            self.router.norm.weight.fill_(1.0)
            nn.init.normal_(self.router.proj.weight, 0.0, std)
        self.norm.weight.fill_(1.0)

    @property
    def temperature(self) -> float:
        """The Gumbel temperature the next training forward uses."""
        return self.config.temperature_at(int(self.router_step))

    def route(self, h: torch.Tensor, routes: torch.Tensor | None = None) -> RouteDecision:
        """Routing decisions for every routed layer from the stream h (B, T, H). ``routes`` (B, T, R)
        bool overrides the choice (True = softmax; no gate). Training (with grad): hard Gumbel-softmax
        at the scheduled temperature (advances ``router_step``); otherwise argmax."""
        logits = self.router(h)  # (B, T, R, 2)
        if routes is not None:
            b, t, r = logits.shape[:3]
            if routes.dtype != torch.bool or routes.shape != (b, t, r):
                raise ConfigError(f"routes must be a bool tensor (B, T, R) = ({b}, {t}, {r}); "
                                  f"got {routes.dtype} {tuple(routes.shape)}")
            return RouteDecision(logits, routes, None, None)
        if self.training and torch.is_grad_enabled():
            tau = self.temperature
            self.router_step += 1
            choice, gate = gumbel_straight_through(logits, tau)  # (B, T, R) each
            return RouteDecision(logits, choice == 1, gate, tau)
        return RouteDecision(logits, logits[..., 1] > logits[..., 0], None, None)  # ties -> GDN

    def forward(self, input_ids: torch.Tensor, *, routes: torch.Tensor | None = None,
                output_routing: bool = False) -> HybridOutput:
        """input_ids (B, T) int64. routes: optional (B, T, R) bool forced decisions (True = softmax),
        R = number of routed layers. output_routing: also return the RouteDecision."""
        cfg = self.config
        x = self.embed(input_ids)  # (B, T, H)
        decision = None
        slot = {layer: r for r, layer in enumerate(cfg.routed_layers)}
        for i, blk in enumerate(self.blocks):
            if blk.kind == "routed":
                r = slot[i]
                x = blk(x, decision.to_softmax[..., r], None if decision.gate is None else decision.gate[..., r])
            else:
                x = blk(x)
            if i == cfg.router_after:
                decision = self.route(x, routes)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if decision is None:
            return HybridOutput(logits)
        balance = decision.balance_loss()  # (R,)
        return HybridOutput(logits, cfg.balance_coef * balance.mean(), balance,
                            decision if output_routing else None)

    def num_parameters(self) -> int:
        """All parameters (a tied embedding counted once); routed layers hold both branches."""
        return sum(p.numel() for p in self.parameters())

    def active_parameters(self, softmax_fraction: list[float] | None = None) -> float:
        """Parameters one token uses on average: the total minus, in each routed layer r, the branch
        it skips -- the GDN mixer for a ``softmax_fraction[r]`` share of tokens, the softmax mixer for
        the rest. None = 0.5 per layer. Equals num_parameters() for a model without routed layers."""
        routed = [blk.mixer for blk in self.blocks if blk.kind == "routed"]
        fracs = [0.5] * len(routed) if softmax_fraction is None else list(softmax_fraction)
        if len(fracs) != len(routed) or not all(0.0 <= f <= 1.0 for f in fracs):
            raise ConfigError(f"softmax_fraction must hold {len(routed)} values in [0, 1], got {softmax_fraction!r}")
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        skipped = sum(f * count(m.gdn) + (1.0 - f) * count(m.attn) for m, f in zip(routed, fracs))
        return self.num_parameters() - skipped
