"""The architecture of each model family as one frozen dataclass: no torch, so the CLI can validate a
config in a blink. `conf/model/<preset>.yaml` is one of these, field for field; `family` says which.

A family's dataclass subclasses `ModelConfig` (the fields every decoder has) and adds its own. The
registry (`model.registry`) maps the `family` name to the class and to the code that builds, counts,
exports and imports that family.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

# Fields that describe how a model is trained or labelled, not the weights it has: a checkpoint or
# an HF folder fits a job whatever their values.
_NOT_ARCHITECTURE = ("name", "dropout", "activation_checkpointing")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What every decoder family shares; a family's subclass adds its own fields."""

    family: str = ""  # which family (a key of model.registry.FAMILIES); each subclass fixes its own
    name: str = field(default="custom", compare=False)  # preset name, e.g. gpt_tiny; a label, not architecture
    vocab_size: int = 50304  # embedding rows; must cover the tokenizer's vocabulary
    block_size: int = 1024  # maximum sequence length
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention (query) heads per block; must divide n_embd
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches; 0 for pretraining
    activation_checkpointing: bool = False  # recompute each block in backward (saves memory, ~1/3 more compute)

    # Fields outside `architecture()` besides _NOT_ARCHITECTURE (e.g. a length that no weight depends on).
    _free: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        want = type(self).__dataclass_fields__["family"].default
        if self.family != want:
            raise ValueError(f"family={self.family!r} does not match {type(self).__name__} (family {want!r})")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            # bool is an int subclass; True as a size is always a config mistake.
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} is invalid: set model.{name} to a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                f"set model.n_head to a divisor of n_embd (head size = n_embd / n_head)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} is out of range: set model.dropout in [0, 1)")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the weights' names, shapes and meaning: two configs with equal
        architectures can load each other's weights."""
        skip = _NOT_ARCHITECTURE + self._free
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}

    @classmethod
    def select_class(cls, data: dict) -> type[ModelConfig]:
        """The family's config class for a config dict (`family` absent: gpt, as before families)."""
        name = data.get("family", "gpt") if isinstance(data, dict) else "gpt"
        classes = config_classes()
        if not isinstance(name, str) or name not in classes:
            raise ValueError(f"model.family={name!r} is not a model family: use one of {', '.join(sorted(classes))}")
        return classes[name]


@dataclass(frozen=True, kw_only=True)
class GPTConfig(ModelConfig):
    """GPT-2 layout: learned positions, pre-LayerNorm, GELU MLP of 4 * n_embd, tied head (model/gpt.py)."""

    family: str = "gpt"
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    block_size: int = 1024  # the number of learned position embeddings
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 (HF export needs True)


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    """Llama layout: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention (model/llama.py)."""

    family: str = "llama"
    vocab_size: int = 32000
    block_size: int = 2048  # longest sequence trained or generated; no weight depends on it (RoPE)
    n_embd: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32  # key/value heads (grouped-query attention); must divide n_head; = n_head is plain MHA
    intermediate_size: int = 11008  # hidden width of the SwiGLU MLP
    rope_theta: float = 10000.0  # base of the rotary frequencies
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # lm_head shares the token embedding matrix (Llama 3.2 1B/3B do)
    # Rotary frequency rescaling: "default" none; "llama3" Llama 3.1+'s (the low frequencies slowed by
    # rope_factor, the high ones kept, a smooth blend between), with the four settings below.
    rope_type: Literal["default", "llama3"] = "default"
    rope_factor: float = 8.0  # llama3: how many times rope_original_context the model reads
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above rope_original_context / this are slowed
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below rope_original_context / this are kept
    rope_original_context: int = 8192  # llama3: the context length pretrained before rescaling

    _free: ClassVar[tuple[str, ...]] = ("block_size",)
    _LLAMA3: ClassVar[tuple[str, ...]] = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                                          "rope_original_context")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_kv_head", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} is invalid: set model.{name} to a positive integer")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}: "
                             f"set model.n_kv_head to a divisor of n_head (each group of queries shares one k/v head)")
        if self.head_size % 2:
            raise ValueError(f"head size n_embd/n_head={self.head_size} is odd: rotary embeddings rotate pairs; "
                             f"choose model.n_head so that n_embd/n_head is even")
        for name in ("rope_theta", "norm_eps", *self._LLAMA3):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0: set model.{name}")
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                             f"rope_low_freq_factor={self.rope_low_freq_factor}: set model.rope_high_freq_factor")

    def architecture(self) -> dict[str, Any]:
        arch = super().architecture()
        if self.rope_type == "default":  # the llama3 settings mean nothing then
            for name in self._LLAMA3:
                del arch[name]
        return arch


def config_classes() -> dict[str, type[ModelConfig]]:
    """Each family's config class by its `family`, derived from the classes themselves (model.registry's
    FAMILIES names the same ones, with the family's code; a test checks they agree): so this module
    needs nothing of the registry."""
    return {c.family: c for c in ModelConfig.__subclasses__()}
