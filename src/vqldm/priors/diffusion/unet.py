"""The diffusion prior's network: MONAI's ``DiffusionModelUNet``, rebuilt from plain constructor arguments."""

from __future__ import annotations

from monai.networks.nets import DiffusionModelUNet

from vqldm.config import Config


def unet_net_config(cfg: Config) -> dict:
    """Plain-value constructor arguments of the UNet; saved in every stage-2 checkpoint."""
    u = cfg.diffusion
    m = len(u.num_channels)
    heads = u.num_head_channels if isinstance(u.num_head_channels, list) else [u.num_head_channels] * m
    return {
        "spatial_dims": u.spatial_dims,
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "channels": list(u.num_channels),
        "attention_levels": list(u.attention_levels),
        "num_head_channels": list(heads),
        "num_res_blocks": list(u.num_res_blocks) if isinstance(u.num_res_blocks, list) else int(u.num_res_blocks),
        "norm_num_groups": u.norm_num_groups,
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


def as_denoiser(net):
    """The UNet as the samplers' ``f(x, t, condition)``. A condition is a dict of the UNet's own
    conditioning arguments (``context``, ``class_labels``); None calls it unconditionally."""
    def call(x, t, condition=None):
        return net(x=x, timesteps=t, **(condition or {}))
    return call
