"""Every model preset in conf/model/ builds a valid GPT of the size its name promises (meta device, no memory)."""

from pathlib import Path

import pytest
import torch
import yaml

from model import GPT, GPTConfig, count_parameters, flops_per_token, gpt_to_hf_config, hf_config_to_gpt

PRESETS = sorted((Path(__file__).resolve().parents[2] / "orchestrator" / "conf" / "model").glob("*.yaml"))

# Parameter counts (tied head once, position embeddings included) each named preset must land in.
BALLPARK = {
    "gpt_tiny": (0, 1_000_000),
    "gpt2_124m": (120e6, 130e6),
    "gpt2_350m": (340e6, 370e6),
    "gpt_1_3b": (1.2e9, 1.45e9),
    "gpt_7b": (6.5e9, 7.0e9),
}


def load(path: Path) -> GPTConfig:
    raw = yaml.safe_load(path.read_text())
    assert raw.pop("name") == path.stem, f"{path.name}: name must equal the file name"
    return GPTConfig(**raw)


def test_presets_found():
    assert {"gpt_tiny", "gpt_small", "gpt2_124m", "gpt2_350m", "gpt_1_3b", "gpt_7b"} <= {p.stem for p in PRESETS}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_builds_and_formula_matches(path):
    cfg = load(path)
    assert path.read_text().startswith("# "), f"{path.name}: start with a one-line comment"
    with torch.device("meta"):  # allocates nothing, so gpt_7b costs no memory
        model = GPT(cfg)
    n = model.num_parameters()
    assert count_parameters(cfg) == n
    if path.stem in BALLPARK:
        lo, hi = BALLPARK[path.stem]
        assert lo <= n < hi, f"{path.stem} has {n:,} parameters, expected [{lo:,.0f}, {hi:,.0f})"
    assert flops_per_token(cfg, seq_len=cfg.block_size) > 6 * n
    # Every preset is exportable to Hugging Face GPT-2 and back.
    assert hf_config_to_gpt(gpt_to_hf_config(cfg, bos_token_id=0, eos_token_id=0)) == GPTConfig(
        **{**cfg.__dict__, "activation_checkpointing": False}
    )
