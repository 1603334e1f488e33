"""The diffusion objective: the noise schedule, which timesteps training draws, how a latent is
noised, and what the UNet learns to predict (ε, v, or the rectified-flow velocity)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from vqldm.config import Config
from vqldm.sampling.samplers import schedule_kwargs
from vqldm.sampling.self_condition import SelfCondition, training_input, with_estimate


def scheduler_config(cfg: Config) -> dict:
    """The noise schedule as plain values; saved in every stage-2 checkpoint as ``scheduler``."""
    s = cfg.diffusion.scheduler
    return {"type": s.type, "num_train_timesteps": s.num_train_timesteps, "schedule": s.schedule,
            "beta_start": s.beta_start, "beta_end": s.beta_end, "prediction_type": s.prediction_type}


def build_train_scheduler(sc: dict):
    """The MONAI scheduler that defines the training objective (noising and target)."""
    if sc["type"] == "rflow":
        return RFlowScheduler(num_train_timesteps=sc["num_train_timesteps"], use_discrete_timesteps=False,
                              sample_method="logit-normal", use_timestep_transform=False)
    return DDPMScheduler(**schedule_kwargs(sc), clip_sample=False)


def training_target(scheduler, sc: dict, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict at (x_t, t)."""
    if sc["type"] == "rflow":
        return x0 - noise  # MONAI's RFlow step integrates v = x0 - noise
    if sc["prediction_type"] == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


class Objective:
    """Timesteps, noising and the loss of one saved noise schedule ``sc``.

    Draws its random numbers on the latent's device, so a CUDA graph replay draws fresh ones.
    """

    def __init__(self, sc: dict, timestep_bias: float = 0.0, device="cpu", self_condition: SelfCondition | None = None):
        self.sc = dict(sc)
        self.self_condition = self_condition  # a self-conditioned UNet's feed (:mod:`vqldm.sampling.self_condition`)
        self.scheduler = build_train_scheduler(sc)
        self.num_train_timesteps = sc["num_train_timesteps"]
        self.timestep_bias = float(timestep_bias)
        # the inverse-CDF exponent lives on the device: a CUDA-graph replay reads a later switch to uniform
        self._exponent = torch.full((), 1.0 / (1.0 + self.timestep_bias), device=device)
        self.biased = self.timestep_bias > 0.0

    def set_biased(self, on: bool) -> None:
        """Draw with the bias (``on``) or uniformly from the next step on (``timestep_bias_epochs``)."""
        self.biased = bool(on) and self.timestep_bias > 0.0
        self._exponent.fill_(1.0 / (1.0 + self.timestep_bias) if self.biased else 1.0)

    def sample_timesteps(self, z0: torch.Tensor) -> torch.Tensor:
        """One training timestep per latent: uniform, or with ``timestep_bias`` b > 0 drawn with density
        proportional to t^b (b = 1: twice as many at the noisy end as uniform, none at t = 0)."""
        if self.sc["type"] == "rflow":
            return self.scheduler.sample_timesteps(z0).long()
        n, T = z0.shape[0], self.num_train_timesteps
        if self.timestep_bias == 0.0:
            return torch.randint(0, T, (n,), device=z0.device)
        u = torch.rand(n, device=z0.device)  # inverse CDF of t^b on [0, T); exponent 1 once uniform
        return (T * u.pow(self._exponent)).long().clamp_(0, T - 1)

    def loss(self, denoiser, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, condition=None) -> torch.Tensor:
        """Mean squared error of ``denoiser(x_t, t, condition)`` to the training target. A self-conditioned
        UNet gets its own estimate for half the batch while training; in validation (no gradients) zeros."""
        x_t = self.scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
        if self.self_condition is not None and torch.is_grad_enabled():
            est = training_input(denoiser, x_t, t, condition, self.scheduler.alphas_cumprod, self.sc["prediction_type"],
                                 self.self_condition)
            condition = with_estimate(condition, est)
        pred = denoiser(x_t, t, condition)
        return F.mse_loss(pred.float(), training_target(self.scheduler, self.sc, z0, noise, t).float())
