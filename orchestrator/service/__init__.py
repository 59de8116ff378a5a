"""The hosts of the controller: the detached actor (`orch up`), `orch run`'s embedded driver, the
client that finds or starts them, and the driver of `orch data prepare`."""
