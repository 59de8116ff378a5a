"""A GPT decoder family: single-device model code, no I/O and no distributed code."""

from model.gpt import (
    GPT,
    IGNORE_INDEX,
    GPTConfig,
    KVCache,
    count_parameters,
    flops_per_token,
    generate,
)
from model.hf import (
    gpt_to_hf_config,
    gpt_to_hf_state_dict,
    hf_config_to_gpt,
    hf_state_dict_to_gpt,
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
    "KVCache",
    "count_parameters",
    "eot_id",
    "flops_per_token",
    "generate",
    "gpt_to_hf_config",
    "gpt_to_hf_state_dict",
    "hf_config_to_gpt",
    "hf_state_dict_to_gpt",
    "tokenizer_from_json",
    "tokenizer_to_json",
    "train_bpe_tokenizer",
]
