"""The diffusion prior's network: MONAI's ``DiffusionModelUNet``, rebuilt from plain constructor arguments."""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet

from vqldm.config import Config
from vqldm.priors.diffusion.covariates import token_dim


def unet_net_config(cfg: Config, num_classes: int = 0, num_covariates: int = 0) -> dict:
    """Plain-value constructor arguments of the UNet; saved in every stage-2 checkpoint. With
    ``num_classes`` the UNet gets a class embedding of ``num_classes + 1`` rows (the last: the learned null);
    with ``num_covariates`` cross-attention to that many context tokens (:mod:`.covariates`)."""
    u = cfg.diffusion
    m = len(u.num_channels)
    heads = u.num_head_channels if isinstance(u.num_head_channels, list) else [u.num_head_channels] * m
    return {
        "spatial_dims": u.spatial_dims,
        # coarse-to-fine: the coarse view and its presence flag ride along as two more input channels
        "in_channels": u.in_channels + (COARSE_CHANNELS if u.coarse_condition else 0),
        "out_channels": u.out_channels,
        "channels": list(u.num_channels),
        "attention_levels": list(u.attention_levels),
        "num_head_channels": list(heads),
        "num_res_blocks": list(u.num_res_blocks) if isinstance(u.num_res_blocks, list) else int(u.num_res_blocks),
        "norm_num_groups": u.norm_num_groups,
        **({"num_class_embeds": num_classes + 1} if num_classes else {}),
        **({"with_conditioning": True, "cross_attention_dim": token_dim(num_covariates)} if num_covariates else {}),
    }


def build_unet(net: dict, flash_attention: bool = False) -> DiffusionModelUNet:
    kw = dict(net)
    kw["channels"] = tuple(kw["channels"])
    kw["attention_levels"] = tuple(kw["attention_levels"])
    kw["num_head_channels"] = tuple(kw["num_head_channels"])
    if isinstance(kw["num_res_blocks"], list):
        kw["num_res_blocks"] = tuple(kw["num_res_blocks"])
    # flash/SDPA attention only changes the kernel, not the weights: checkpoints load either way
    return DiffusionModelUNet(**kw, use_flash_attention=flash_attention)


COARSE_CHANNELS = 2  # the coarse view, and 1 where it is given (0: dropped, the null condition)


def as_denoiser(net, extra_channels: int = 0):
    """The UNet as the samplers' ``f(x, t, condition)``. A condition is a dict of the UNet's own
    conditioning arguments (``context``, ``class_labels``) and ``concat``: channels appended to ``x``
    (a coarse-to-fine UNet's ``extra_channels``; zeros, the null condition, where none are given).
    None calls it unconditionally."""
    def call(x, t, condition=None):
        cond = dict(condition or {})
        concat = cond.pop("concat", None)
        if concat is None and extra_channels:
            concat = x.new_zeros((x.shape[0], extra_channels, *x.shape[2:]))
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        return net(x=x, timesteps=t, **cond)
    return call


def guidance_mix(uncond: torch.Tensor, cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance, ``uncond + w (cond - uncond)``, as ``torch.lerp``: exactly ``uncond`` at
    ``w = 0`` and exactly ``cond`` at ``w = 1`` (lerp evaluates from the nearer end)."""
    return torch.lerp(uncond, cond.to(uncond.dtype), float(w))
