"""Decoder-only language model in the Mixtral architecture, with sparse-MoE or dense SwiGLU FFNs.

References:
1) Jiang et al. 2024, "Mixtral of Experts" -- the architecture: pre-norm decoder blocks whose FFN is
   a top-2-of-8 SwiGLU MoE layer; everything else as Mistral 7B / Llama.
2) Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding" -- RoPE, here in
   the "rotate half" layout of Llama/Mixtral checkpoints (the two halves of a head, not even/odd
   pairs, are rotated together), so exported weights need no permutation.
3) Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
   Checkpoints" -- grouped-query attention: num_heads // num_kv_heads query heads share a K/V head.
4) Zhang & Sennrich 2019, "Root Mean Square Layer Normalization" -- RMSNorm.
5) Radford et al. 2019 (GPT-2) -- normal(0, 0.02) init with residual projections scaled by
   1/sqrt(2 * num_layers); Kaplan et al. 2020 -- the analytic FLOPs per token.

One block (x: (B, T, H)):

    x = x + Attention(RMSNorm(x))     # GQA, RoPE, causal F.scaled_dot_product_attention
    x = x + FFN(RMSNorm(x))           # MoEFFN (routelib.models.moe) or DenseFFN

then a final RMSNorm and the LM head (optionally tied to the token embedding). The same code builds
the MoE model (``num_experts >= 1``) and its dense baselines (``num_experts = 0``; see
``LMConfig.dense_matching``), so the two differ only in the FFN.

Forward: ``model(input_ids)`` -> :class:`LMOutput` with ``.logits`` (B, T, V) and ``.aux_loss``, the
sum over layers of each MoE layer's *already weighted* router losses (``aux_loss_coef`` * load
balancing + ``z_loss_coef`` * z-loss; None for dense models). The model deliberately has no
``router_aux_loss_coef`` attribute, so ``routelib.train``'s default loss adds ``aux_loss`` once with
weight 1.0. ``output_router_logits=True`` also returns every layer's
:class:`~routelib.models.moe.RouterOutput` (logits, top-k indices, gates) in ``.router``.

Decoding: ``use_cache=True`` returns ``past_key_values``, one ``(k, v)`` pair per layer, each
(B, num_kv_heads, T_past, head_dim) after RoPE; feeding them back continues at position T_past.
:meth:`LM.generate` decodes greedily or by sampling with that cache. No padding masks: every row of
a batch has the same length (left-pad-free prompts).

Weights rename one-to-one onto Hugging Face transformers' ``MixtralForCausalLM`` (v5 layout), see
:meth:`LM.hf_state_dict` and :mod:`routelib.models.export`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from routelib.errors import ConfigError
from routelib.models.moe import DenseFFN, MoEConfig, MoEFFN, RouterOutput, param_counts

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v): (B, num_kv_heads, T_past, D)


@dataclass
class LMConfig:
    vocab_size: int = 8192  # V: tokens in the vocabulary (bpe8k: 8192; Mixtral: 32000)
    hidden_size: int = 256  # H (d_model): width of the residual stream (Mixtral-8x7B: 4096)
    num_layers: int = 4  # L: decoder blocks (Mixtral-8x7B: 32)
    num_heads: int = 4  # query heads per attention layer (Mixtral-8x7B: 32)
    num_kv_heads: int = 2  # key/value heads, each shared by num_heads // num_kv_heads query heads
    # (GQA); = num_heads is multi-head attention, 1 is multi-query attention (Mixtral-8x7B: 8)
    head_dim: int | None = None  # D: width of one head; None: hidden_size // num_heads. Must be even (RoPE)
    intermediate_size: int = 512  # I: inner width of each SwiGLU expert, or of the dense FFN
    num_experts: int = 8  # E: experts per MoE layer; 0 = dense SwiGLU FFN of width I (the baseline)
    top_k: int = 2  # k: experts per token (Mixtral: 2); ignored when num_experts = 0
    capacity_factor: float | None = None  # MoE seats per expert; None = dropless (as Mixtral)
    normalize_topk: bool = True  # renormalise the k gates to sum to 1 (Mixtral; needed for export)
    router_jitter: float = 0.0  # training only: router input *= U(1-eps, 1+eps); 0 = off
    aux_loss_coef: float = 0.01  # per-layer weight of the load-balancing loss (1.0 when balanced)
    z_loss_coef: float = 0.0  # per-layer weight of the router z-loss (ST-MoE: 1e-3); 0 = off
    moe_impl: Literal["naive", "padded", "grouped"] = "grouped"  # MoE expert computation, same results
    max_seq_len: int = 2048  # context length the model is meant for (HF max_position_embeddings);
    # RoPE has no table, so longer inputs run, but positions past training are extrapolation
    rope_theta: float = 10000.0  # RoPE base (Mixtral-8x7B: 1e6)
    rms_norm_eps: float = 1e-5  # epsilon inside every RMSNorm (Mixtral: 1e-5)
    tie_embeddings: bool = False  # True: the LM head reuses the token embedding (HF tie_word_embeddings)
    init_std: float = 0.02  # std of the normal init; residual projections get init_std / sqrt(2 L)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_seq_len"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("num_experts", self.num_experts, minimum=0)
        if self.head_dim is not None:
            _check_int("head_dim", self.head_dim, minimum=1)
        elif self.hidden_size % self.num_heads:
            raise ConfigError(
                f"LMConfig.hidden_size={self.hidden_size} is not divisible by LMConfig.num_heads="
                f"{self.num_heads}: pick a head count that divides it, or set head_dim explicitly"
            )
        if self.head_size % 2:
            raise ConfigError(f"LMConfig.head_dim={self.head_size} must be even: RoPE rotates pairs of dims")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"LMConfig.num_kv_heads={self.num_kv_heads} does not divide LMConfig.num_heads="
                f"{self.num_heads}: every K/V head must serve the same number of query heads (GQA)"
            )
        if self.is_moe:
            _check_int("top_k", self.top_k, minimum=1)
            if self.top_k > self.num_experts:
                raise ConfigError(
                    f"LMConfig.top_k={self.top_k} > LMConfig.num_experts={self.num_experts}: "
                    f"a token cannot choose more experts than exist"
                )
            try:
                self.moe_config()
            except ConfigError as err:  # same field names, except impl -> moe_impl
                msg = str(err).replace("MoEConfig.impl", "LMConfig.moe_impl").replace("MoEConfig.", "LMConfig.")
                raise ConfigError(msg) from None
        for name in ("rope_theta", "rms_norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"LMConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.init_std >= 0:
            raise ConfigError(f"LMConfig.init_std must be >= 0, got {self.init_std!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"LMConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")

    @property
    def is_moe(self) -> bool:
        """True when the FFNs are MoE layers (num_experts >= 1), False for the dense baseline."""
        return self.num_experts > 0

    @property
    def head_size(self) -> int:
        """D: head_dim, or hidden_size // num_heads when head_dim is None."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def moe_config(self) -> MoEConfig:
        """The MoEConfig of every FFN (only meaningful when is_moe)."""
        return MoEConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_experts=self.num_experts, top_k=self.top_k, capacity_factor=self.capacity_factor,
            normalize_topk=self.normalize_topk, router_jitter=self.router_jitter,
            aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef, impl=self.moe_impl,
            init_std=self.init_std,
        )

    def dense_matching(self, match: Literal["total", "active"] = "total") -> LMConfig:
        """The dense baseline of this MoE config: same everything, FFN width E*I ("total": equal
        parameters) or k*I ("active": equal FLOPs per token, the router aside)."""
        if not self.is_moe:
            raise ConfigError("dense_matching needs an MoE config (num_experts >= 1)")
        if match not in ("total", "active"):
            raise ConfigError(f"match={match!r}: choose 'total' or 'active'")
        width = self.num_experts if match == "total" else self.top_k
        return replace(self, num_experts=0, intermediate_size=width * self.intermediate_size)


def _check_int(name: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"LMConfig.{name} must be an int >= {minimum}, got {value!r}")


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T, V) next-token logits
    aux_loss: torch.Tensor | None = None  # () sum over MoE layers of weighted aux + z losses; None if dense
    router: list[RouterOutput] | None = None  # per layer, with output_router_logits=True and MoE
    past_key_values: KVCache | None = None  # per layer (k, v), with use_cache=True

    @property
    def router_logits(self) -> tuple[torch.Tensor, ...] | None:
        """Per-layer router logits (B*T, E), as Hugging Face's ``router_logits``."""
        return None if self.router is None else tuple(r.logits for r in self.router)


# ----------------------------------------------------------------------------------------------
# layers


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in fp32 and cast back before the weight
    (the Llama/Mixtral order, so bf16 results match Hugging Face's)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (H,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # (..., H)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin (T, D) for integer positions (T,), computed in fp32 on the fly (no table, so no
    precision loss when the model is cast to bf16) and cast to ``dtype``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim))  # (D/2,)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D): frequency j drives dims j and j + D/2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x[..., j], x[..., j + D/2]) by angle pos * inv_freq[j]. x: (B, heads, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, h, T, D/2) each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE, through F.scaled_dot_product_attention."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        h, d = cfg.hidden_size, cfg.head_size
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)  # weight (nh*D, H)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)  # weight (nkv*D, H)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)  # weight (nkv*D, H)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)  # weight (H, nh*D), residual projection

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x: (B, T, H); cos, sin: (T, D) for positions T_past .. T_past+T-1. Returns (y, (k, v))."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, D)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, D)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # (B, nkv, S, D), S = T_past + T
            v = torch.cat((past[1], v), dim=2)  # (B, nkv, S, D)
        s = k.shape[2]
        gqa = {"enable_gqa": True} if self.num_kv_heads != self.num_heads else {}
        if s == t:  # no cache: plain causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)  # (B, nh, T, D)
        elif t == 1:  # one new token sees the whole cache
            y = F.scaled_dot_product_attention(q, k, v, **gqa)  # (B, nh, 1, D)
        else:  # a chunk after a cache: query i sees keys <= T_past + i (bottom-right causal)
            mask = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=s - t)  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)  # (B, nh, T, D)
        y = y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # (B, T, nh*D)
        return self.o_proj(y), (k, v)  # (B, T, H)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # HF input_layernorm
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # HF post_attention_layernorm
        if cfg.is_moe:
            self.ffn = MoEFFN(cfg.moe_config())
        else:
            self.ffn = DenseFFN(cfg.hidden_size, cfg.intermediate_size, cfg.init_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past=None):
        """x: (B, T, H) -> (x, (k, v), RouterOutput or None)."""
        a, present = self.attn(self.attn_norm(x), cos, sin, past)
        x = x + a  # (B, T, H)
        h = self.ffn_norm(x)  # (B, T, H)
        if isinstance(self.ffn, MoEFFN):
            f, router = self.ffn(h)  # (B, T, H), RouterOutput over the B*T tokens
        else:
            f, router = self.ffn(h), None
        return x + f, present, router


# ----------------------------------------------------------------------------------------------
# the model


class LM(nn.Module):
    """Mixtral-architecture decoder-only LM: ``LM(LMConfig(...))(input_ids) -> LMOutput``."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # weight (V, H)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # weight (V, H)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 init: every matrix ~ normal(0, init_std) -- embedding, Q/K/V, router, the expert (or
        dense) gate/up projections, an untied LM head -- except the two projections that write into
        the residual stream (attention o_proj, FFN down projection w2), which get init_std / sqrt(2L)
        so the residual stream's variance does not grow with depth. RMSNorm weights are 1."""
        cfg = self.config
        std, resid_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
        nn.init.normal_(self.embed.weight, 0.0, std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, std)
        for blk in self.blocks:
            for lin in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj):
                nn.init.normal_(lin.weight, 0.0, std)
            nn.init.normal_(blk.attn.o_proj.weight, 0.0, resid_std)
            if isinstance(blk.ffn, MoEFFN):
                blk.ffn.reset_parameters()  # gate, w13, w2 ~ normal(0, init_std)
                nn.init.normal_(blk.ffn.w2, 0.0, resid_std)
            else:
                nn.init.normal_(blk.ffn.w1.weight, 0.0, std)
                nn.init.normal_(blk.ffn.w3.weight, 0.0, std)
                nn.init.normal_(blk.ffn.w2.weight, 0.0, resid_std)
            for norm in (blk.attn_norm, blk.ffn_norm):
                norm.weight.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def forward(self, input_ids: torch.Tensor, *, past_key_values: KVCache | None = None,
                use_cache: bool = False, output_router_logits: bool = False) -> LMOutput:
        """input_ids: (B, T) int64. With ``past_key_values`` (from a previous call with
        ``use_cache=True``) the tokens continue at position T_past; the cache is not modified."""
        cfg = self.config
        b, t = input_ids.shape
        if past_key_values is not None and len(past_key_values) != cfg.num_layers:
            raise ConfigError(f"past_key_values has {len(past_key_values)} layers, the model {cfg.num_layers}")
        t_past = 0 if not past_key_values else past_key_values[0][0].shape[2]
        x = self.embed(input_ids)  # (B, T, H)
        positions = torch.arange(t_past, t_past + t, device=input_ids.device)  # (T,)
        cos, sin = rope_cos_sin(positions, cfg.head_size, cfg.rope_theta, x.dtype)  # (T, D) each
        presents, routers = [], []
        for i, blk in enumerate(self.blocks):
            x, present, router = blk(x, cos, sin, past_key_values[i] if past_key_values else None)
            presents.append(present)
            if router is not None:
                routers.append(router)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        aux = torch.stack([r.loss for r in routers]).sum() if routers else None  # () already weighted
        return LMOutput(
            logits=logits,
            aux_loss=aux,
            router=routers if (output_router_logits and routers) else None,
            past_key_values=presents if use_cache else None,
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, greedy: bool = True,
                 temperature: float = 1.0, sample_top_k: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` tokens to input_ids (B, T) with the KV cache: one prefill
        forward, then one single-token forward per new token. ``greedy``: argmax (as Hugging Face's
        ``do_sample=False``); else sample from softmax(logits / temperature), restricted to the
        ``sample_top_k`` most likely tokens if given. With ``eos_token_id``, a row that produced it gets
        ``pad_token_id`` (default: eos) afterwards, and decoding stops once every row has.
        Returns (B, T + new) int64. Runs in the model's current mode (call ``.eval()`` first)."""
        if max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not greedy and not temperature > 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {temperature}")
        tokens = input_ids
        if max_new_tokens == 0:
            return tokens
        pad = eos_token_id if pad_token_id is None else pad_token_id
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # (B,)
        out = self(input_ids, use_cache=True)
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float()  # (B, V)
            if greedy:
                nxt = logits.argmax(dim=-1)  # (B,)
            else:
                logits = logits / temperature
                if sample_top_k is not None and sample_top_k < logits.shape[-1]:
                    kth = torch.topk(logits, sample_top_k, dim=-1).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)  # (B,)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                finished |= nxt == eos_token_id
            tokens = torch.cat((tokens, nxt[:, None]), dim=1)  # (B, T + step + 1)
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                break
            out = self(nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
        return tokens

    # ---- sizes and costs ------------------------------------------------------------------------

    def num_parameters(self, active: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters (a tied embedding counted once). ``active``: those one token uses -- each MoE
        layer counts k experts (+ router) instead of E (``moe.param_counts``). ``exclude_embeddings``:
        leave out the token embedding and the LM head (Kaplan et al.'s non-embedding N)."""
        skip = {id(self.embed.weight), id(self.lm_head.weight)} if exclude_embeddings else set()
        n = sum(p.numel() for p in self.parameters() if id(p) not in skip)
        if active and self.config.is_moe:
            total, act = param_counts(self.config.moe_config())
            n -= self.config.num_layers * (total - act)
        return n

    def flops_per_token(self, seq_len: int, include_lm_head: bool = True) -> int:
        """Analytic forward FLOPs per token at context length T = seq_len (backward ~ 2x this):

            2 * N_active_nonembedding + 2 * L * T * d_attn  [+ 2 * V * H for the LM head]

        2 FLOPs per multiply-add of every active weight outside the embeddings (attention
        projections, k experts + router per MoE layer, norms counted though they are not matmuls);
        attention scores QK^T and the weighted sum AV cost 2 * t * d_attn each for a token that sees
        t keys, which averaged over a causal window of T is 2 * T * d_attn per layer (Kaplan et al.
        2020), d_attn = num_heads * head_dim. The embedding lookup is free; the LM head is a real
        (V x H) matmul, included unless ``include_lm_head=False`` (Kaplan's convention)."""
        cfg = self.config
        n = 2 * self.num_parameters(active=True, exclude_embeddings=True)
        n += 2 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_size
        if include_lm_head:
            n += 2 * cfg.vocab_size * cfg.hidden_size
        return n

    # ---- Hugging Face Mixtral names ------------------------------------------------------------

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """All weights under transformers v5 ``MixtralForCausalLM`` names (detached; shared with
        the model where the layout is the same). A dense FFN becomes a 1-expert top-1 MoE block:
        router weight (1, H) of zeros (softmax over one expert is 1.0 whatever the logit),
        gate_up_proj = [w1; w3] (1, 2I, H), down_proj = w2 (1, H, I). Tied models omit lm_head."""
        sd = {"model.embed_tokens.weight": self.embed.weight, "model.norm.weight": self.norm.weight}
        for i, blk in enumerate(self.blocks):
            p = f"model.layers.{i}."
            sd[p + "input_layernorm.weight"] = blk.attn_norm.weight
            sd[p + "post_attention_layernorm.weight"] = blk.ffn_norm.weight
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                sd[p + f"self_attn.{name}.weight"] = getattr(blk.attn, name).weight
            if isinstance(blk.ffn, MoEFFN):
                sd.update(blk.ffn.hf_state_dict(p + "mlp."))
            else:
                w1, w3, w2 = blk.ffn.w1.weight, blk.ffn.w3.weight, blk.ffn.w2.weight
                sd[p + "mlp.gate.weight"] = w1.new_zeros(1, w1.shape[1])  # (1, H)
                sd[p + "mlp.experts.gate_up_proj"] = torch.cat((w1, w3), dim=0)[None]  # (1, 2I, H)
                sd[p + "mlp.experts.down_proj"] = w2[None]  # (1, H, I)
        if not self.config.tie_embeddings:
            sd["lm_head.weight"] = self.lm_head.weight
        return {k: v.detach() for k, v in sd.items()}

    @torch.no_grad()
    def load_hf_state_dict(self, state: dict[str, torch.Tensor]):
        """Inverse of :meth:`hf_state_dict`: copy Mixtral-named tensors (v5 fused experts) into the
        model, casting to its dtype. Missing or wrongly shaped tensors raise ConfigError."""
        def get(name, shape):
            if name not in state:
                raise ConfigError(f"checkpoint lacks {name!r}")
            t = state[name]
            if tuple(t.shape) != tuple(shape):
                raise ConfigError(f"checkpoint {name!r} has shape {tuple(t.shape)}, the model needs {tuple(shape)}")
            return t

        def put(param, name):
            param.copy_(get(name, param.shape))

        put(self.embed.weight, "model.embed_tokens.weight")
        put(self.norm.weight, "model.norm.weight")
        for i, blk in enumerate(self.blocks):
            p = f"model.layers.{i}."
            put(blk.attn_norm.weight, p + "input_layernorm.weight")
            put(blk.ffn_norm.weight, p + "post_attention_layernorm.weight")
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                put(getattr(blk.attn, name).weight, p + f"self_attn.{name}.weight")
            if isinstance(blk.ffn, MoEFFN):
                for name, param in blk.ffn.hf_state_dict(p + "mlp.").items():
                    put(param, name)
            else:
                i_size, h = blk.ffn.w1.weight.shape
                gate_up = get(p + "mlp.experts.gate_up_proj", (1, 2 * i_size, h))[0]  # (2I, H)
                blk.ffn.w1.weight.copy_(gate_up[:i_size])
                blk.ffn.w3.weight.copy_(gate_up[i_size:])
                blk.ffn.w2.weight.copy_(get(p + "mlp.experts.down_proj", (1, h, i_size))[0])
        if not self.config.tie_embeddings:
            put(self.lm_head.weight, "lm_head.weight")

