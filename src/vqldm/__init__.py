"""vqldm: 3D VQ-latent diffusion on MONAI (VQ-VAE stage 1, latent diffusion stage 2)."""

__version__ = "0.1.0"
