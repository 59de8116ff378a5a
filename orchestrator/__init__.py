"""orch: a distributed pretrain -> fine-tune orchestrator on Ray Train and DeepSpeed ZeRO."""

__version__ = "0.1.0"
