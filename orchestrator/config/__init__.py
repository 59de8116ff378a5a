"""Configs: Hydra composes conf/ once into typed dataclasses (schema), which everything past the
entry points receives."""
