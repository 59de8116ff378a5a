"""The training loop on each worker (the only place that knows DeepSpeed) and its parts."""
