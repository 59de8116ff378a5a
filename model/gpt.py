"""GPT-2 decoder: one file, single device, no I/O and no distributed code.

The module tree mirrors Hugging Face `GPT2LMHeadModel` name for name (`transformer.wte`,
`transformer.h[i].attn.c_attn`, `lm_head`, ...) so that export is a rename-free copy; the only
difference is that we use `nn.Linear` where HF uses `Conv1D`, so export transposes those weights.
Parallelism (DeepSpeed ZeRO) is applied to this module from outside, by the train loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Targets equal to this are left out of the loss (the default of F.cross_entropy). Fine-tuning
# masks the prompt this way; padding with EOT is masked the same way.
IGNORE_INDEX = -100

# Normal(0, INIT_STD) for every Linear/Embedding weight, as GPT-2 does.
INIT_STD = 0.02


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # tokens in the vocabulary; GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    block_size: int = 1024  # max sequence length: the number of learned position embeddings
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block; must divide n_embd
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches; 0 for pretraining
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 (HF export needs True)
    activation_checkpointing: bool = False  # recompute each block in backward (saves memory, costs ~1/3 more compute)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            # bool is an int subclass; True as a size is always a config mistake.
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name}={value!r} is invalid: set model.{name} to a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                f"set model.n_head to a divisor of n_embd (head size = n_embd / n_head)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout={self.dropout!r} is out of range: set model.dropout in [0, 1)")


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding (inference only).

    Allocated once for block_size positions; `GPT.forward(idx, kv_cache=cache)` writes the new
    positions at [length, length + T) in every layer, attends over [0, length + T), and advances
    `length` by T. The cache is not a module: it holds no parameters and is never trained.
    """

    k: list[torch.Tensor] = field(repr=False)  # per layer (B, nh, block_size, hs)
    v: list[torch.Tensor] = field(repr=False)  # per layer (B, nh, block_size, hs)
    length: int = 0  # positions filled so far; the next token's position

    @classmethod
    def allocate(
        cls,
        config: GPTConfig,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """An empty cache for `batch_size` sequences of up to config.block_size tokens."""
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, config.block_size, hs)  # (B, nh, block_size, hs)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
        )

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    @property
    def capacity(self) -> int:
        """Positions the cache can hold (the model's block_size)."""
        return self.k[0].size(2)

    def reset(self) -> None:
        """Forget every position; the buffers are reused, stale values are never read."""
        self.length = 0


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
        if kv_cache is None:
            # softmax(QK^T / sqrt(hs)) V with a causal mask; dispatches to flash/memory-efficient
            # kernels where available, so the (T, T) attention matrix is never materialised on GPU.
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )  # (B, nh, T, hs)
        else:
            y = self._attend_with_cache(q, k, v, kv_cache, layer)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)

    @staticmethod
    def _attend_with_cache(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, layer: int
    ) -> torch.Tensor:
        """Store this step's k/v at [L, L + T) and attend q over every key in [0, L + T).

        L = kv_cache.length (GPT.forward advances it after the last layer). No dropout: the cache
        is an inference path.
        """
        T = q.size(2)
        L = kv_cache.length
        kv_cache.k[layer][:, :, L : L + T] = k
        kv_cache.v[layer][:, :, L : L + T] = v
        keys = kv_cache.k[layer][:, :, : L + T]  # (B, nh, L + T, hs)
        values = kv_cache.v[layer][:, :, : L + T]  # (B, nh, L + T, hs)
        if L == 0:
            # Prefill of an empty cache: exactly the training path's causal attention.
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        if T == 1:
            # One new token may see every cached position and itself: no mask.
            return F.scaled_dot_product_attention(q, keys, values)
        # T new tokens after L cached ones: query t sits at position L + t and sees keys j <= L + t.
        # (is_causal would align the mask top-left, i.e. as if the queries started at position 0.)
        mask = torch.ones(T, L + T, dtype=torch.bool, device=q.device).tril(diagonal=L)  # (T, L + T)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


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

    def new_kv_cache(self, batch_size: int) -> KVCache:
        """An empty KVCache for this model, on its device and in its dtype."""
        w = self.transformer.wte.weight
        return KVCache.allocate(self.config, batch_size, device=w.device, dtype=w.dtype)

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
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.block_size:
            if kv_cache is None:
                raise ValueError(
                    f"sequence length {T} exceeds block_size={self.config.block_size}: "
                    f"shorten the sequences or set model.block_size >= {T}"
                )
            raise ValueError(
                f"KV cache holds {start} positions and {T} more exceed block_size={self.config.block_size}: "
                f"reset the cache (kv_cache.reset()) and refeed at most block_size tokens"
            )
        if kv_cache is not None and kv_cache.batch_size != B:
            raise ValueError(f"KV cache batch size {kv_cache.batch_size} != input batch size {B}: allocate a new cache")
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
            # Cross-entropy in float32 even when the model runs in bf16: log-softmax over ~50k
            # classes in bf16 loses enough precision to show up in the loss curve.
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)),  # (B*T, V)
                targets.reshape(-1),  # (B*T,)
                ignore_index=IGNORE_INDEX,
            )
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


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Append `max_new_tokens` sampled tokens to idx (B, T) and return (B, T + max_new_tokens).

    temperature 0 picks the most likely token (greedy); otherwise logits / temperature are sampled,
    keeping only the top_k most likely tokens when top_k is set; pass a seeded `generator` for
    reproducible samples. The model is put in eval mode for the call (dropout off) and its previous
    mode is restored afterwards.

    The model only knows block_size positions, so it always conditions on the last block_size
    tokens. With use_cache the prompt (cropped to block_size) is prefilled once into a KVCache and
    then each new token costs one single-position forward. Positions are absolute (learned wpe), so
    cached keys cannot slide: once the window is full, every further step recomputes the last
    block_size tokens without the cache, exactly as use_cache=False does. This keeps the output
    independent of use_cache (same tokens, same generator draws) at the price of one full-window
    forward per token past the window; resetting the cache to a shorter context would be faster
    but would condition on fewer tokens than the no-cache path.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None for no top-k filtering)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    block_size = model.config.block_size
    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(idx.size(0)) if use_cache and max_new_tokens > 0 else None
        for step in range(max_new_tokens):
            if cache is not None and step == 0:
                logits, _ = model(idx[:, -block_size:], kv_cache=cache)  # prefill: (B, <=block_size, V)
            elif cache is not None and cache.length < block_size:
                logits, _ = model(idx[:, -1:], kv_cache=cache)  # decode: (B, 1, V)
            else:
                # No cache, or the window is full: rerun the most recent block_size tokens.
                cache = None
                logits, _ = model(idx[:, -block_size:])  # (B, <=block_size, V)
            idx_next = _sample(logits[:, -1, :], temperature, top_k, generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
    finally:
        model.train(was_training)
    return idx


def _sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token ids (B, 1) from the last position's logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits.float() / temperature  # (B, V); sample in fp32 even for a bf16 model
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k)
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
