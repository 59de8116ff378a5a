"""Conversion between our Llama and Hugging Face `LlamaForCausalLM`: pure functions, no I/O.

Our module tree uses HF's names and HF's RoPE layout, so a state dict converts by copying; a tied
head (`tie_word_embeddings`) is written once, under the embedding's name, as HF does. Config keys
of transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`) are both read; both are
written, so either version loads an export.
"""

from __future__ import annotations

from typing import Any

import torch

from model.config import LlamaConfig
from model.hf import check_names_and_shapes, same_tensor, standalone
from model.llama import tied_weights

_PREFIX = "model."
_LM_HEAD = "lm_head.weight"
# Non-parameter buffers older transformers versions keep in the state dict.
_HF_BUFFERS = ("rotary_emb.inv_freq",)

# Our llama3 RoPE settings and HF's names for them.
_LLAMA3 = {"rope_factor": "factor", "rope_low_freq_factor": "low_freq_factor",
           "rope_high_freq_factor": "high_freq_factor", "rope_original_context": "original_max_position_embeddings"}

# transformers.LlamaConfig's defaults, for keys a config.json may leave out.
_LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # = num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "head_dim": None,  # = hidden_size // num_attention_heads
    "rope_theta": 10000.0,
}


def to_hf_config(cfg: LlamaConfig, *, bos_token_id: int, eos_token_id: int) -> dict[str, Any]:
    """A `transformers.LlamaConfig` dict (json.dump it as config.json) for a model built from cfg."""
    for name, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        if not 0 <= value < cfg.vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {cfg.vocab_size}): pass the tokenizer's id")
    scaling: dict[str, Any] = {"rope_type": cfg.rope_type}
    if cfg.rope_type == "llama3":
        scaling.update({theirs: getattr(cfg, ours) for ours, theirs in _LLAMA3.items()})
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4
        "rope_scaling": None if cfg.rope_type == "default" else scaling,  # transformers 4
        "rope_parameters": {"rope_theta": cfg.rope_theta, **scaling},  # transformers 5
        "attention_bias": False,
        "attention_dropout": cfg.dropout,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }


def _rope(h: dict[str, Any]) -> dict[str, Any]:
    """Our rope_* settings from an HF config (transformers 5's rope_parameters, or 4's rope_theta and
    rope_scaling); ValueError for a RoPE variant orch does not have (linear, dynamic, yarn, ...)."""
    p = {**(h.get("rope_scaling") or {}), **(h.get("rope_parameters") or {})}
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"Hugging Face rope_type={kind!r} is not supported: orch Llama models have rotary "
                         f"embeddings of rope_type 'default' and 'llama3'")
    out = {"rope_type": kind, "rope_theta": float(p.get("rope_theta", h["rope_theta"]))}
    if kind == "llama3":
        missing = [theirs for theirs in _LLAMA3.values() if theirs not in p]
        if missing:
            raise ValueError(f"Hugging Face rope_type 'llama3' without {', '.join(missing)}: the config.json is "
                             f"incomplete")
        out.update(rope_factor=float(p["factor"]), rope_low_freq_factor=float(p["low_freq_factor"]),
                   rope_high_freq_factor=float(p["high_freq_factor"]),
                   rope_original_context=int(p["original_max_position_embeddings"]))
    return out


def from_hf_config(hf: dict[str, Any]) -> LlamaConfig:
    """The LlamaConfig of a Hugging Face Llama config dict; ValueError for anything it cannot hold."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"Hugging Face model_type {hf.get('model_type')!r} is not supported here: "
                         f"this adapter reads model_type 'llama'")
    h = {**_LLAMA_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if h["hidden_act"] != "silu":
        raise ValueError(f"Hugging Face hidden_act {h['hidden_act']!r} is not supported: "
                         f"orch Llama uses SwiGLU ('silu')")
    for key in ("attention_bias", "mlp_bias"):
        if h[key]:
            raise ValueError(f"Hugging Face {key}={h[key]!r} is not supported: orch Llama has no biases")
    n_head = h["num_attention_heads"]
    head_dim = h["head_dim"] or h["hidden_size"] // n_head
    if head_dim * n_head != h["hidden_size"]:
        raise ValueError(f"Hugging Face head_dim={head_dim} is not supported: orch Llama needs head_dim = "
                         f"hidden_size / num_attention_heads = {h['hidden_size'] / n_head:g}")
    return LlamaConfig(
        vocab_size=h["vocab_size"],
        block_size=h["max_position_embeddings"],
        n_layer=h["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=h["num_key_value_heads"] or n_head,
        n_embd=h["hidden_size"],
        intermediate_size=h["intermediate_size"],
        **_rope(h),
        norm_eps=float(h["rms_norm_eps"]),
        tie_word_embeddings=bool(h["tie_word_embeddings"]),
        dropout=float(h["attention_dropout"]),
    )


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our state dict (`Llama.state_dict()`) for `LlamaForCausalLM`: the same names, a tied head once.

    Every tensor is contiguous and owns its storage, as `safetensors.torch.save_file` requires.
    """
    tied = tied_weights(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name in tied:
            if not same_tensor(tensor, state_dict[tied[name]]):
                raise ValueError(f"{name} differs from {tied[name]}: a tie_word_embeddings model needs the tied head")
            continue
        if not (name.startswith(_PREFIX) or name == _LM_HEAD):
            raise ValueError(f"unexpected key {name!r} in the Llama state dict: pass Llama.state_dict() (unwrapped)")
        out[name] = standalone(tensor)
    return out


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """A `LlamaForCausalLM` (or `LlamaModel`) state dict as ours, for `Llama(cfg).load_state_dict`.

    Keys may carry the `model.` prefix or not; rotary buffers are ignored; a tied head is taken from
    the embedding (a different lm_head under tie_word_embeddings is refused). Names and shapes are
    checked against cfg.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state_dict.items():
        if name.endswith(_HF_BUFFERS):
            continue
        if name != _LM_HEAD and not name.startswith(_PREFIX):
            name = _PREFIX + name
        out[name] = tensor.contiguous()
    for alias, source in tied_weights(cfg).items():
        if source in out:
            if alias in out and not same_tensor(out[alias], out[source]):
                raise ValueError(f"Hugging Face {alias} differs from {source} but tie_word_embeddings is true: "
                                 f"the folder is inconsistent; set tie_word_embeddings=false in its config.json")
            out[alias] = out[source]
    check_names_and_shapes(out, cfg, "model.hf_llama.from_hf_config")
    return out
