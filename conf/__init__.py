"""The built-in Hydra config groups, found through Hydra's package search path (pkg://orchestrator.conf).

In the repository this folder is `conf/` at the top (the design card's layout); the package
`orchestrator.conf` is a link to it, so a wheel and an editable install carry the same files."""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent  # (the one place that says where the built-in groups are)
