"""Edits of existing latents with a trained diffusion prior, as pure functions (the denoiser, the
latent, the schedule and any generator are arguments; the global RNG is never touched).

- :func:`ddim_invert`: deterministic DDIM run backwards (Song et al., 2021, sec. 4.3; Mokady et al.,
  2023): clean latent -> the noise that DDIM with the same steps turns back into it.
- :func:`ddim_from`: deterministic DDIM (eta 0) from any of its timesteps down to a clean latent.
- :func:`sdedit_start`: where SDEdit (Meng et al., 2022) starts for a strength in (0, 1].
- :func:`slerp`: spherical interpolation between two noise tensors.
- :func:`interpolate_latents`: frames between two clean latents: invert both part or all of the way
  (``depth``), slerp there, regenerate.

Only models trained with the DDPM objective (epsilon, v or sample prediction) have a DDIM chain.
"""

from __future__ import annotations

import contextlib
import math

import torch
from monai.networks.schedulers import DDIMScheduler

from vqldm.errors import VqldmError
from vqldm.sampling.samplers import Denoiser, schedule_kwargs


def _scheduler(schedule: dict, steps: int) -> DDIMScheduler:
    if schedule["type"] != "ddpm":
        raise VqldmError(f"edits invert a DDIM chain: the model was trained with the {schedule['type']} objective, "
                         f"not ddpm")
    if not 1 <= steps <= schedule["num_train_timesteps"]:
        raise VqldmError(f"--steps {steps}: must lie in [1, {schedule['num_train_timesteps']}]")
    sch = DDIMScheduler(**schedule_kwargs(schedule), clip_sample=False)
    sch.set_timesteps(num_inference_steps=steps)
    return sch


def split_output(out: torch.Tensor, x: torch.Tensor, alpha: float, prediction_type: str):
    """The model's output at noise level ``alpha`` (cumulative) -> (predicted clean latent, noise)."""
    a, b = alpha**0.5, (1.0 - alpha) ** 0.5
    if prediction_type == "v_prediction":
        return a * x - b * out, a * out + b * x
    if prediction_type == "sample":
        return out, (x - a * out) / max(b, 1e-8)
    return (x - b * out) / a, out


def _call(denoiser: Denoiser, x: torch.Tensor, t: int, condition, autocast) -> torch.Tensor:
    tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    with (autocast or contextlib.nullcontext)():
        return denoiser(x, tt, condition).float()


def _steps(timesteps, desc: str | None):
    if not desc:
        return timesteps
    from tqdm import tqdm

    return tqdm(timesteps, desc=desc, unit="step", leave=False, dynamic_ncols=True)


@torch.no_grad()
def ddim_invert(denoiser: Denoiser, z0: torch.Tensor, steps: int, schedule: dict, first: int = 0, *,
                condition=None, autocast=None, desc: str | None = None) -> torch.Tensor:
    """Clean latent ``z0`` -> the latent at DDIM timestep index ``first`` of ``steps`` steps (0: the
    first, noisiest one; :func:`ddim_from` with the same ``first`` runs it back).

    Mirrors MONAI's DDIM step (which goes from timestep t to t - T // steps, the last one to a clean
    sample): each inverse step evaluates the model at the level the latent is at and moves it to the
    next level up along the predicted noise. The clean start is read at timestep 0's level (the
    model is called there), so a sample-predicting model's noise stays defined.
    """
    sch = _scheduler(schedule, steps)
    ac, ratio = sch.alphas_cumprod, sch.num_train_timesteps // sch.num_inference_steps
    x = z0.float()
    for t in _steps([int(t) for t in reversed(sch.timesteps[first:])], desc):
        prev = max(t - ratio, 0)
        a_prev = float(ac[prev])
        out = _call(denoiser, x, prev, condition, autocast)
        x0, eps = split_output(out, x, a_prev, schedule["prediction_type"])
        x = float(ac[t]) ** 0.5 * x0 + (1.0 - float(ac[t])) ** 0.5 * eps
    return x


@torch.no_grad()
def ddim_from(denoiser: Denoiser, x: torch.Tensor, steps: int, schedule: dict, first: int = 0, *, condition=None,
              autocast=None, desc: str | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from the latent at timestep index ``first`` of ``steps`` steps to a
    clean latent (``first`` 0: from pure noise, as the ``ddim`` sampler without clipping)."""
    sch = _scheduler(schedule, steps)
    x = x.float()
    for t in _steps([int(t) for t in sch.timesteps[first:]], desc):
        x = sch.step(_call(denoiser, x, t, condition, autocast), t, x)[0]
    return x


def sdedit_start(steps: int, schedule: dict, strength: float, option: str = "--strength") -> tuple[int, int]:
    """SDEdit at ``strength`` in (0, 1]: (index of the first DDIM timestep at or below strength * T,
    that timestep). Strength 1 starts from pure noise; a small strength keeps more of the input.
    ``option`` names the setting in the one-line refusal of a value outside (0, 1]."""
    if not 0 < strength <= 1:
        raise VqldmError(f"{option} {strength}: must lie in (0, 1]")
    sch = _scheduler(schedule, steps)
    ts = [int(t) for t in sch.timesteps]
    limit = strength * (schedule["num_train_timesteps"] - 1)
    first = next((i for i, t in enumerate(ts) if t <= limit + 1e-6), len(ts) - 1)
    return first, ts[first]


def noise_to(z0: torch.Tensor, t: int, schedule: dict, generator: torch.Generator) -> torch.Tensor:
    """``z0`` noised to timestep ``t`` by the training schedule, the noise drawn from ``generator``."""
    sch = _scheduler(schedule, 1)
    noise = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0.device)
    return sch.add_noise(z0.float(), noise, torch.full((z0.shape[0],), int(t), dtype=torch.long, device=z0.device))


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation of two noise tensors at ``w`` in [0, 1] (linear where they are parallel)."""
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = float((fa @ fb) / (fa.norm() * fb.norm()).clamp_min(1e-12))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    if theta < 1e-4:
        return (1 - w) * a + w * b
    return (math.sin((1 - w) * theta) * a + math.sin(w * theta) * b) / math.sin(theta)


@torch.no_grad()
def interpolate_latents(denoiser: Denoiser, za: torch.Tensor, zb: torch.Tensor, frames: int, steps: int,
                        schedule: dict, depth: float = 1.0, *, autocast=None, progress: bool = False) -> torch.Tensor:
    """Frames 0..``frames`` between the clean latents ``za`` and ``zb`` (each (1, ...)), (frames + 1, ...).

    Both are DDIM-inverted to the timestep at or below ``depth`` x T (:func:`sdedit_start`; depth 1: all
    the way, to the chain's noise), slerped there and every frame is regenerated from that timestep
    with the same chain, so frames 0 and ``frames`` come back to ``za`` and ``zb`` up to the inversion's
    error at any depth. A smaller depth keeps the frames nearer the data (less is regenerated)."""
    first, _ = sdedit_start(steps, schedule, depth, "--depth")
    noise = ddim_invert(denoiser, torch.cat([za, zb]), steps, schedule, first, autocast=autocast,
                        desc="DDIM inversion" if progress else None)
    x = torch.cat([slerp(noise[:1], noise[1:], k / frames) for k in range(frames + 1)])
    return ddim_from(denoiser, x, steps, schedule, first, autocast=autocast, desc="regenerating" if progress else None)


def _renoise(x: torch.Tensor, a_from: float, a_to: float, generator: torch.Generator) -> torch.Tensor:
    """One forward jump of the diffusion from level ``a_from`` to the noisier ``a_to`` (cumulative alphas)."""
    r = a_to / a_from
    return r**0.5 * x + (1.0 - r) ** 0.5 * torch.randn(x.shape, generator=generator, device=generator.device).to(x)


@torch.no_grad()
def repaint(denoiser: Denoiser, z0: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, steps: int,
            schedule: dict, generator: torch.Generator, *, resample: int = 2, condition=None, autocast=None,
            desc: str | None = None) -> torch.Tensor:
    """Fill ``mask`` (1: regenerate, 0: keep; broadcast over channels) of the clean latent ``z0``
    (RePaint, Lugmayr et al., 2022, on a DDIM chain): after every DDIM step the kept region is replaced
    by ``z0`` noised to the step's level, and each step is redone ``resample`` times, jumping back up
    with fresh noise in between, so the regenerated region agrees with what it is pasted next to.
    Returns a clean latent equal to ``z0`` outside the mask."""
    sch = _scheduler(schedule, steps)
    ac, ratio = sch.alphas_cumprod, sch.num_train_timesteps // sch.num_inference_steps
    x, z0, mask = noise.float(), z0.float(), mask.float()
    for t in _steps([int(t) for t in sch.timesteps], desc):
        prev = t - ratio
        a_t, a_prev = float(ac[t]), float(ac[prev]) if prev >= 0 else 1.0
        for u in range(resample):
            x_prev = sch.step(_call(denoiser, x, t, condition, autocast), t, x)[0]
            known = z0 if prev < 0 else _renoise(z0, 1.0, a_prev, generator)
            x_prev = mask * x_prev + (1 - mask) * known
            if u < resample - 1 and prev >= 0:
                x = _renoise(x_prev, a_prev, a_t, generator)
        x = x_prev
    return mask * x + (1 - mask) * z0
