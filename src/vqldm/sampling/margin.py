"""Sampling with a margin: denoise a latent a few cells larger than asked on each side, then crop it.

The UNet pads its convolutions with zeros, so the cells at a latent's edge see the edge. A real volume
is a window on a larger field, and its filaments run through its faces as often as anywhere else. The
demo prior's samples hold fewer filaments there (docs/quality.md, round 12: 19 % of their skeleton
segments lie within 2 voxels of an x or y face, against 26 % in the real volumes, and their skeleton is
23 % shorter in all). Sampling a larger latent and keeping its centre makes the kept edge cells interior
ones: with one cell in x and y, 27 % of the segments lie there and the skeleton is 12 % short; but the
crop cuts more filaments into pieces, so the demo preset leaves it off.
``diffusion.sampling_margin`` gives the margin per axis in latent cells ((0, 0, 0): the asked size).
"""

from __future__ import annotations

import torch


def padded(latent_shape: list[int], margin: list[int]) -> list[int]:
    """(D, x, y, z) grown by ``margin`` latent cells on both sides of each spatial axis."""
    return [latent_shape[0]] + [n + 2 * m for n, m in zip(latent_shape[1:], margin)]


def cropped(z: torch.Tensor, margin: list[int]) -> torch.Tensor:
    """The centre of a (B, D, x, y, z) latent, ``margin`` cells cut from both sides of each spatial axis."""
    if not any(margin):
        return z
    return z[(slice(None), slice(None)) + tuple(slice(m, n - m) for m, n in zip(margin, z.shape[2:]))].contiguous()
