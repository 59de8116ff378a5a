"""Unit tests of model/hf.py against transformers' GPT2LMHeadModel, built from configs (no download)."""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from model import (  # noqa: E402
    GPT,
    GPTConfig,
    gpt_to_hf_config,
    gpt_to_hf_state_dict,
    hf_config_to_gpt,
    hf_state_dict_to_gpt,
)
from model.hf import _GPT2_DEFAULTS  # noqa: E402

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
BOS = EOS = 63


def random_gpt(cfg: GPTConfig = CFG) -> GPT:
    """Our GPT with every tensor random (biases and LayerNorms too), so a mis-mapped one shows."""
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def random_hf(**overrides) -> "transformers.GPT2LMHeadModel":
    torch.manual_seed(1)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=BOS, eos_token_id=EOS, **overrides,
    )
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tokens(B=3, T=16, seed=2) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def ours_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=idx).logits


def to_hf(model: GPT):
    hf_cfg = gpt_to_hf_config(model.config, bos_token_id=BOS, eos_token_id=EOS)
    hf_sd = gpt_to_hf_state_dict(model.state_dict())
    return hf_cfg, hf_sd


def test_export_loads_into_gpt2_lm_head_model_with_equal_logits():
    model = random_gpt()
    hf_cfg, hf_sd = to_hf(model)
    assert "lm_head.weight" not in hf_sd
    assert all(t.is_contiguous() for t in hf_sd.values())
    assert hf_sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_cfg)).eval()
    result = hf.load_state_dict(hf_sd, strict=False)
    assert not result.unexpected_keys
    # Only the tied head (and, in older transformers, the causal-mask buffers) is not in the file.
    others = [k for k in result.missing_keys if k != "lm_head.weight"]
    assert all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in others), others
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # HF tied it

    idx = tokens()
    diff = (hf_logits(hf, idx) - ours_logits(model, idx)).abs().max().item()
    assert diff < 1e-4


def test_export_of_views_into_one_flat_buffer_can_be_saved(tmp_path):
    # Consolidated ZeRO weights are views into one flat fp32 vector; safetensors may refuse shared storage.
    original = {k: v for k, v in random_gpt().state_dict().items() if k != "lm_head.weight"}
    flat = torch.cat([t.reshape(-1) for t in original.values()])
    views, offset = {}, 0
    for name, t in original.items():
        views[name] = flat.narrow(0, offset, t.numel()).view(t.shape)
        offset += t.numel()
    hf_sd = gpt_to_hf_state_dict(views)
    safetensors_torch.save_file(hf_sd, str(tmp_path / "model.safetensors"))
    loaded = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    for name, t in gpt_to_hf_state_dict(original).items():
        assert torch.equal(loaded[name], t), name


def test_round_trip_gives_back_the_same_tensors_and_config():
    for cfg in (CFG, dataclasses.replace(CFG, dropout=0.1)):
        model = random_gpt(cfg)
        hf_cfg, hf_sd = to_hf(model)
        assert hf_config_to_gpt(hf_cfg) == cfg
        back = hf_state_dict_to_gpt(hf_sd, cfg)
        original = model.state_dict()
        assert back.keys() == original.keys()
        for name, tensor in original.items():
            assert torch.equal(back[name], tensor), name
        fresh = GPT(cfg)
        fresh.load_state_dict(back, strict=True)
        assert fresh.lm_head.weight is fresh.transformer.wte.weight  # still tied after loading


def test_import_from_random_hf_model_gives_equal_logits():
    hf = random_hf()
    cfg = hf_config_to_gpt(hf.config.to_dict())
    assert cfg == CFG
    model = GPT(cfg).eval()
    model.load_state_dict(hf_state_dict_to_gpt(hf.state_dict(), cfg), strict=True)
    idx = tokens()
    assert (hf_logits(hf, idx) - ours_logits(model, idx)).abs().max().item() < 1e-4


def test_import_accepts_bare_keys_and_ignores_mask_buffers():
    hf = random_hf()
    bare = dict(hf.transformer.state_dict())  # GPT2Model names: no "transformer." prefix, no lm_head
    bare["h.0.attn.bias"] = torch.ones(1, 1, 16, 16, dtype=torch.bool)  # older transformers' buffers
    bare["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    converted = hf_state_dict_to_gpt(bare, CFG)
    reference = hf_state_dict_to_gpt(hf.state_dict(), CFG)
    assert converted.keys() == reference.keys()
    for name in reference:
        assert torch.equal(converted[name], reference[name]), name


def test_import_rejects_untied_head_and_wrong_shapes():
    hf_sd = dict(random_hf().state_dict())
    hf_sd["lm_head.weight"] = hf_sd["transformer.wte.weight"] + 1
    with pytest.raises(ValueError, match="lm_head"):
        hf_state_dict_to_gpt(hf_sd, CFG)
    with pytest.raises(ValueError, match="shape"):
        hf_state_dict_to_gpt(random_hf().state_dict(), dataclasses.replace(CFG, vocab_size=128))
    with pytest.raises(ValueError, match="missing"):
        hf_state_dict_to_gpt(random_hf().state_dict(), dataclasses.replace(CFG, n_layer=3))


def test_defaults_for_absent_keys_match_gpt2config():
    defaults = transformers.GPT2Config().to_dict()
    for key, value in _GPT2_DEFAULTS.items():
        assert defaults[key] == value, key


def hf_dict(**overrides) -> dict:
    return {**gpt_to_hf_config(CFG, bos_token_id=BOS, eos_token_id=EOS), **overrides}


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(model_type="llama"), ["model_type", "'llama'", "gpt2"]),
        (dict(n_inner=96), ["n_inner", "96", "128"]),
        (dict(activation_function="relu"), ["activation_function", "'relu'", "gelu_new"]),
        (dict(scale_attn_by_inverse_layer_idx=True), ["scale_attn_by_inverse_layer_idx"]),
        (dict(reorder_and_upcast_attn=True), ["reorder_and_upcast_attn"]),
        (dict(tie_word_embeddings=False), ["tie_word_embeddings"]),
        (dict(layer_norm_epsilon=1e-6), ["layer_norm_epsilon"]),
        (dict(attn_pdrop=0.2), ["attn_pdrop", "dropout"]),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_import_rejects_configs_outside_the_layout(overrides, words):
    with pytest.raises(ValueError) as err:
        hf_config_to_gpt(hf_dict(**overrides))
    msg = str(err.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg


def test_import_accepts_equivalent_configs():
    assert hf_config_to_gpt(hf_dict(n_inner=4 * 32, activation_function="gelu_pytorch_tanh")) == CFG
    # A config.json that leaves GPT-2 defaults out.
    sparse = {"model_type": "gpt2", "n_positions": 16, "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 64}
    assert hf_config_to_gpt(sparse) == dataclasses.replace(CFG, dropout=0.1)


def test_export_rejects_a_model_without_biases():
    cfg = dataclasses.replace(CFG, bias=False)
    with pytest.raises(ValueError, match="bias") as err:
        gpt_to_hf_config(cfg, bos_token_id=BOS, eos_token_id=EOS)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="bias"):
        gpt_to_hf_state_dict(GPT(cfg).state_dict())
    with pytest.raises(ValueError, match="eos_token_id"):
        gpt_to_hf_config(CFG, bos_token_id=0, eos_token_id=64)


def test_exported_directory_loads_with_auto_model_for_causal_lm(tmp_path):
    # Exactly what the orchestrator's export writes.
    model = random_gpt()
    hf_cfg, hf_sd = to_hf(model)
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    safetensors_torch.save_file(hf_sd, str(tmp_path / "model.safetensors"))

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.config.bos_token_id == BOS and hf.config.eos_token_id == EOS
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    idx = tokens()
    assert (hf_logits(hf, idx) - ours_logits(model, idx)).abs().max().item() < 1e-4

    # ... and back through HF's own writer: save_pretrained's files import to equal logits.
    out = tmp_path / "resaved"
    hf.save_pretrained(str(out))
    cfg = hf_config_to_gpt(json.loads((out / "config.json").read_text()))
    assert cfg == CFG
    back = GPT(cfg).eval()
    back.load_state_dict(hf_state_dict_to_gpt(safetensors_torch.load_file(str(out / "model.safetensors")), cfg))
    torch.testing.assert_close(ours_logits(back, idx), ours_logits(model, idx), rtol=0, atol=0)
