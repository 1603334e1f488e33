"""Coarse-to-fine: a diffusion prior conditioned on a coarse view of the volume it generates.

The coarse view is the volume downsampled by the VQ-VAE's stride: the mean intensity (in [0, 1]) of
each latent voxel's image block (:func:`vqldm.latents.block_means`), so it lies on the latent grid and
joins the UNet's input as one more channel, with a second channel that is 1 where the view is given.
In training the view is dropped (both channels 0) with probability ``diffusion.condition_drop_prob``,
so one network learns the conditional and the unconditional prediction, and sampling can mix them
(classifier-free guidance, ``--guidance W``). ``vqldm sample --cond-volume FILE`` gives the view of a
volume; every sample then matches it when downsampled and differs in the fine detail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vqldm.data.io import read_volume
from vqldm.errors import VqldmError
from vqldm.latents import block_means
from vqldm.priors.diffusion.unet import guidance_mix


def coarse_concat(coarse: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The UNet's extra input channels for coarse views (B, 1, x, y, z): the view where ``keep`` (B,) is
    1 and 0 where it is 0, then ``keep`` itself as the presence channel."""
    k = keep.to(coarse.dtype).view(-1, 1, *([1] * (coarse.ndim - 2)))
    return torch.cat([coarse * k, k.expand_as(coarse)], dim=1)


def coarse_guided(denoiser, coarse: torch.Tensor | None, w: float = 1.0):
    """A coarse-to-fine UNet's call: conditioned on ``coarse`` (1, 1, x, y, z) for every sample of a batch,
    with guidance ``w`` (``null + w (cond - null)``; exactly the conditional prediction at 1); None: the
    null condition, i.e. unconditional sampling."""
    def concat(x, present: bool):
        keep = torch.full((x.shape[0],), 1.0 if present else 0.0, device=x.device)
        view = coarse.to(x.device).expand(x.shape[0], *coarse.shape[1:]) if present else x.new_zeros(
            (x.shape[0], 1, *x.shape[2:]))
        return coarse_concat(view, keep)

    def call(x, t, condition=None):
        extra = {k: v for k, v in (condition or {}).items() if k != "concat"}
        if coarse is None:
            return denoiser(x, t, {**extra, "concat": concat(x, False)})
        cond = denoiser(x, t, {**extra, "concat": concat(x, True)})
        if w == 1.0:
            return cond
        return guidance_mix(denoiser(x, t, {**extra, "concat": concat(x, False)}), cond, w)
    return call


def condition_volume(path: str | Path, unit, patch: list[int], latent: list[int], stride: int) -> torch.Tensor:
    """The coarse view (1, 1, x, y, z) of the volume in ``path``, normalised as training normalises
    (``unit``: array -> [0, 1]); it must have the samples' size ``patch``. One line naming the file
    where it cannot be read or has another size."""
    vol = read_volume(path).array  # a VqldmError naming the file where it cannot be read
    if list(vol.shape) != list(patch):
        raise VqldmError(f"--cond-volume {path}: shape {list(vol.shape)}, but the samples are {list(patch)} "
                         f"(the training patch); give a volume of that size, its coarse view is taken here")
    x = torch.from_numpy(np.clip(unit(vol), 0.0, 1.0).astype(np.float32))[None, None]
    coarse = block_means(x, stride)
    if list(coarse.shape[2:]) != list(latent):
        raise VqldmError(f"--cond-volume {path}: its coarse view {list(coarse.shape[2:])} does not match the "
                         f"latent grid {list(latent)}")
    return coarse
