"""DPM-Solver++ (Lu et al., 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", arXiv:2211.01095): a multistep solver of the probability-flow ODE in data-prediction form, for models
trained with the DDPM objective (epsilon-, v- or sample-prediction). MONAI has no such scheduler; this module
is the paper's equations, nothing else.

Notation (the paper's). At training timestep ``t`` the noised latent is ``x_t = alpha_t x_0 + sigma_t eps`` with
``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` (``abar``: the schedule's ``alphas_cumprod``), and
``lambda_t = log(alpha_t / sigma_t)``. The model output becomes the data prediction ``x0(x_t, t)``, the clean
latent it implies (clipped to ``clip_range`` where given, as the other samplers clip theirs). One step from
``s`` to ``t`` with ``h = lambda_t - lambda_s > 0``:

- first order, which is deterministic DDIM:       ``x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) D``
  with ``D = x0(x_s, s)``;
- second order, multistep (Algorithm 2, "2M"): the same update with
  ``D = (1 + 1/(2r)) x0(x_s, s) - 1/(2r) x0(x_s', s')``, ``r = h' / h``, ``h' = lambda_s - lambda_s'``, where
  ``s'`` is the timestep before ``s``: the previous step's prediction is reused, so each step is one UNet call.

The first step has no earlier prediction and is first order. So is a step that lands on the clean latent
(``sigma = 0``, ``lambda = inf``, where ``r`` would be 0): its result is the clipped data prediction itself.
:func:`logsnr_grid` spaces the steps evenly in ``lambda`` (the DPM-Solver papers' "logSNR" spacing; on
Gaussian data, where the ODE's solution is known, 2M with even spacing in t erred several times more).
"""

from __future__ import annotations

import math

import torch

CLEAN = -1  # the timestep after the last: abar = 1, the clean latent


def logsnr_grid(alphas_cumprod: torch.Tensor, steps: int) -> list[int]:
    """``steps + 1`` training timesteps from ``T - 1`` (the pure-noise end the starting noise belongs to) down to
    0, evenly spaced in ``lambda`` (the paper's "logSNR" spacing), each the nearest integer timestep (the UNet
    was trained on integers) and kept strictly decreasing. ``steps`` UNet calls; the run ends at timestep 0,
    whose noise (``sigma_0``) is the smallest the model was trained on. With ``steps = T`` the last step goes to
    the clean latent."""
    T = len(alphas_cumprod)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must lie in [1, {T}], got {steps}")
    if steps == T:
        return list(range(T - 1, -1, -1)) + [CLEAN]
    lam = 0.5 * torch.log(alphas_cumprod.double() / (1 - alphas_cumprod.double()))
    targets = torch.linspace(float(lam[-1]), float(lam[0]), steps + 1, dtype=torch.float64)
    grid = [int(torch.argmin((lam - x).abs())) for x in targets]
    grid[0], grid[-1] = T - 1, 0
    for i in range(steps - 1, 0, -1):  # near t = 0 lambda changes fast: neighbours may round to one timestep
        grid[i] = max(grid[i], grid[i + 1] + 1)
    for i in range(1, steps + 1):
        grid[i] = min(grid[i], grid[i - 1] - 1)
    return grid


def data_prediction(model_output: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float,
                    prediction_type: str) -> torch.Tensor:
    """The clean latent ``x0`` that a model output at noise level (alpha, sigma) implies."""
    if prediction_type == "epsilon":
        return (x - sigma * model_output) / alpha
    if prediction_type == "v_prediction":  # v = alpha eps - sigma x0
        return alpha * x - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


class DPMSolverPP:
    """One sampling run of DPM-Solver++ of ``order`` 1 or 2 along ``grid``: step ``i`` goes from timestep
    ``grid[i]`` to ``grid[i + 1]`` (descending; :data:`CLEAN` is the clean latent). Holds the previous step's data prediction, so build a new one per run (as the samplers build their
    MONAI schedulers). ``step(model_output, i, x)`` returns the latent at the next timestep."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str, grid: list[int], order: int = 2,
                 clip_range: tuple[float, float] | None = None):
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order}")
        self.abar = [float(a) for a in alphas_cumprod.double()]
        self.prediction_type, self.order, self.clip_range = prediction_type, order, clip_range
        self.grid = [int(t) for t in grid]
        self._prev: tuple[torch.Tensor, int] | None = None  # (x0, timestep) of the step before

    def alpha_sigma(self, t: int) -> tuple[float, float]:
        a = 1.0 if t == CLEAN else self.abar[t]
        return math.sqrt(a), math.sqrt(1.0 - a)

    def lam(self, t: int) -> float:
        a, s = self.alpha_sigma(t)
        return math.log(a / s)

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        s, t = self.grid[i], self.grid[i + 1]
        (a_s, sig_s), (a_t, sig_t) = self.alpha_sigma(s), self.alpha_sigma(t)
        x0 = data_prediction(model_output, x, a_s, sig_s, self.prediction_type)
        if self.clip_range is not None:
            x0 = x0.clamp(self.clip_range[0], self.clip_range[1])
        d = x0
        if self.order == 2 and self._prev is not None and t != CLEAN:
            x0_prev, s_prev = self._prev
            r = (self.lam(s) - self.lam(s_prev)) / (self.lam(t) - self.lam(s))
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        self._prev = (x0, s)
        # e^-h = (sigma_t / alpha_t) / (sigma_s / alpha_s), written without logs so that t = CLEAN gives 0
        exp_neg_h = (sig_t * a_s) / (a_t * sig_s)
        return (sig_t / sig_s) * x + (a_t * (1.0 - exp_neg_h)) * d
