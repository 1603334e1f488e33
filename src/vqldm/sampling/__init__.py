"""Sampling: the sampler registry (pure functions) and the one decode path."""
