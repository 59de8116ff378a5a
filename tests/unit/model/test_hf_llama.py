"""Unit tests of model/hf_llama.py against transformers' LlamaForCausalLM, built from configs (no
download): logits equal both ways (export and import), through HF's own writer and reader too."""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from model import Llama, LlamaConfig, family_for_hf, get_family  # noqa: E402
from model.hf_llama import _LLAMA_DEFAULTS  # noqa: E402

# Grouped-query attention (4 query heads on 2 k/v heads), and a rope_theta that is not the default.
CFG = LlamaConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64,
                  rope_theta=500000.0, norm_eps=1e-5)
BOS, EOS = 1, 2
LLAMA = get_family("llama")


def random_llama(cfg: LlamaConfig = CFG) -> Llama:
    """Our Llama with every tensor random (norm weights too), so a mis-mapped one shows."""
    torch.manual_seed(0)
    model = Llama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def random_hf(**overrides):
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=64, max_position_embeddings=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        hidden_size=32, intermediate_size=64, rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=BOS,
        eos_token_id=EOS, **overrides,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tokens(B=3, T=16, seed=2) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(ours, hf, idx) -> float:
    with torch.no_grad():
        return (ours(idx)[0] - hf(input_ids=idx).logits).abs().max().item()


# Llama 3.1+'s rescaled RoPE, at a scale where the tiny model's 4 frequencies are slowed, blended and kept.
LLAMA3_ROPE = dict(rope_type="llama3", rope_factor=4.0, rope_high_freq_factor=32.0, rope_original_context=256)
VARIANTS = {"untied": {}, "tied": dict(tie_word_embeddings=True),
            "llama3-rope-tied": dict(tie_word_embeddings=True, **LLAMA3_ROPE)}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exported_folder_loads_as_llama_for_causal_lm_with_equal_logits(tmp_path, variant):
    cfg = dataclasses.replace(CFG, **VARIANTS[variant])
    tie = cfg.tie_word_embeddings
    model = random_llama(cfg)
    hf_cfg = LLAMA.to_hf_config(cfg, bos_token_id=BOS, eos_token_id=EOS)
    hf_sd = LLAMA.to_hf_state_dict(model.state_dict(), cfg)
    assert ("lm_head.weight" in hf_sd) != tie  # a tied head is written once, as HF does
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg, indent=1))
    safetensors_torch.save_file(hf_sd, str(tmp_path / "model.safetensors"))

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tie
    for name, tensor in hf.state_dict().items():  # every weight arrived (none left at HF's random init)
        assert torch.equal(tensor, model.state_dict()[name]), name
    diff = max_diff(model, hf, tokens())
    assert diff < 1e-4, diff

    # ... and back through HF's own writer: save_pretrained's files import to identical logits.
    hf.save_pretrained(str(tmp_path / "resaved"))
    back_cfg = family_for_hf(json.loads((tmp_path / "resaved" / "config.json").read_text())).from_hf_config(
        json.loads((tmp_path / "resaved" / "config.json").read_text()))
    assert back_cfg == cfg
    back = Llama(back_cfg).eval()
    weights = safetensors_torch.load_file(str(tmp_path / "resaved" / "model.safetensors"))
    back.load_state_dict(LLAMA.from_hf_state_dict(weights, back_cfg), strict=True)
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], model(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("rope", ["default", "llama3"])
def test_import_from_random_hf_model_gives_equal_logits_and_generation(rope):
    llama3 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 32.0, "original_max_position_embeddings": 256}}
    hf = random_hf(**(llama3 if rope == "llama3" else {}))
    cfg = LLAMA.from_hf_config(hf.config.to_dict())
    assert cfg == (CFG if rope == "default" else dataclasses.replace(CFG, **LLAMA3_ROPE))
    model = Llama(cfg).eval()
    model.load_state_dict(LLAMA.from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    idx = tokens()
    diff = max_diff(model, hf, idx)
    assert diff < 1e-4, diff
    # Greedy decoding with our KV cache picks HF's tokens.
    from model import generate

    prompt = idx[:1, :4]
    ours = generate(model, prompt, max_new_tokens=8, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=EOS, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_import_accepts_bare_keys_and_transformers_4_configs():
    hf = random_hf()
    bare = dict(hf.model.state_dict())  # LlamaModel names: no "model." prefix, no lm_head
    bare["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # older transformers' buffer
    bare["lm_head.weight"] = hf.lm_head.weight
    converted = LLAMA.from_hf_state_dict(bare, CFG)
    reference = LLAMA.from_hf_state_dict(hf.state_dict(), CFG)
    assert converted.keys() == reference.keys()
    # transformers 4 wrote rope_theta and rope_scaling at the top level; sparse files leave defaults out.
    old = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16, "vocab_size": 64,
           "rope_theta": 500000.0, "rope_scaling": None, "rms_norm_eps": 1e-5}
    assert LLAMA.from_hf_config(old) == CFG
    assert LLAMA.from_hf_config({"model_type": "llama"}) == LlamaConfig(norm_eps=1e-6)  # HF's defaults


def test_defaults_for_absent_keys_match_llama_config():
    defaults = transformers.LlamaConfig().to_dict()
    for key, value in _LLAMA_DEFAULTS.items():
        if key == "rope_theta":
            assert defaults["rope_parameters"]["rope_theta"] == value
        elif key not in ("num_key_value_heads", "head_dim"):  # filled in from the head count
            assert defaults[key] == value, key


def hf_dict(**overrides) -> dict:
    return {**LLAMA.to_hf_config(CFG, bos_token_id=BOS, eos_token_id=EOS), **overrides}


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}), ["rope_type", "'yarn'"]),
        (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), ["rope_type", "'linear'"]),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
         ["'llama3'", "low_freq_factor", "original_max_position_embeddings"]),
        (dict(hidden_act="gelu"), ["hidden_act", "'gelu'", "silu"]),
        (dict(attention_bias=True), ["attention_bias"]),
        (dict(mlp_bias=True), ["mlp_bias"]),
        (dict(head_dim=16), ["head_dim=16", "8"]),
        (dict(num_key_value_heads=3), ["n_kv_head=3"]),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_import_rejects_configs_outside_the_layout(overrides, words):
    with pytest.raises(ValueError) as err:
        LLAMA.from_hf_config(hf_dict(**overrides))
    msg = str(err.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, msg


def test_import_rejects_wrong_shapes_and_an_inconsistent_tied_head():
    hf_sd = dict(random_hf().state_dict())
    with pytest.raises(ValueError, match="shape"):
        LLAMA.from_hf_state_dict(hf_sd, dataclasses.replace(CFG, n_kv_head=4))
    with pytest.raises(ValueError, match="missing"):
        LLAMA.from_hf_state_dict(hf_sd, dataclasses.replace(CFG, n_layer=3))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        LLAMA.from_hf_state_dict(hf_sd, dataclasses.replace(CFG, tie_word_embeddings=True))


def test_the_registry_finds_each_family_by_model_type():
    assert family_for_hf({"model_type": "llama"}).name == "llama"
    assert family_for_hf({"model_type": "gpt2"}).name == "gpt"
    with pytest.raises(ValueError, match="'mistral'"):
        family_for_hf({"model_type": "mistral"})
