"""Pieces every decoder family shares: the loss, the KV cache and causal attention over it.

Single device, no I/O. Shapes: B batch, T new positions, nh query heads, nkv key/value heads
(nkv divides nh; nkv == nh without grouped-query attention), hs head size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Targets equal to this are left out of the loss (the default of F.cross_entropy). Fine-tuning
# masks the prompt this way; padding with EOT is masked the same way.
IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not IGNORE_INDEX.

    In float32 even when the model runs in bf16: log-softmax over ~50k classes in bf16 loses enough
    precision to show up in the loss curve.
    """
    return F.cross_entropy(
        logits.float().view(-1, logits.size(-1)),  # (B*T, V)
        targets.reshape(-1),  # (B*T,)
        ignore_index=IGNORE_INDEX,
    )


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding (inference only).

    Allocated once for up to block_size positions; `model(idx, kv_cache=cache)` writes the new positions
    at [length, length + T) in every layer, attends over [0, length + T), and advances `length` by T.
    The cache is not a module: it holds no parameters and is never trained.
    """

    k: list[torch.Tensor] = field(repr=False)  # per layer (B, nkv, capacity, hs)
    v: list[torch.Tensor] = field(repr=False)  # per layer (B, nkv, capacity, hs)
    length: int = 0  # positions filled so far; the next token's position

    @classmethod
    def allocate(
        cls,
        config,
        batch_size: int,
        *,
        kv_heads: int | None = None,
        capacity: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `capacity` tokens (default and at most
        config.block_size), holding `kv_heads` heads per layer (default config.n_head)."""
        heads = kv_heads or config.n_head
        positions = min(capacity or config.block_size, config.block_size)
        shape = (batch_size, heads, positions, config.n_embd // config.n_head)  # (B, nkv, capacity, hs)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
        )

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    @property
    def capacity(self) -> int:
        """Positions the cache can hold (at most the model's block_size)."""
        return self.k[0].size(2)

    def reset(self) -> None:
        """Forget every position; the buffers are reused, stale values are never read."""
        self.length = 0


def check_positions(T: int, B: int, block_size: int, kv_cache: KVCache | None) -> int:
    """The position of the first of T new tokens; ValueError if they do not fit block_size or the cache."""
    start = 0 if kv_cache is None else kv_cache.length
    if kv_cache is None and T > block_size:
        raise ValueError(
            f"sequence length {T} exceeds block_size={block_size}: "
            f"shorten the sequences or set model.block_size >= {T}"
        )
    if kv_cache is not None and start + T > min(kv_cache.capacity, block_size):
        raise ValueError(
            f"KV cache holds {start} positions and {T} more exceed its capacity {kv_cache.capacity} "
            f"(block_size={block_size}): reset the cache (kv_cache.reset()) and refeed at most that many tokens"
        )
    if kv_cache is not None and kv_cache.batch_size != B:
        raise ValueError(f"KV cache batch size {kv_cache.batch_size} != input batch size {B}: allocate a new cache")
    return start


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: KVCache | None = None,
    layer: int = 0,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(QK^T / sqrt(hs)) V under a causal mask: q (B, nh, T, hs), k and v (B, nkv, T, hs).

    With a cache, this step's k/v are stored at [L, L + T) (L = kv_cache.length; the model advances
    it after its last layer) and q attends over every key in [0, L + T); no dropout there, the cache
    is an inference path. Each group of nh / nkv query heads shares one k/v head (grouped-query
    attention, as HF's repeat_kv: k/v head j serves query heads j*g .. j*g + g - 1).
    """
    T = q.size(2)
    L = 0
    if kv_cache is not None:
        L = kv_cache.length
        kv_cache.k[layer][:, :, L : L + T] = k
        kv_cache.v[layer][:, :, L : L + T] = v
        k = kv_cache.k[layer][:, :, : L + T]  # (B, nkv, L + T, hs)
        v = kv_cache.v[layer][:, :, : L + T]  # (B, nkv, L + T, hs)
    groups = q.size(1) // k.size(1)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, nh, L + T, hs)
        v = v.repeat_interleave(groups, dim=1)  # (B, nh, L + T, hs)
    if L == 0:
        # No cache, or the prefill of an empty one: plain causal attention. SDPA dispatches to
        # flash/memory-efficient kernels where available, so (T, T) is never materialised on GPU.
        p = dropout_p if kv_cache is None else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
    if T == 1:
        # One new token may see every cached position and itself: no mask.
        return F.scaled_dot_product_attention(q, k, v)
    # T new tokens after L cached ones: query t sits at position L + t and sees keys j <= L + t.
    # (is_causal would align the mask top-left, i.e. as if the queries started at position 0.)
    mask = torch.ones(T, L + T, dtype=torch.bool, device=q.device).tril(diagonal=L)  # (T, L + T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
