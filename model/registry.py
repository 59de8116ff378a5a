"""The model seam: one table from `model.family` to everything the rest of the system needs of a
family. Code outside `model/` asks `family_of(config)` (or `get_family(name)`, `family_for_hf(...)`)
and never names a family itself; a new family is a config class in `model/config.py`, a module and
an HF adapter, and one row here.

Importing this module loads no torch: the config classes are plain dataclasses, and a family's
module and HF adapter are imported the first time one of their functions is called.

What a family's module provides (model/gpt.py, model/llama.py):
    MODEL                          the nn.Module class, built as MODEL(config); forward(idx, targets=None,
                                   kv_cache=None) -> (logits, loss); new_kv_cache(batch, capacity); activation
                                   checkpointing when config.activation_checkpointing
    count_parameters(config)       exact unique parameters, by formula
    flops_per_token(config, T)     training FLOPs per token (6N + attention)
    tied_weights(config)           {alias: source}: state-dict names that are one tensor with another
What its HF adapter provides (model/hf.py, model/hf_llama.py):
    to_hf_config(config, bos_token_id=, eos_token_id=) -> config.json dict
    from_hf_config(dict) -> config                  ValueError for a layout the family cannot hold
    to_hf_state_dict(state_dict, config) / from_hf_state_dict(hf_state_dict, config)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from model.config import GPTConfig, LlamaConfig, ModelConfig


@dataclass(frozen=True)
class Family:
    """One model family: its config class and where its code lives (imported on first use)."""

    name: str  # the value of model.family
    config: type[ModelConfig]
    module: str  # Python module with MODEL, count_parameters, flops_per_token, tied_weights
    hf_module: str  # Python module with the Hugging Face adapter
    hf_model_type: str  # `model_type` in a Hugging Face config.json
    hf_architecture: str  # the transformers class an export loads as

    def _code(self):
        return importlib.import_module(self.module)

    def _hf(self):
        return importlib.import_module(self.hf_module)

    def build(self, config: ModelConfig):
        """A freshly initialised single-device module (on torch's current default device)."""
        return self._code().MODEL(config)

    def count_parameters(self, config: ModelConfig) -> int:
        return self._code().count_parameters(config)

    def flops_per_token(self, config: ModelConfig, seq_len: int) -> float:
        return self._code().flops_per_token(config, seq_len)

    def tied_weights(self, config: ModelConfig) -> dict[str, str]:
        """{alias: source} of state-dict entries that are the same tensor; files keep only the source."""
        return self._code().tied_weights(config)

    def to_hf_config(self, config: ModelConfig, *, bos_token_id: int, eos_token_id: int) -> dict[str, Any]:
        return self._hf().to_hf_config(config, bos_token_id=bos_token_id, eos_token_id=eos_token_id)

    def from_hf_config(self, hf: dict[str, Any]) -> ModelConfig:
        return self._hf().from_hf_config(hf)

    def to_hf_state_dict(self, state_dict: dict, config: ModelConfig) -> dict:
        return self._hf().to_hf_state_dict(state_dict, config)

    def from_hf_state_dict(self, hf_state_dict: dict, config: ModelConfig) -> dict:
        return self._hf().from_hf_state_dict(hf_state_dict, config)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("gpt", GPTConfig, "model.gpt", "model.hf", "gpt2", "GPT2LMHeadModel"),
        Family("llama", LlamaConfig, "model.llama", "model.hf_llama", "llama", "LlamaForCausalLM"),
    )
}


def get_family(name: object) -> Family:
    """The family called `name`; ValueError naming the choices otherwise."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not a model family: use one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def family_of(config: ModelConfig) -> Family:
    return get_family(config.family)


def family_for_hf(hf_config: dict[str, Any]) -> Family:
    """The family that reads a Hugging Face config.json (by its model_type); ValueError otherwise."""
    model_type = hf_config.get("model_type")
    for family in FAMILIES.values():
        if family.hf_model_type == model_type:
            return family
    known = ", ".join(repr(f.hf_model_type) for f in FAMILIES.values())
    raise ValueError(f"Hugging Face model_type {model_type!r} is not supported: orch reads {known}")
