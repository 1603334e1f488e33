"""The one decode path from a prior's latent to volumes: unscale -> snap to the codebook -> decode.

Training previews and ``vqldm sample`` both call :func:`decode_latents`, so a preview shows exactly
what sampling writes.
"""

from __future__ import annotations

import contextlib

import torch

from vqldm.autoencoder.calibration import apply_calibration
from vqldm.autoencoder.model import snap_to_codebook
from vqldm.data.pipeline import to_unit
from vqldm.latents import LatentNorm


@torch.no_grad()
def decode_latents(vqvae: torch.nn.Module, z: torch.Tensor, norm: LatentNorm, intensity_range, snap: bool,
                   autocast=None, calibration: dict | None = None) -> torch.Tensor:
    """Normalised latent (B, D, x, y, z) -> volumes in [0, 1], (B, 1, X, Y, Z) float32 on the CPU.

    ``norm``: how the prior saw the latent (undone first). ``snap``: replace each latent vector by its
    nearest codebook entry (the quantised decode of VQ-LDM). ``intensity_range``: the network range
    the VQ-VAE was trained in (its checkpoint's). ``calibration``: the stage-1 checkpoint's
    ``intensity_calibration`` table, if any (:mod:`vqldm.autoencoder.calibration`).
    """
    z = norm.denormalize(z)
    if snap:
        z = snap_to_codebook(vqvae, z)
    with (autocast or contextlib.nullcontext)():
        img = vqvae.decode(z)
    return apply_calibration(to_unit(img.float(), intensity_range), calibration).clamp(0, 1).cpu()


@torch.no_grad()
def decode_codes(vqvae: torch.nn.Module, codes: torch.Tensor, intensity_range, autocast=None,
                 calibration: dict | None = None) -> torch.Tensor:
    """Code indices (B, x, y, z) -> volumes in [0, 1], (B, 1, X, Y, Z) float32 on the CPU: each index
    becomes its codebook vector, then the same decode as :func:`decode_latents`."""
    z = vqvae.quantizer.quantizer.embed(codes.to(next(vqvae.parameters()).device).long())
    return decode_latents(vqvae, z.float(), LatentNorm(1.0), intensity_range, snap=False, autocast=autocast,
                          calibration=calibration)
