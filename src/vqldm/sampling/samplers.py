"""Samplers as pure functions, in one registry: ``name -> f(denoiser, noise, steps, schedule, ...)``.

A sampler takes everything it uses as an argument (the denoiser, the starting noise, the number of
steps, the noise schedule the model was trained with, a ``torch.Generator`` for any noise it
draws, a condition, and for a self-conditioned UNet its :class:`~vqldm.sampling.self_condition.SelfCondition`)
and returns clean latents; it builds its own MONAI scheduler per call, so no
state leaks between calls, and it never touches the global RNG. The denoiser is any callable
``f(x, t, condition) -> model output`` with ``t`` a (B,) tensor: a UNet, its EMA copy, a CUDA-graph
replay or a DDP module.

Adding a sampler is one function decorated with :func:`register`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from vqldm.errors import VqldmError
from vqldm.sampling.dpm_solver import DPMSolverPP, logsnr_grid
from vqldm.sampling.self_condition import Feedback, SelfCondition

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class Sampler:
    fn: Callable[..., torch.Tensor]
    objective: str  # the training objective (schedule["type"]) whose models it samples


SAMPLERS: dict[str, Sampler] = {}


def register(name: str, objective: str):
    """Add ``fn`` to :data:`SAMPLERS` as ``name``, for models trained with ``objective``."""
    def add(fn):
        SAMPLERS[name] = Sampler(fn, objective)
        return fn
    return add


def schedule_kwargs(schedule: dict) -> dict:
    """MONAI DDPM/DDIM scheduler arguments of a saved noise schedule (``scheduler`` in a checkpoint)."""
    kw = {"num_train_timesteps": schedule["num_train_timesteps"], "schedule": schedule["schedule"],
          "prediction_type": schedule["prediction_type"]}
    if schedule["schedule"] in ("linear_beta", "scaled_linear_beta"):
        kw.update(beta_start=schedule["beta_start"], beta_end=schedule["beta_end"])
    return kw


def _clip(clip_range: tuple[float, float] | None) -> dict:
    """MONAI's default clip of the predicted clean sample to [-1, 1] is wrong for latents and stays
    off. ``clip_range`` instead bounds it by the range every real latent lies in (the scaled
    codebook's), which tames the wild x0 predictions of the first, almost pure-noise steps."""
    if clip_range is None:
        return {"clip_sample": False}
    return {"clip_sample": True, "clip_sample_min": float(clip_range[0]), "clip_sample_max": float(clip_range[1])}


def _loop(timesteps: list[int], step, denoiser: Denoiser, noise: torch.Tensor, condition, autocast,
          desc: str | None, feedback: Feedback | None = None) -> torch.Tensor:
    """The denoising loop every sampler shares: ``x = step(model_output, i, t, x)`` for each timestep.

    Model outputs are cast to float32 before the scheduler step, so the chain stays in fp32 under
    bf16/fp16 autocast. A self-conditioned UNet's ``feedback`` hands each step the last step's estimate.
    """
    x = noise.float()
    ctx = autocast or contextlib.nullcontext
    it = timesteps
    if desc:
        from tqdm import tqdm

        it = tqdm(timesteps, desc=desc, unit="step", leave=False, dynamic_ncols=True)
    b = x.shape[0]
    for i, t in enumerate(it):
        tt = torch.full((b,), t, device=x.device, dtype=torch.long)
        with ctx():
            out = denoiser(x, tt, condition if feedback is None else feedback.condition(condition, x, t))
        if feedback is not None:
            feedback.update(out, x, tt)
        x = step(out.float(), i, t, x)
    return x


def _feedback(schedule: dict, self_condition: SelfCondition | None) -> Feedback | None:
    """The estimate carrier of a self-conditioned UNet (None for a plain one); DDPM-objective models only."""
    if self_condition is None:
        return None
    if schedule["type"] != "ddpm":
        raise VqldmError(f"self-conditioning needs a ddpm-objective model, not {schedule['type']}")
    abar = DDPMScheduler(**schedule_kwargs(schedule)).alphas_cumprod
    return Feedback(self_condition, abar, schedule["prediction_type"])


def _ddim_like(sch, eta: float, generator, denoiser, noise, steps, condition, autocast, desc,
               feedback: Feedback | None) -> torch.Tensor:
    sch.set_timesteps(num_inference_steps=steps)  # timesteps stay on the CPU: no device sync per step
    timesteps = [int(t) for t in sch.timesteps]
    kw = {"eta": eta, "generator": generator} if eta > 0 else {}
    return _loop(timesteps, lambda out, i, t, x: sch.step(out, t, x, **kw)[0], denoiser, noise, condition,
                 autocast, desc, feedback)


@register("ddim", objective="ddpm")
def ddim(denoiser: Denoiser, noise: torch.Tensor, steps: int, schedule: dict, *, generator=None, condition=None,
         clip_range=None, autocast=None, desc: str | None = None, self_condition=None) -> torch.Tensor:
    """Deterministic DDIM (Song et al., 2021): draws no noise after the start."""
    sch = DDIMScheduler(**schedule_kwargs(schedule), **_clip(clip_range))
    return _ddim_like(sch, 0.0, generator, denoiser, noise, steps, condition, autocast, desc,
                      _feedback(schedule, self_condition))


@register("ddpm", objective="ddpm")
def ddpm(denoiser: Denoiser, noise: torch.Tensor, steps: int, schedule: dict, *, generator=None, condition=None,
         clip_range=None, autocast=None, desc: str | None = None, self_condition=None) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al., 2020); each step's noise comes from ``generator``.

    MONAI's DDPM step always goes from t to t-1; with fewer steps than training timesteps the
    strided ancestral sampler is DDIM with eta = 1 (Song et al., 2021, eq. 16).
    """
    feedback = _feedback(schedule, self_condition)
    if steps < schedule["num_train_timesteps"]:
        sch = DDIMScheduler(**schedule_kwargs(schedule), **_clip(clip_range))
        return _ddim_like(sch, 1.0, generator, denoiser, noise, steps, condition, autocast, desc, feedback)
    sch = DDPMScheduler(**schedule_kwargs(schedule), **_clip(clip_range))
    sch.set_timesteps(num_inference_steps=steps)
    timesteps = [int(t) for t in sch.timesteps]
    return _loop(timesteps, lambda out, i, t, x: sch.step(out, t, x, generator=generator)[0], denoiser, noise,
                 condition, autocast, desc, feedback)


@register("dpmpp_2m", objective="ddpm")
def dpmpp_2m(denoiser: Denoiser, noise: torch.Tensor, steps: int, schedule: dict, *, generator=None, condition=None,
             clip_range=None, autocast=None, desc: str | None = None, self_condition=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al., 2022; ``sampling/dpm_solver.py``): a deterministic second-order multistep
    solver for few steps (5 to 10), on timesteps evenly spaced in log-SNR from the pure-noise end to timestep 0.
    Draws no noise after the start; ``clip_range`` bounds each step's predicted clean latent."""
    abar = DDPMScheduler(**schedule_kwargs(schedule)).alphas_cumprod  # MONAI's schedule, as the model was trained
    grid = logsnr_grid(abar, steps)
    solver = DPMSolverPP(abar, schedule["prediction_type"], grid, order=2, clip_range=clip_range)
    return _loop(grid[:-1], lambda out, i, t, x: solver.step(out, i, x), denoiser, noise, condition, autocast, desc,
                 _feedback(schedule, self_condition))


@register("rflow", objective="rflow")
def rflow(denoiser: Denoiser, noise: torch.Tensor, steps: int, schedule: dict, *, generator=None, condition=None,
          clip_range=None, autocast=None, desc: str | None = None, self_condition=None) -> torch.Tensor:
    """Euler integration of a rectified-flow velocity (Liu et al., 2023); ``clip_range`` does not apply."""
    _feedback(schedule, self_condition)  # refuses self-conditioning: rflow models are never trained with it
    sch = RFlowScheduler(num_train_timesteps=schedule["num_train_timesteps"], use_discrete_timesteps=False,
                         use_timestep_transform=False)
    sch.set_timesteps(num_inference_steps=steps)
    timesteps = [int(t) for t in sch.timesteps]

    def step(out, i, t, x):
        return sch.step(out, t, x, timesteps[i + 1] if i + 1 < len(timesteps) else 0)[0]

    return _loop(timesteps, step, denoiser, noise, condition, autocast, desc)


def default_sampler(schedule: dict, configured: str | None = None) -> str:
    """The sampler a model trained with ``schedule`` uses unless told otherwise: ``configured``
    (``diffusion.sampler``) where set, else ddim for a DDPM-trained model and rflow for rflow."""
    if configured is not None:
        return configured
    return "rflow" if schedule["type"] == "rflow" else "ddim"


def check_sampler(name: str, schedule: dict, what: str = "--scheduler") -> None:
    """Refuse, in one line, a sampler that does not exist or does not fit the model's objective."""
    if name not in SAMPLERS:
        raise VqldmError(f"{what} {name}: no such sampler; choose one of {', '.join(sorted(SAMPLERS))}")
    fits = sorted(n for n, s in SAMPLERS.items() if s.objective == schedule["type"])
    if SAMPLERS[name].objective != schedule["type"]:
        raise VqldmError(f"{what} {name}: the model was trained with the {schedule['type']} objective; "
                         f"use {' or '.join(fits)}")


@torch.no_grad()
def sample_latents(name: str, denoiser: Denoiser, noise: torch.Tensor, steps: int, schedule: dict,
                   **kw) -> torch.Tensor:
    """Run sampler ``name`` (see :data:`SAMPLERS`); returns latents in the space the model learned."""
    check_sampler(name, schedule)
    return SAMPLERS[name].fn(denoiser, noise, steps, schedule, **kw)
