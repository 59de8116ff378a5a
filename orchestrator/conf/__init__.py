"""The built-in Hydra config groups, found through Hydra's package search path (pkg://orchestrator.conf)."""
