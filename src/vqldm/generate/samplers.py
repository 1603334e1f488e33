"""Samplers as pure functions: (denoiser, scheduler config, noise, steps) -> clean latents.

Each call builds its own MONAI scheduler, so no state leaks between calls. The denoiser is any
callable ``f(x, t) -> model output`` with ``t`` a (B,) tensor: a UNet, its EMA copy, a
CUDA-graph replay or a DDP module.
"""

from __future__ import annotations

from typing import Callable

import torch

from vqldm.stage2.model import build_sampling_scheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_latents(denoiser: Denoiser, scheduler_cfg: dict, noise: torch.Tensor, steps: int,
                   kind: str = "ddim", progress: bool = False, autocast=None,
                   clip_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Denoise ``noise`` (B, C, x, y, z) in ``steps`` steps of sampler ``kind`` (ddpm | ddim | rflow).

    ``clip_range`` bounds each step's predicted clean latent (ddpm/ddim), see
    :func:`vqldm.stage2.model.build_sampling_scheduler`.

    Model outputs are cast to float32 before the scheduler step, so the chain stays in fp32
    under bf16/fp16 autocast. Returns the latent in the (scaled) space the UNet was trained on.
    """
    import contextlib

    step_kw = {}
    if kind == "ddpm" and steps < scheduler_cfg["num_train_timesteps"]:
        # MONAI's DDPM step always goes from t to t-1; with fewer steps than training timesteps the
        # strided ancestral sampler is DDIM with eta = 1 (Song et al., 2021, eq. 16)
        sch = build_sampling_scheduler(scheduler_cfg, "ddim", clip_range)
        step_kw = {"eta": 1.0}
    else:
        sch = build_sampling_scheduler(scheduler_cfg, kind, clip_range if kind != "rflow" else None)
    sch.set_timesteps(num_inference_steps=steps)  # timesteps stay on the CPU: no device sync per step
    timesteps = [int(t) for t in sch.timesteps]
    x = noise.float()
    ctx = autocast or contextlib.nullcontext
    it = timesteps
    if progress:
        from tqdm import tqdm

        it = tqdm(timesteps, desc=f"{kind} sampling", unit="step", leave=False, dynamic_ncols=True)
    b = x.shape[0]
    for i, t in enumerate(it):
        tt = torch.full((b,), t, device=x.device, dtype=torch.long)
        with ctx():
            out = denoiser(x, tt)
        out = out.float()
        if kind == "rflow":
            x, _ = sch.step(out, t, x, timesteps[i + 1] if i + 1 < len(timesteps) else 0)
        else:
            x, _ = sch.step(out, t, x, **step_kw)
    return x
