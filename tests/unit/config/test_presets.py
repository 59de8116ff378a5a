"""Every model preset in conf/model/ builds a valid model of its family of the size its name promises
(meta device, no memory), and exports to a Hugging Face config that transformers builds at that size."""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from model.registry import FAMILIES, get_family
from orchestrator.config.schema import ModelConfig
from orchestrator.config.typed import build

PRESETS = sorted((Path(__file__).resolve().parents[3] / "conf" / "model").glob("*.yaml"))

# Parameter counts (a tied head once, position embeddings included) each named preset must land in.
BALLPARK = {
    "gpt_tiny": (0, 1_000_000),
    "gpt2_124m": (120e6, 130e6),
    "gpt2_350m": (340e6, 370e6),
    "gpt_1_3b": (1.2e9, 1.45e9),
    "gpt_7b": (6.5e9, 7.0e9),
    "llama_tiny": (0, 1_000_000),
}
# Published sizes of the models whose shapes the presets copy (their HF folders' parameter counts).
KNOWN = {
    "llama_1b": 1_100_048_384,  # TinyLlama-1.1B
    "llama3_8b": 8_030_261_248,  # Meta-Llama-3-8B
    "llama3_2_1b": 1_235_814_400,  # Llama-3.2-1B (tied head)
}


def load(path: Path) -> ModelConfig:
    raw = yaml.safe_load(path.read_text())
    assert raw["name"] == path.stem, f"{path.name}: name must equal the file name"
    assert raw["family"] in FAMILIES, f"{path.name}: family must be one of {sorted(FAMILIES)}"
    return build(ModelConfig, raw, "model")


def test_presets_found():
    names = {p.stem for p in PRESETS}
    assert {"gpt_tiny", "gpt_small", "gpt2_124m", "gpt2_350m", "gpt_1_3b", "gpt_7b"} <= names
    assert {"llama_tiny", "llama_1b", "llama3_2_1b", "llama3_8b"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_builds_and_formula_matches(path):
    cfg = load(path)
    family = get_family(cfg.family)
    assert path.read_text().startswith("# "), f"{path.name}: start with a one-line comment"
    with torch.device("meta"):  # allocates nothing, so an 8B model costs no memory
        model = family.build(cfg)
    n = model.num_parameters()
    assert family.count_parameters(cfg) == n
    if path.stem in BALLPARK:
        lo, hi = BALLPARK[path.stem]
        assert lo <= n < hi, f"{path.stem} has {n:,} parameters, expected [{lo:,.0f}, {hi:,.0f})"
    if path.stem in KNOWN:
        assert n == KNOWN[path.stem], f"{path.stem} has {n:,} parameters, the model it copies {KNOWN[path.stem]:,}"
    assert family.flops_per_token(cfg, seq_len=cfg.block_size) > 6 * (n - cfg.vocab_size * cfg.n_embd)
    # Every preset is exportable to Hugging Face and back.
    hf = family.to_hf_config(cfg, bos_token_id=0, eos_token_id=0)
    assert family.from_hf_config(hf) == dataclasses.replace(cfg, activation_checkpointing=False)


@pytest.mark.parametrize("path", [p for p in PRESETS if p.stem in KNOWN], ids=lambda p: p.stem)
def test_exported_config_builds_the_same_size_in_transformers(path):
    transformers = pytest.importorskip("transformers")
    cfg = load(path)
    family = get_family(cfg.family)
    hf_cfg = transformers.AutoConfig.for_model(**family.to_hf_config(cfg, bos_token_id=1, eos_token_id=2))
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert type(hf).__name__ == family.hf_architecture
    assert sum(p.numel() for p in hf.parameters()) == KNOWN[path.stem]
