"""Decoder families (GPT, Llama) behind one registry (`model.registry`): single-device model code,
no I/O and no distributed code.

The names below are imported on first use (PEP 562), so code that needs only the tokenizer
(`orch data prepare`, which fails in a second on a bad corpus) does not wait for torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "GPT": "model.gpt",
    "IGNORE_INDEX": "model.common",
    "GPTConfig": "model.config",
    "LlamaConfig": "model.config",
    "ModelConfig": "model.config",
    "KVCache": "model.common",
    "Llama": "model.llama",
    "count_parameters": "model.gpt",
    "flops_per_token": "model.gpt",
    "generate": "model.sampling",
    "FAMILIES": "model.registry",
    "family_for_hf": "model.registry",
    "family_of": "model.registry",
    "get_family": "model.registry",
    "gpt_to_hf_config": "model.hf",
    "gpt_to_hf_state_dict": "model.hf",
    "hf_config_to_gpt": "model.hf",
    "hf_state_dict_to_gpt": "model.hf",
    "EOT_TOKEN": "model.tokenizer",
    "eot_id": "model.tokenizer",
    "tokenizer_from_json": "model.tokenizer",
    "tokenizer_to_json": "model.tokenizer",
    "train_bpe_tokenizer": "model.tokenizer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
