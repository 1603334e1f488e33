"""Coarse-to-fine: a diffusion prior conditioned on a coarse view of the volume it generates.

The coarse view is the volume downsampled by the VQ-VAE's stride: the mean intensity (in [0, 1]) of
each latent voxel's image block (:func:`vqldm.latents.block_means`), so it lies on the latent grid and
joins the UNet's input as one more channel, with a second channel that is 1 where the view is given.
In training the view is dropped (both channels 0) with probability ``diffusion.condition_drop_prob``,
so one network learns the conditional and the unconditional prediction, and sampling can mix them
(classifier-free guidance, ``--guidance W``). ``vqldm sample --cond-volume FILE`` gives the view of a
volume; every sample then matches it when downsampled and differs in the fine detail. With
``diffusion.coarse_view: projection`` the view is the block means' mean along z: the UNet sees a 2D
image of the field (a widefield-like projection), and samples are volumes that project to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vqldm.data.io import read_volume
from vqldm.errors import VqldmError
from vqldm.latents import block_means


def coarse_concat(coarse: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The UNet's extra input channels for coarse views (B, 1, x, y, z): the view where ``keep`` (B,) is
    1 and 0 where it is 0, then ``keep`` itself as the presence channel."""
    k = keep.to(coarse.dtype).view(-1, 1, *([1] * (coarse.ndim - 2)))
    return torch.cat([coarse * k, k.expand_as(coarse)], dim=1)


def as_view(coarse: torch.Tensor, kind: str) -> torch.Tensor:
    """The view a coarse-to-fine UNet sees of block means (B, 1, x, y, z): ``volume``, the block means
    themselves; ``projection``, their mean along z, repeated along z (a 2D image of the field)."""
    return coarse.mean(dim=-1, keepdim=True).expand_as(coarse) if kind == "projection" else coarse


def condition_volume(path: str | Path, unit, patch: list[int], latent: list[int], stride: int,
                     kind: str = "volume") -> torch.Tensor:
    """The coarse view (1, 1, x, y, z) of the volume in ``path``, normalised as training normalises
    (``unit``: array -> [0, 1]); it must have the samples' size ``patch``, or for a ``projection`` view
    also (X, Y, 1): the mean projection along z itself. One line naming the file where it cannot be read
    or has another size."""
    vol = read_volume(path).array  # a VqldmError naming the file where it cannot be read
    if kind == "projection" and list(vol.shape) == list(patch[:2]) + [1]:
        vol = np.repeat(vol, patch[2], axis=2)  # a 2D image: the same view as any volume projecting to it
    if list(vol.shape) != list(patch):
        also = f" or {list(patch[:2]) + [1]} (a projection along z)" if kind == "projection" else ""
        raise VqldmError(f"--cond-volume {path}: shape {list(vol.shape)}, but the samples are {list(patch)} "
                         f"(the training patch){also}; give a volume of that size, its coarse view is taken here")
    x = torch.from_numpy(np.clip(unit(vol), 0.0, 1.0).astype(np.float32))[None, None]
    coarse = as_view(block_means(x, stride), kind)
    if list(coarse.shape[2:]) != list(latent):
        raise VqldmError(f"--cond-volume {path}: its coarse view {list(coarse.shape[2:])} does not match the "
                         f"latent grid {list(latent)}")
    return coarse
