"""The diffusion prior's network: MONAI's ``DiffusionModelUNet``, rebuilt from plain constructor arguments."""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet

from vqldm.config import Config
from vqldm.priors.diffusion.covariates import token_dim
from vqldm.sampling.self_condition import KEY as SELF_COND

SELF_COND_CHANNELS = "self_condition_channels"  # network record: input channels of the clean-latent estimate


def unet_net_config(cfg: Config, num_classes: int = 0, num_covariates: int = 0) -> dict:
    """Plain-value constructor arguments of the UNet; saved in every stage-2 checkpoint. With
    ``num_classes`` the UNet gets a class embedding of ``num_classes + 1`` rows (the last: the learned null);
    with ``num_covariates`` cross-attention to that many context tokens (:mod:`.covariates`); with
    ``diffusion.self_condition`` ``out_channels`` more input channels for its own clean-latent estimate
    (:mod:`vqldm.sampling.self_condition`), recorded as ``self_condition_channels``."""
    u = cfg.diffusion
    m = len(u.num_channels)
    sc = u.out_channels if u.self_condition else 0
    heads = u.num_head_channels if isinstance(u.num_head_channels, list) else [u.num_head_channels] * m
    return {
        "spatial_dims": u.spatial_dims,
        # coarse-to-fine: the coarse view and its presence flag ride along as two more input channels
        "in_channels": u.in_channels + (COARSE_CHANNELS if u.coarse_condition else 0) + sc,
        "out_channels": u.out_channels,
        "channels": list(u.num_channels),
        "attention_levels": list(u.attention_levels),
        "num_head_channels": list(heads),
        "num_res_blocks": list(u.num_res_blocks) if isinstance(u.num_res_blocks, list) else int(u.num_res_blocks),
        "norm_num_groups": u.norm_num_groups,
        **({"num_class_embeds": num_classes + 1} if num_classes else {}),
        **({"with_conditioning": True, "cross_attention_dim": token_dim(num_covariates)} if num_covariates else {}),
        **({SELF_COND_CHANNELS: sc} if sc else {}),
    }


def self_condition_channels(net: dict) -> int:
    """Input channels a UNet takes for its own clean-latent estimate (0: not self-conditioned)."""
    return int(net.get(SELF_COND_CHANNELS, 0))


def build_unet(net: dict, flash_attention: bool = False) -> DiffusionModelUNet:
    kw = dict(net)
    kw.pop(SELF_COND_CHANNELS, None)  # a record of ours, not a MONAI argument (in_channels counts them)
    kw["channels"] = tuple(kw["channels"])
    kw["attention_levels"] = tuple(kw["attention_levels"])
    kw["num_head_channels"] = tuple(kw["num_head_channels"])
    if isinstance(kw["num_res_blocks"], list):
        kw["num_res_blocks"] = tuple(kw["num_res_blocks"])
    # flash/SDPA attention only changes the kernel, not the weights: checkpoints load either way
    return DiffusionModelUNet(**kw, use_flash_attention=flash_attention)


COARSE_CHANNELS = 2  # the coarse view, and 1 where it is given (0: dropped, the null condition)


def as_denoiser(net, extra_channels: int = 0, self_cond_channels: int = 0):
    """The UNet as the samplers' ``f(x, t, condition)``. A condition is a dict of the UNet's own
    conditioning arguments (``context``, ``class_labels``), ``concat``: channels appended to ``x``
    (a coarse-to-fine UNet's ``extra_channels``; zeros, the null condition, where none are given), and
    ``self_cond``: a self-conditioned UNet's clean-latent estimate, appended last (zeros where none is
    given; ignored by other UNets). None calls it unconditionally."""
    def call(x, t, condition=None):
        cond = dict(condition or {})
        concat = cond.pop("concat", None)
        estimate = cond.pop(SELF_COND, None)
        if concat is None and extra_channels:
            concat = x.new_zeros((x.shape[0], extra_channels, *x.shape[2:]))
        if estimate is None and self_cond_channels:
            estimate = x.new_zeros((x.shape[0], self_cond_channels, *x.shape[2:]))
        parts = [x] + [p.to(x.dtype) for p in (concat, estimate if self_cond_channels else None) if p is not None]
        return net(x=torch.cat(parts, dim=1) if len(parts) > 1 else x, timesteps=t, **cond)
    return call


def guidance_rescale(guided: torch.Tensor, reference: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al., 2024, eq. 15-16): ``guided`` with each sample's standard deviation pulled
    back to ``reference``'s by the share ``phi`` (0: ``guided`` unchanged, exactly), against the over-bright,
    over-saturated outputs a large guidance weight gives. In float32."""
    if phi == 0.0:
        return guided
    guided, reference = guided.float(), reference.float()
    dims = tuple(range(1, guided.ndim))
    scaled = guided * (reference.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12))
    return torch.lerp(guided, scaled, float(phi))


def guidance_mix(uncond: torch.Tensor, cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance, ``uncond + w (cond - uncond)``, as ``torch.lerp``: exactly ``uncond`` at
    ``w = 0`` and exactly ``cond`` at ``w = 1`` (lerp evaluates from the nearer end)."""
    return torch.lerp(uncond, cond.to(uncond.dtype), float(w))
