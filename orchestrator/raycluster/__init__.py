"""Talking to Ray itself: connect to a cluster (or start the embedded one), the local loopback
cluster of `orch up`/`orch down`, and the Ray Jobs API of a head's dashboard."""
