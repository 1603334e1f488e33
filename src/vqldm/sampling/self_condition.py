"""Self-conditioning (Chen et al., 2022, "Analog Bits"): the UNet also sees its own estimate of the clean
latent, as ``out_channels`` more input channels, so each denoising step can keep and refine the layout the
previous steps committed to instead of guessing it again from ``x_t`` alone.

Training: for half of each batch (its first half: batches are shuffled), a first forward pass without
gradients gives the estimate, which the second, trained pass receives; the other half receives zeros, so
the UNet also denoises without one. Sampling: every step receives the previous step's estimate (zeros at
the first step). Both feed the estimate only at timesteps ``t >= min_timestep`` and zeros below (0, the
default: at every step), so that the fine steps can be kept free of it (measured in docs/quality.md, round 9:
on the demo this does not undo the brighter foreground that self-conditioning with the timestep bias gives).

The estimate travels to the UNet call as the condition key :data:`KEY`; the denoiser of
:func:`vqldm.priors.diffusion.unet.as_denoiser` appends it to the input (zeros where none is given, so
editing and tiled sampling run a self-conditioned UNet without the feedback).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KEY = "self_cond"  # the condition key that carries the clean-latent estimate to the UNet call


@dataclass(frozen=True)
class SelfCondition:
    """How a self-conditioned UNet is fed: its estimate at timesteps ``t >= min_timestep``, zeros below."""

    min_timestep: int = 0

    def to_meta(self) -> dict:
        return {"min_timestep": self.min_timestep}

    @classmethod
    def from_meta(cls, meta: dict | None) -> "SelfCondition | None":
        """A checkpoint's ``self_condition`` record (None: the UNet is not self-conditioned)."""
        return None if meta is None else cls(int(meta.get("min_timestep", 0)))


def predicted_x0(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                 prediction_type: str) -> torch.Tensor:
    """The clean latent that a model output at ``(x_t, t)`` implies, in float32 (ε or v prediction)."""
    a = alphas_cumprod.to(x_t.device)[t.long()].float().view(-1, *([1] * (x_t.ndim - 1)))
    out, x_t = out.float(), x_t.float()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * out
    return (x_t - (1 - a).sqrt() * out) / a.sqrt()


def _kept(estimate: torch.Tensor, t: torch.Tensor, min_timestep: int) -> torch.Tensor:
    """``estimate`` where ``t >= min_timestep``, zeros elsewhere (no host sync)."""
    keep = (t >= min_timestep).view(-1, *([1] * (estimate.ndim - 1)))
    return torch.where(keep, estimate, torch.zeros_like(estimate))


def training_input(denoiser, x_t: torch.Tensor, t: torch.Tensor, condition, alphas_cumprod: torch.Tensor,
                   prediction_type: str, sc: SelfCondition) -> torch.Tensor:
    """The estimate a training batch's second pass receives: from a gradient-free first pass for the
    first half of the batch (``t >= min_timestep`` only), zeros for the rest. Static shapes: graph-safe."""
    half = x_t.shape[0] // 2
    est = torch.zeros_like(x_t, dtype=torch.float32)
    if half == 0:
        return est
    first = None if condition is None else {k: v[:half] for k, v in condition.items()}
    with torch.no_grad():
        out = denoiser(x_t[:half], t[:half], first)
        est[:half] = _kept(predicted_x0(out, x_t[:half], t[:half], alphas_cumprod, prediction_type), t[:half],
                           sc.min_timestep)
    return est


def with_estimate(condition, estimate: torch.Tensor) -> dict:
    """``condition`` (a dict of UNet conditioning arguments, or None) with the estimate added."""
    return {**(condition or {}), KEY: estimate}


def carried(condition) -> dict:
    """The estimate in a sampler's ``condition``, as a dict to merge into arguments built afresh ({} if none)."""
    return {KEY: condition[KEY]} if condition and KEY in condition else {}


class Feedback:
    """A sampling loop's estimate, carried from one step to the next (one per sampling call)."""

    def __init__(self, sc: SelfCondition, alphas_cumprod: torch.Tensor, prediction_type: str):
        self.sc, self.abar, self.prediction_type = sc, alphas_cumprod, prediction_type
        self.estimate: torch.Tensor | None = None

    def condition(self, condition, x: torch.Tensor, t: int) -> dict:
        """The step's condition: the last estimate at ``t >= min_timestep``, zeros below and at the start."""
        if self.estimate is None or t < self.sc.min_timestep:
            return with_estimate(condition, torch.zeros_like(x, dtype=torch.float32))
        return with_estimate(condition, self.estimate)

    def update(self, out: torch.Tensor, x: torch.Tensor, tt: torch.Tensor) -> None:
        self.estimate = predicted_x0(out, x, tt, self.abar, self.prediction_type)
