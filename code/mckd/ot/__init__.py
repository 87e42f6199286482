"""Batched optimal transport (log-domain Sinkhorn) and cost matrices."""
