"""Llama decoder: one file, single device, no I/O and no distributed code.

RMSNorm before each sub-layer, rotary position embeddings (RoPE) on queries and keys, a SwiGLU MLP,
grouped-query attention (n_kv_head key/value heads shared by groups of query heads) and, unless
`tie_word_embeddings`, an output head of its own. The module tree mirrors Hugging Face
`LlamaForCausalLM` name for name (`model.embed_tokens`, `model.layers[i].self_attn.q_proj`,
`model.norm`, `lm_head`) and RoPE uses HF's half-split layout (`rotate_half`), so export is a copy.
Parallelism (DeepSpeed ZeRO) is applied to this module from outside, by the train loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.common import KVCache, causal_attention, check_positions, next_token_loss
from model.config import LlamaConfig

# Normal(0, INIT_STD) for every Linear/Embedding weight (HF's initializer_range).
INIT_STD = 0.02


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back (as HF's LlamaRMSNorm, also in bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # (B, T, C)
        return self.weight * x.to(dtype)


def rotary(config: LlamaConfig, start: int, T: int, device: torch.device, dtype: torch.dtype):
    """cos and sin (T, hs) of positions [start, start + T), in float32 then cast to `dtype` (as HF).

    Frequency i of a head rotates the pair (i, i + hs/2) by position * theta^(-2i/hs). Computed per
    call (hs/2 frequencies): no buffer, so nothing for ZeRO-3 to partition or a checkpoint to hold.
    """
    inv_freq = _inv_freq(config, device)  # (hs/2,)
    pos = torch.arange(start, start + T, device=device).float()  # (T,)
    freqs = torch.outer(pos, inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _inv_freq(config: LlamaConfig, device: torch.device) -> torch.Tensor:
    """theta^(-2i/hs) for i < hs/2; rescaled as Llama 3.1 does under rope_type llama3 (as HF's
    _compute_llama3_parameters, operation for operation, so the floats agree)."""
    hs = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.int64, device=device).float() / hs))
    if config.rope_type == "default":
        return inv_freq
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    old_context = config.rope_original_context
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`; short ones are kept as they are.
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    # In between, blend the two smoothly.
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, blended, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (..., hs/2)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, hs) by its positions' angles; cos/sin (T, hs) broadcast over B and heads."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.hs = config.n_head, config.n_kv_head, config.head_size
        self.dropout = config.dropout  # on attention weights only, as HF's attention_dropout
        C = config.n_embd
        self.q_proj = nn.Linear(C, self.n_head * self.hs, bias=False)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.hs, bias=False)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.hs, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hs, C, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, _ = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # keys are cached rotated
        y = causal_attention(q, k, v, kv_cache, layer, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.hs)  # (B, T, nh * hs)
        return self.o_proj(y)  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, I) -> (B, T, C)


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, layer)  # (B, T, C)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, C)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
                layers=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                norm=RMSNorm(config.n_embd, config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:  # one Parameter: optimisers and ZeRO see it once
            self.lm_head.weight = self.model.embed_tokens.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        # As GPT-2: the projections that write into the residual stream get 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layer))

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def new_kv_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty KVCache (n_kv_head heads per layer) on this model's device, in its dtype."""
        w = self.model.embed_tokens.weight
        return KVCache.allocate(self.config, batch_size, kv_heads=self.config.n_kv_head, capacity=capacity,
                                device=w.device, dtype=w.dtype)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and, with `targets`, the mean next-token loss; as `GPT.forward`.

        With kv_cache (inference only) idx continues the cached sequences at position kv_cache.length.
        """
        B, T = idx.size()
        start = check_positions(T, B, self.config.block_size, kv_cache)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        cos, sin = rotary(self.config, start, T, idx.device, x.dtype)  # 2 x (T, hs)
        # Checkpoint only when a backward will follow; under no_grad it would just cost time.
        use_ckpt = (self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
                    and kv_cache is None)
        for i, block in enumerate(self.model.layers):
            if use_ckpt:
                # Non-reentrant: works with ZeRO-3's parameter hooks (see model/gpt.py).
                x = checkpoint(block, x, cos, sin, use_reentrant=False)  # (B, T, C)
            else:
                x = block(x, cos, sin, kv_cache, i)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.length = start + T  # every layer has written [start, start + T)
        logits = self.lm_head(self.model.norm(x))  # (B, T, V)
        loss = next_token_loss(logits, targets) if targets is not None else None
        return logits, loss


def count_parameters(config: LlamaConfig) -> int:
    """Exact parameter count of `Llama(config)` by formula, without building it (a tied head once)."""
    C, hs, V = config.n_embd, config.head_size, config.vocab_size
    attn = 2 * C * config.n_head * hs + 2 * C * config.n_kv_head * hs  # q, o + k, v
    mlp = 3 * C * config.intermediate_size  # gate, up, down
    block = attn + mlp + 2 * C  # + two RMSNorm weights
    head = 0 if config.tie_word_embeddings else V * C
    return V * C + config.n_layer * block + C + head  # embeddings, blocks, final norm, head


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token, as `model.gpt.flops_per_token`: 6 * N + 12 * n_layer * n_head * hs * T,
    where N leaves out the embedding lookup (free) but keeps the head's matmul (tied or not)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    lookup = 0 if config.tie_word_embeddings else config.vocab_size * config.n_embd
    n = count_parameters(config) - lookup
    return float(6 * n + 12 * config.n_layer * config.n_head * config.head_size * seq_len)


def tied_weights(config: LlamaConfig) -> dict[str, str]:
    """{"lm_head.weight": "model.embed_tokens.weight"} when the head is tied; none otherwise."""
    return {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}


MODEL = Llama  # what model.registry builds
