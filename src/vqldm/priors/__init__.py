"""Priors over the stage-1 latent; each sits in its own package (``priors/diffusion``, ...)."""
