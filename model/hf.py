"""Conversion between our GPT and Hugging Face `GPT2LMHeadModel`: pure functions, no I/O.

Our module tree already uses HF's names (`transformer.h.0.attn.c_attn.weight`, ...), so a state
dict converts by copying, with two differences: HF's attention and MLP projections are `Conv1D`
modules whose weight is the transpose of our `nn.Linear` weight (in, out) vs (out, in), and HF ties
`lm_head.weight` to `transformer.wte.weight` itself, so export leaves it out. Writing the files
(`config.json`, `model.safetensors`) is the caller's job; transformers is not imported here.
"""

from __future__ import annotations

from typing import Any

import torch

from model.config import GPTConfig

# Linear weights that HF stores as Conv1D (transposed); the key suffix within a block.
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers older transformers versions keep in the state dict (the causal mask).
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
# Activations equal to our GELU (tanh approximation) to float precision.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_LAYER_NORM_EPS = 1e-5  # ours is fixed (model/gpt.py)
_PREFIX = "transformer."
_LM_HEAD = "lm_head.weight"
_WTE = "transformer.wte.weight"

# transformers.GPT2Config's defaults, for keys a config.json may leave out.
_GPT2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}


def gpt_to_hf_config(cfg: GPTConfig, *, bos_token_id: int, eos_token_id: int) -> dict[str, Any]:
    """A `transformers.GPT2Config` dict (json.dump it as config.json) for a model built from cfg."""
    if not cfg.bias:
        raise ValueError(
            "GPTConfig.bias=False cannot be exported: Hugging Face GPT-2 always has biases; "
            "train with model.bias=true to export"
        )
    for name, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        if not 0 <= value < cfg.vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {cfg.vocab_size}): pass the tokenizer's id")
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # GELU, tanh approximation, as ours
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": _LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # 1/sqrt(head size), as scaled_dot_product_attention
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }


def hf_config_to_gpt(hf: dict[str, Any]) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 config dict; ValueError for anything else."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise ValueError(
            f"Hugging Face model_type {model_type!r} is not supported: "
            f"orch models use the GPT-2 layout (model_type 'gpt2')"
        )
    h = {**_GPT2_DEFAULTS, **hf}
    act = h["activation_function"]
    if act not in _TANH_GELUS:
        raise ValueError(
            f"Hugging Face activation_function {act!r} is not supported: orch models use the tanh GELU ('gelu_new')"
        )
    if h["n_inner"] is not None and h["n_inner"] != 4 * h["n_embd"]:
        raise ValueError(
            f"Hugging Face n_inner={h['n_inner']} is not supported: "
            f"orch models use an MLP of 4 * n_embd = {4 * h['n_embd']}"
        )
    for key, want in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("add_cross_attention", False),
        ("tie_word_embeddings", True),
    ):
        if bool(h[key]) != want:
            raise ValueError(f"Hugging Face {key}={h[key]!r} is not supported: orch models need {key}={want}")
    if h["layer_norm_epsilon"] != _LAYER_NORM_EPS:
        raise ValueError(
            f"Hugging Face layer_norm_epsilon={h['layer_norm_epsilon']!r} is not supported: "
            f"orch models use {_LAYER_NORM_EPS}"
        )
    drops = {k: h[k] for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(drops.values())) != 1:
        raise ValueError(
            f"Hugging Face dropouts differ ({drops}): orch models use one model.dropout; set all three equal"
        )
    return GPTConfig(
        vocab_size=h["vocab_size"],
        block_size=h["n_positions"],
        n_layer=h["n_layer"],
        n_head=h["n_head"],
        n_embd=h["n_embd"],
        dropout=float(h["resid_pdrop"]),
        bias=True,
    )


def gpt_to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (`GPT.state_dict()`) renamed and transposed for `GPT2LMHeadModel`.

    lm_head.weight is left out (HF ties it to transformer.wte.weight); it must be that matrix.
    Every tensor is contiguous and owns its storage, as `safetensors.torch.save_file` requires
    (consolidated ZeRO weights may be views into one flat buffer; those are copied).
    """
    if "transformer.ln_f.bias" not in state_dict:
        raise ValueError(
            "state dict has no transformer.ln_f.bias (a bias=False model): Hugging Face GPT-2 always has biases; "
            "train with model.bias=true to export"
        )
    if _LM_HEAD in state_dict and not same_tensor(state_dict[_LM_HEAD], state_dict[_WTE]):
        raise ValueError("lm_head.weight differs from transformer.wte.weight: GPT-2 export needs the tied head")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name == _LM_HEAD:
            continue
        if not name.startswith(_PREFIX):
            raise ValueError(f"unexpected key {name!r} in the GPT state dict: pass GPT.state_dict() (unwrapped)")
        out[name] = standalone(tensor.t() if name.endswith(_CONV1D_WEIGHTS) else tensor)
    return out


def hf_state_dict_to_gpt(hf_state_dict: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A `GPT2LMHeadModel` (or `GPT2Model`) state dict as ours, for `GPT(cfg).load_state_dict`.

    Keys may carry the `transformer.` prefix or not; HF's mask buffers are ignored; lm_head.weight
    is taken from wte (an untied lm_head is refused). Names and shapes are checked against cfg.
    """
    out: dict[str, torch.Tensor] = {}
    lm_head = None
    for name, tensor in hf_state_dict.items():
        if name == _LM_HEAD:
            lm_head = tensor
            continue
        if name.endswith(_HF_BUFFERS):
            continue
        name = name if name.startswith(_PREFIX) else _PREFIX + name
        out[name] = (tensor.t() if name.endswith(_CONV1D_WEIGHTS) else tensor).contiguous()
    if _WTE in out:
        if lm_head is not None and not same_tensor(lm_head, out[_WTE]):
            raise ValueError(
                "Hugging Face lm_head.weight differs from transformer.wte.weight: only tied heads are supported"
            )
        out[_LM_HEAD] = out[_WTE]

    check_names_and_shapes(out, cfg, "hf_config_to_gpt")
    return out


def check_names_and_shapes(state_dict: dict[str, torch.Tensor], cfg, convert: str) -> None:
    """ValueError unless `state_dict` has exactly the names and shapes of the model cfg builds."""
    from model.registry import family_of  # (the registry imports the family's code lazily)

    # Names and shapes of the model, from one built on the meta device (allocates nothing).
    with torch.device("meta"):
        expected = {k: v.shape for k, v in family_of(cfg).build(cfg).state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"Hugging Face state dict does not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
            f" ({len(missing)} missing, {len(unexpected)} unexpected); convert the config with {convert}"
        )
    for name, shape in expected.items():
        if state_dict[name].shape != shape:
            raise ValueError(
                f"Hugging Face tensor {name} has shape {tuple(state_dict[name].shape)}, the config needs "
                f"{tuple(shape)}: convert the config with {convert}"
            )


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if a and b are one tensor (tied), or equal in value (a copy of a tied matrix)."""
    if a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()):
        return True
    return a.shape == b.shape and bool(torch.equal(a, b))


def standalone(t: torch.Tensor) -> torch.Tensor:
    """t if it is contiguous and spans its whole storage, else a contiguous copy."""
    owns = (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )
    return t if owns else t.clone(memory_format=torch.contiguous_format)


# The adapter protocol of model.registry.
to_hf_config = gpt_to_hf_config
from_hf_config = hf_config_to_gpt
from_hf_state_dict = hf_state_dict_to_gpt


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    return gpt_to_hf_state_dict(state_dict)
