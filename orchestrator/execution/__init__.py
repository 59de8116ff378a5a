"""One job on Ray: its launcher, its runner actor (which owns one Ray Train run), the checks made
before workers start, and its W&B feed."""
