"""Unit tests of model/llama.py that only a Llama has (the tests every family passes are in
test_model.py, run for each family): HF names, grouped-query attention, a tied or untied head, the
parameter and FLOPs formulas, config validation."""

import math

import pytest
import torch

from model import Llama, LlamaConfig, get_family
from model.llama import count_parameters, flops_per_token, tied_weights

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64)


def tiny(**overrides) -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(**{**TINY, **overrides}))


def test_module_names_and_shapes_are_hugging_face_llamas():
    shapes = {n: tuple(p.shape) for n, p in tiny().named_parameters()}
    assert shapes == {
        "model.embed_tokens.weight": (64, 32),
        **{f"model.layers.{i}.{k}": s for i in range(2) for k, s in (
            ("self_attn.q_proj.weight", (32, 32)),
            ("self_attn.k_proj.weight", (16, 32)),  # 2 k/v heads of 8
            ("self_attn.v_proj.weight", (16, 32)),
            ("self_attn.o_proj.weight", (32, 32)),
            ("mlp.gate_proj.weight", (64, 32)),
            ("mlp.up_proj.weight", (64, 32)),
            ("mlp.down_proj.weight", (32, 64)),
            ("input_layernorm.weight", (32,)),
            ("post_attention_layernorm.weight", (32,)),
        )},
        "model.norm.weight": (32,),
        "lm_head.weight": (64, 32),
    }
    assert get_family("llama").build(LlamaConfig(**TINY)).__class__ is Llama


def test_head_is_untied_unless_asked():
    untied, tied = tiny(), tiny(tie_word_embeddings=True)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert "lm_head.weight" not in {n for n, _ in tied.named_parameters()}  # one Parameter, seen once
    assert tied_weights(tied.config) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert tied_weights(untied.config) == {}


def test_grouped_query_attention_equals_full_attention_with_repeated_heads():
    # 2 k/v heads serving 4 query heads = 4 k/v heads where heads 0,1 and 2,3 are copies.
    gqa = tiny().eval()
    mha = tiny(n_kv_head=4).eval()
    state = dict(gqa.state_dict())
    for i in range(2):
        for proj in ("k_proj", "v_proj"):
            w = state[f"model.layers.{i}.self_attn.{proj}.weight"].view(2, 8, 32)  # (nkv, hs, C)
            state[f"model.layers.{i}.self_attn.{proj}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], rtol=0, atol=1e-5)
    assert gqa.new_kv_cache(2).k[0].shape == (2, 2, 16, 8)  # the cache holds the 2 k/v heads only


def test_rotary_attention_depends_on_relative_positions_only():
    # RoPE's point: the score of a query at i and a key at j is a function of i - j.
    from model.llama import apply_rotary, rotary

    cfg = LlamaConfig(**TINY)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = rotary(cfg, 0, 12, torch.device("cpu"), torch.float32)  # (12, 8)

    def score(i, j):
        return (apply_rotary(q, cos[i], sin[i]) * apply_rotary(k, cos[j], sin[j])).sum().item()

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


def test_llama3_rope_keeps_high_frequencies_slows_low_ones_and_blends_between():
    from model.llama import _inv_freq

    # Head size 8, theta 5e5: wavelengths 2*pi/inv_freq of about 6, 167, 4443 and 118k positions.
    base = LlamaConfig(**TINY, rope_theta=500000.0)
    scaled = LlamaConfig(**TINY, rope_theta=500000.0, rope_type="llama3", rope_factor=4.0,
                         rope_high_freq_factor=32.0, rope_original_context=256)  # kept below 8, slowed above 256
    a, b = _inv_freq(base, torch.device("cpu")), _inv_freq(scaled, torch.device("cpu"))
    assert b[0] == a[0]
    assert a[1] / 4 < b[1] < a[1]
    torch.testing.assert_close(b[2:], a[2:] / 4)
    # The llama3 settings are part of the architecture only under rope_type llama3.
    assert "rope_factor" not in base.architecture() and scaled.architecture()["rope_factor"] == 4.0


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_parameter_and_flops_formulas_by_hand(tie):
    cfg = LlamaConfig(**TINY, tie_word_embeddings=tie)
    C, V, L, hs, I, T = 32, 64, 2, 8, 64, 16
    block = 2 * C * 4 * hs + 2 * C * 2 * hs + 3 * C * I + 2 * C
    n = V * C + L * block + C + (0 if tie else V * C)
    assert count_parameters(cfg) == n == tiny(tie_word_embeddings=tie).num_parameters()
    # The embedding lookup is free; the head's matmul (its own or the tied matrix) is counted.
    assert flops_per_token(cfg, T) == 6 * (L * block + C + V * C) + 12 * L * C * T


@pytest.mark.parametrize(
    "bad, words",
    [
        (dict(n_kv_head=3), ["n_kv_head=3", "model.n_kv_head"]),
        (dict(n_head=8, n_kv_head=8, n_embd=24), ["odd", "model.n_head"]),
        (dict(intermediate_size=0), ["intermediate_size", "model.intermediate_size"]),
        (dict(rope_theta=0.0), ["rope_theta"]),
        (dict(n_embd=30), ["n_embd", "n_head"]),
        (dict(family="gpt"), ["family", "LlamaConfig"]),
    ],
)
def test_config_validation_names_the_setting(bad, words):
    with pytest.raises(ValueError) as err:
        LlamaConfig(**{**TINY, **bad})
    assert all(w in str(err.value) for w in words), str(err.value)


def test_init_scales_the_residual_projections():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=512, n_layer=8, n_head=4, n_kv_head=4, n_embd=256, intermediate_size=512))
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert model.model.layers[3].self_attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.model.layers[3].mlp.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert torch.equal(model.model.norm.weight, torch.ones(256))


def test_the_job_config_picks_the_family_class_and_compares_architectures():
    from model import GPTConfig, ModelConfig
    from orchestrator.config.typed import build
    from orchestrator.errors import ConfigError

    llama = build(ModelConfig, {"family": "llama", "name": "x", **TINY}, "model")
    assert type(llama) is LlamaConfig and llama.n_kv_head == 2
    # A record or checkpoint written before families existed has no `family`: it is a GPT.
    old = build(ModelConfig, {"name": "gpt_tiny", "vocab_size": 512, "block_size": 64, "n_layer": 2, "n_head": 2,
                              "n_embd": 64, "bias": True}, "model")
    assert type(old) is GPTConfig
    with pytest.raises(ConfigError, match="model.family='mamba' is not a model family: use one of gpt, llama"):
        build(ModelConfig, {"family": "mamba"}, "model")
    with pytest.raises(ConfigError, match="unknown config key 'model.bias'"):
        build(ModelConfig, {"family": "llama", "bias": True}, "model")
    # No Llama weight depends on block_size (rotary positions): a folder fits whatever length a job trains at.
    assert llama.architecture() == LlamaConfig(**{**TINY, "block_size": 4096}).architecture()
    assert llama.architecture() != LlamaConfig(**{**TINY, "n_kv_head": 4}).architecture()
    assert old.architecture() != GPTConfig(**{**old.architecture(), "block_size": 128}).architecture()
    assert "dropout" not in llama.architecture() and llama.architecture()["family"] == "llama"
