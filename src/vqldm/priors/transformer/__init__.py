"""The token prior: an autoregressive transformer on the VQ-VAE's code indices (model, cached sampler,
task, training, pipeline)."""
