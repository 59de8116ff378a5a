"""Checkpoints in the store: save, stage, upload in the background, commit last; layout, retention,
export and the universal format for rescaling."""
