"""GPT-2 decoder: one file, single device, no I/O and no distributed code.

The module tree mirrors Hugging Face `GPT2LMHeadModel` name for name (`transformer.wte`,
`transformer.h[i].attn.c_attn`, `lm_head`, ...) so that export is a rename-free copy; the only
difference is that we use `nn.Linear` where HF uses `Conv1D`, so export transposes those weights.
Parallelism (DeepSpeed ZeRO) is applied to this module from outside, by the train loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from model.common import IGNORE_INDEX, KVCache, causal_attention, check_positions, next_token_loss
from model.config import GPTConfig
from model.sampling import generate

__all__ = ["GPT", "GPTConfig", "IGNORE_INDEX", "KVCache", "count_parameters", "flops_per_token", "generate",
           "tied_weights"]

# Normal(0, INIT_STD) for every Linear/Embedding weight, as GPT-2 does.
INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # q, k, v for all heads in one matmul (HF's fused c_attn: output is [q | k | v]).
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # Attention-weight dropout happens inside scaled_dot_product_attention (dropout_p).
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = causal_attention(q, k, v, kv_cache, layer, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2's GELU is the tanh approximation (HF "gelu_new"); the exact erf GELU would make an
        # exported model drift slightly from ours.
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned absolute positions
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (as GPT-2): the output projection is the token embedding matrix. One
        # Parameter, so optimisers, ZeRO partitioning and num_parameters() see it once.
        self.lm_head.weight = self.transformer.wte.weight

        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer):
        # each block adds two of them, so without it the residual variance grows with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.c_proj.weight") or name.endswith("mlp.c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # LayerNorm keeps PyTorch's default (weight 1, bias 0).
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)

    def num_parameters(self) -> int:
        """Unique parameters; the tied lm_head/wte matrix is counted once."""
        # parameters() already de-duplicates shared Parameters.
        return sum(p.numel() for p in self.parameters())

    def new_kv_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty KVCache for this model, on its device and in its dtype."""
        w = self.transformer.wte.weight
        return KVCache.allocate(self.config, batch_size, capacity=capacity, device=w.device, dtype=w.dtype)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position and, with `targets`, the mean next-token cross-entropy.

        idx: (B, T) token ids. targets: (B, T) ids of the token that follows each position (the
        caller shifts), or IGNORE_INDEX where a position must not count (prompt, padding). The loss
        is the mean over positions whose target is not IGNORE_INDEX; if every target in the batch
        is IGNORE_INDEX it is NaN (0/0), so callers must not feed a fully masked batch.

        kv_cache (inference only): idx continues the sequences already in the cache, so its
        positions start at kv_cache.length; the new keys/values are appended and the length
        advances by T. Feeding a prompt and then one token at a time gives the logits of one
        no-cache forward over the whole sequence.
        """
        B, T = idx.size()
        start = check_positions(T, B, self.config.block_size, kv_cache)
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C), broadcast over the batch
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)

        # Checkpoint only when a backward will follow; under no_grad it would just cost time.
        use_ckpt = (
            self.config.activation_checkpointing
            and self.training
            and torch.is_grad_enabled()
            and kv_cache is None
        )
        for i, block in enumerate(self.transformer.h):
            if use_ckpt:
                # Non-reentrant: works with inputs that don't require grad and with ZeRO-3's
                # parameter hooks; the RNG state is replayed, so dropout masks match.
                x = checkpoint(block, x, use_reentrant=False)  # (B, T, C)
            elif kv_cache is not None:
                x = block(x, kv_cache, i)  # (B, T, C)
            else:
                x = block(x)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.length = start + T  # every layer has written [start, start + T)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)

        loss = None
        if targets is not None:
            loss = next_token_loss(logits, targets)
        return logits, loss


def count_parameters(config: GPTConfig) -> int:
    """Exact parameter count of `GPT(config)` by formula, without building it (tied head counted once)."""
    C, b = config.n_embd, int(config.bias)
    layer_norm = C + b * C  # weight (+ bias)
    attn = (C * 3 * C + b * 3 * C) + (C * C + b * C)  # c_attn + c_proj
    mlp = (C * 4 * C + b * 4 * C) + (4 * C * C + b * C)  # c_fc + c_proj
    block = 2 * layer_norm + attn + mlp
    embeddings = config.vocab_size * C + config.block_size * C  # wte (= lm_head, tied) + wpe
    return embeddings + config.n_layer * block + layer_norm  # ... + ln_f


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token, PaLM/Chinchilla accounting.

    6 * N + 12 * n_layer * n_embd * seq_len, where N = count_parameters(config) minus the position
    embeddings (block_size * n_embd). N keeps the token embedding because it is tied to lm_head,
    whose matmul costs 2 * vocab_size * n_embd per token forward; the position lookup costs nothing.
    6 = 2 (multiply-add) x 3 (forward, plus backward at twice the forward). The second term is the
    attention scores and weighted sum (QK^T and AV), 2 * 2 * n_embd * seq_len per layer forward,
    times 3, with no discount for the causal mask. LayerNorm, softmax and GELU are left out.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    n = count_parameters(config) - config.block_size * config.n_embd
    return float(6 * n + 12 * config.n_layer * config.n_embd * seq_len)


def tied_weights(config: GPTConfig) -> dict[str, str]:
    """lm_head is the token embedding matrix (GPT-2 ties them)."""
    return {"lm_head.weight": "transformer.wte.weight"}


MODEL = GPT  # what model.registry builds
