"""The stage-2 network and noise schedulers: MONAI ``DiffusionModelUNet``, DDPM/DDIM and rectified flow."""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

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


def scheduler_config(cfg: Config) -> dict:
    s = cfg.diffusion.scheduler
    return {"type": s.type, "num_train_timesteps": s.num_train_timesteps, "schedule": s.schedule,
            "beta_start": s.beta_start, "beta_end": s.beta_end, "prediction_type": s.prediction_type}


def _betas(sc: dict) -> dict:
    if sc["schedule"] in ("linear_beta", "scaled_linear_beta"):
        return {"beta_start": sc["beta_start"], "beta_end": sc["beta_end"]}
    return {}


def build_train_scheduler(sc: dict):
    """The scheduler that defines the training objective (noising and target)."""
    if sc["type"] == "rflow":
        return RFlowScheduler(num_train_timesteps=sc["num_train_timesteps"], use_discrete_timesteps=False,
                              sample_method="logit-normal", use_timestep_transform=False)
    return DDPMScheduler(num_train_timesteps=sc["num_train_timesteps"], schedule=sc["schedule"],
                         prediction_type=sc["prediction_type"], clip_sample=False, **_betas(sc))


def build_sampling_scheduler(sc: dict, kind: str, clip_range: tuple[float, float] | None = None):
    """A sampler for a model trained with ``sc``: ddpm or ddim (for DDPM training) or rflow.

    MONAI's default clip of the predicted clean sample to [-1, 1] is wrong for latents and stays
    off. ``clip_range`` instead bounds it by the range every real latent lies in (the scaled
    codebook's), which tames the wild x0 predictions of the first, almost pure-noise steps.
    """
    if sc["type"] == "rflow":
        if kind != "rflow":
            raise ValueError(f"a rectified-flow model samples with the rflow scheduler, not {kind}")
        return RFlowScheduler(num_train_timesteps=sc["num_train_timesteps"], use_discrete_timesteps=False,
                              use_timestep_transform=False)
    clip = {"clip_sample": False}
    if clip_range is not None:
        clip = {"clip_sample": True, "clip_sample_min": float(clip_range[0]), "clip_sample_max": float(clip_range[1])}
    if kind == "ddpm":
        return DDPMScheduler(num_train_timesteps=sc["num_train_timesteps"], schedule=sc["schedule"],
                             prediction_type=sc["prediction_type"], **clip, **_betas(sc))
    if kind == "ddim":
        return DDIMScheduler(num_train_timesteps=sc["num_train_timesteps"], schedule=sc["schedule"],
                             prediction_type=sc["prediction_type"], **clip, **_betas(sc))
    raise ValueError(f"a DDPM-trained model samples with ddpm or ddim, not {kind}")


def default_sampler(sc: dict) -> str:
    return "rflow" if sc["type"] == "rflow" else "ddim"


def training_target(scheduler, sc: dict, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict at (x_t, t)."""
    if sc["type"] == "rflow":
        return x0 - noise  # MONAI's RFlow step integrates v = x0 - noise
    if sc["prediction_type"] == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise
