"""Jobs: their records, states, events and durable store, the pure lifecycle and policies, and the
controller that drives them."""
