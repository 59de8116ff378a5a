"""A GPT decoder family: single-device model code, no I/O and no distributed code."""

from model.gpt import (
    GPT,
    IGNORE_INDEX,
    GPTConfig,
    count_parameters,
    flops_per_token,
    generate,
)
from model.tokenizer import (
    EOT_TOKEN,
    eot_id,
    tokenizer_from_json,
    tokenizer_to_json,
    train_bpe_tokenizer,
)

__all__ = [
    "EOT_TOKEN",
    "GPT",
    "GPTConfig",
    "IGNORE_INDEX",
    "count_parameters",
    "eot_id",
    "flops_per_token",
    "generate",
    "tokenizer_from_json",
    "tokenizer_to_json",
    "train_bpe_tokenizer",
]
