"""Stage 1: the VQ-VAE (model, losses, codebook health, engine task, training entry)."""
