"""Sampling from any decoder family: a model with `config.block_size`, `new_kv_cache(batch, capacity)` and
`forward(idx, kv_cache=None) -> (logits, loss)` (GPT, Llama). Single device, no I/O."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def generate(
    model: nn.Module,
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
    then each new token costs one single-position forward. Cached keys carry their absolute
    positions (GPT's learned wpe, Llama's rotation), so they cannot slide: once the window is full,
    every further step recomputes the last block_size tokens without the cache, exactly as
    use_cache=False does. This keeps the output independent of use_cache (same tokens, same
    generator draws) at the price of one full-window forward per token past the window; resetting
    the cache to a shorter context would be faster but would condition on fewer tokens than the
    no-cache path.
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
        # Room for what this call can reach, not block_size (a Llama 3.2 folder says 131072 positions).
        capacity = min(block_size, min(idx.size(1), block_size) + max_new_tokens)
        cache = model.new_kv_cache(idx.size(0), capacity) if use_cache and max_new_tokens > 0 else None
        for step in range(max_new_tokens):
            if cache is not None and step == 0:
                logits, _ = model(idx[:, -block_size:], kv_cache=cache)  # prefill: (B, <=block_size, V)
            elif cache is not None and cache.length < cache.capacity:
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
