"""Data: sources in the store, tokenized shards and their manifest, and each rank's slice of the
global sample order."""
