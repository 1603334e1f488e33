"""The latent-diffusion prior: UNet, objective (noising and targets), task, training, pipeline."""
