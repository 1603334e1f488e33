"""The few-step sampler (issue 20): DPM-Solver++(2M), ``vqldm sample --scheduler dpmpp_2m``."""

from __future__ import annotations

import itertools

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from vqldm.sampling.dpm_solver import CLEAN, DPMSolverPP, logsnr_grid
from vqldm.sampling.samplers import sample_latents, schedule_kwargs

SCHED = {"type": "ddpm", "num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 0.0015,
         "beta_end": 0.0195, "prediction_type": "epsilon"}
ABAR = DDPMScheduler(**schedule_kwargs(SCHED)).alphas_cumprod


def _some_model(x, t, c):
    """A smooth, nonlinear, time-dependent stand-in for a trained UNet (a fresh MONAI UNet outputs zeros)."""
    tt = t.view(-1, 1, 1, 1, 1).float() / 1000
    return torch.tanh(x * (1 + tt)) + 0.3 * torch.sin(3 * x + tt)


def _run(solver: DPMSolverPP, denoiser, noise: torch.Tensor) -> torch.Tensor:
    x = noise
    for i, t in enumerate(solver.grid[:-1]):
        x = solver.step(denoiser(x, torch.full((x.shape[0],), t, dtype=torch.long), None), i, x)
    return x


def _gaussian_denoiser(prediction_type: str, s2: float):
    """The exact model output for data ~ N(0, s2): E[eps | x_t] or E[v | x_t]."""
    def den(x, t, c):
        a = ABAR[t].view(-1, 1, 1, 1, 1).double()
        alpha, sigma, var = a.sqrt(), (1 - a).sqrt(), a * s2 + 1 - a
        eps, x0 = sigma * x / var, alpha * s2 * x / var
        return eps if prediction_type == "epsilon" else alpha * eps - sigma * x0
    return den


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@torch.no_grad()
def test_first_order_dpm_solver_pp_is_deterministic_ddim_on_the_same_timesteps(prediction_type):
    """Lu et al. 2022: DPM-Solver++ of order 1 is DDIM. MONAI's DDIM steps from t to t - T/N, so it is fed the
    timesteps that agree with that (900, 800, ..., 0, then the clean latent)."""
    den = _some_model
    sched = dict(SCHED, prediction_type=prediction_type)
    noise = torch.randn(2, 4, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    ddim = DDIMScheduler(**schedule_kwargs(sched), clip_sample=False)
    ddim.set_timesteps(10)
    ddim.timesteps = torch.arange(900, -1, -100)
    x = noise
    for t in ddim.timesteps:
        x = ddim.step(den(x, torch.full((2,), int(t)), None), int(t), x)[0]
    grid = [int(t) for t in ddim.timesteps] + [CLEAN]
    first = _run(DPMSolverPP(ABAR, prediction_type, grid, order=1), den, noise)
    second = _run(DPMSolverPP(ABAR, prediction_type, grid, order=2), den, noise)
    assert torch.allclose(first, x, atol=1e-4, rtol=1e-4), float((first - x).abs().max())
    assert not torch.allclose(second, x, atol=1e-2)  # the second-order correction does act


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2m_solves_the_gaussian_ode_far_better_than_first_order(prediction_type):
    """For data ~ N(0, s2) the probability-flow ODE is known in closed form: x_t = noise * sqrt(var_t / var_T),
    var_t = abar_t s2 + 1 - abar_t.
    On the same 10 timesteps the second-order solver must land much closer than first order (DDIM), and it
    must converge as steps grow."""
    s2 = 0.5
    den = _gaussian_denoiser(prediction_type, s2)
    noise = torch.randn(8, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def rms_error(steps: int, order: int) -> float:
        grid = logsnr_grid(ABAR, steps)
        var = [float(ABAR[t]) * s2 + 1 - float(ABAR[t]) for t in (grid[0], grid[-1])]
        out = _run(DPMSolverPP(ABAR, prediction_type, grid, order=order), den, noise)
        return float((out - noise * (var[1] / var[0]) ** 0.5).pow(2).mean().sqrt())

    e1, e2 = rms_error(10, 1), rms_error(10, 2)
    assert e2 < e1 / 5, (e1, e2)
    assert rms_error(40, 2) < rms_error(10, 2) / 4 < rms_error(5, 2) / 4


def test_dpmpp_2m_with_the_exact_denoiser_keeps_the_data_spread():
    """Data ~ N(0, 0.5^2), as for the other samplers (test_generate): the run must end near std 0.5 (measured:
    0.456 at 5 steps, 0.508 at 8, 0.513 at 10; MONAI's DDIM gives 0.431 at 10)."""
    den = _gaussian_denoiser("epsilon", 0.25)
    for steps, tol in ((5, 0.06), (8, 0.02), (10, 0.025)):
        out = sample_latents("dpmpp_2m", lambda x, t, c: den(x, t, c).float(),
                             torch.randn(64, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1)), steps, SCHED)
        assert abs(float(out.std()) - 0.5) < tol, (steps, float(out.std()))


def test_the_clip_bounds_every_predicted_clean_latent():
    """A model that claims the clean latent is 10 everywhere: with the clip to [-1, 1] the solver follows x0 = 1
    (exactly: constant data predictions integrate exactly), without it x0 = 10."""
    sched = dict(SCHED, prediction_type="v_prediction")

    def claims(c0: float):  # v = alpha eps - sigma x0 with eps = (x - alpha x0) / sigma
        def den(x, t, c):
            a = ABAR[t].view(-1, 1, 1, 1, 1)
            alpha, sigma = a.sqrt(), (1 - a).sqrt()
            return alpha * (x - alpha * c0) / sigma - sigma * c0
        return den

    noise = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    grid = logsnr_grid(ABAR, 8)

    def expected(c0):
        (a_t, s_t), (a_0, s_0) = (DPMSolverPP(ABAR, "v_prediction", grid).alpha_sigma(t) for t in (grid[0], grid[-1]))
        return a_0 * c0 + s_0 * (noise - a_t * c0) / s_t

    clipped = sample_latents("dpmpp_2m", claims(10.0), noise, 8, sched, clip_range=(-1.0, 1.0))
    free = sample_latents("dpmpp_2m", claims(10.0), noise, 8, sched)
    assert torch.allclose(clipped, expected(1.0), atol=1e-4)
    assert torch.allclose(free, expected(10.0), atol=1e-3)


def test_logsnr_grid_runs_from_pure_noise_to_timestep_0_strictly_decreasing():
    for steps in (1, 2, 5, 8, 10, 50, 500, 999):
        grid = logsnr_grid(ABAR, steps)
        assert len(grid) == steps + 1 and grid[0] == 999 and grid[-1] == 0
        assert all(a > b for a, b in itertools.pairwise(grid))
    assert logsnr_grid(ABAR, 1000)[-2:] == [0, CLEAN]
    with pytest.raises(ValueError):
        logsnr_grid(ABAR, 0)


def test_the_config_accepts_the_few_step_sampler_for_a_ddpm_model_only():
    from vqldm.config import config_from_dict
    from vqldm.errors import VqldmError

    assert config_from_dict({"diffusion": {"sampler": "dpmpp_2m"}}).diffusion.sampler == "dpmpp_2m"
    with pytest.raises(VqldmError, match="diffusion.sampler must be rflow"):
        config_from_dict({"diffusion": {"sampler": "dpmpp_2m", "scheduler": {"type": "rflow"}}})


def _pipeline(denoiser):
    """A DiffusionPipeline on a fresh stage 1 with per-channel latent normalisation; ``denoiser`` stands in for
    the UNet (a v-prediction model)."""
    from vqldm.autoencoder.model import build_vqvae
    from vqldm.config import config_from_dict
    from vqldm.priors.diffusion.pipeline import DiffusionPipeline
    from vqldm.runtime import make_runtime

    torch.manual_seed(0)
    net = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [8, 8], "num_res_channels": 8,
           "num_res_layers": 1, "downsample_parameters": [[2, 4, 1, 1]] * 2,
           "upsample_parameters": [[2, 4, 1, 1, 0]] * 2, "num_embeddings": 16, "embedding_dim": 4,
           "commitment_cost": 0.25, "decay": 0.9, "dropout": 0.0, "act": "RELU", "output_act": None}
    vq = build_vqvae(net).eval()
    diff_ckpt = {"scale_factor": 1.0, "latent_shift": [0.1, -0.2, 0.0, 0.3], "latent_scale": [2.0, 0.5, 1.0, 3.0],
                 "scheduler": dict(SCHED, prediction_type="v_prediction"), "latent_shape": [4, 4, 4, 4],
                 "network": {"channels": [8, 8]}}
    vq_ckpt = {"network": net, "normalization": {"intensity_range": [0.0, 1.0]}}
    rt = make_runtime(config_from_dict({"device": {"use_cuda": False}}))
    pipe = DiffusionPipeline(None, vq, diff_ckpt, vq_ckpt, rt, None, None, _denoise=denoiser)
    seen = []
    decode = pipe.decode
    pipe.decode = lambda z, snap: seen.append(z) or decode(z, snap)
    return pipe, seen


def test_generate_with_the_few_step_sampler_clips_snaps_and_repeats_per_seed():
    """The `vqldm sample` path: per-channel latent norm, the codebook clip, snap on and off, seeds."""
    def claims_far_out(x, t, c):  # a v-prediction model whose clean latent is 100 everywhere
        a = ABAR[t].view(-1, 1, 1, 1, 1)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        return alpha * (x - alpha * 100.0) / sigma - sigma * 100.0

    pipe, seen = _pipeline(claims_far_out)
    _, hi = pipe.norm.codebook_range(pipe.vqvae)
    run = {"seed": 0, "steps": 6, "sampler": "dpmpp_2m", "batch_size": 2}
    clipped = pipe.generate([0, 1, 2], snap=False, clip=True, **run)
    assert hi - 0.2 < float(seen[-1].max()) < hi + 0.2  # x0 follows the clip, not the model's 100
    pipe.generate([0, 1, 2], snap=False, clip=False, **run)
    assert float(seen[-1].min()) > 90
    assert clipped.shape == (3, 1, 16, 16, 16) and 0 <= float(clipped.min()) and float(clipped.max()) <= 1

    pipe, _ = _pipeline(lambda x, t, c: _some_model(x, t, c))
    a = pipe.generate([0, 1, 2], snap=True, **run)
    assert torch.equal(a, pipe.generate([0, 1, 2], snap=True, **run))  # same seed, same volumes
    assert torch.equal(a[2], pipe.generate([2], snap=True, **run)[0])  # sample i is sample i, whatever the batch
    assert not torch.equal(a, pipe.generate([0, 1, 2], snap=True, **{**run, "seed": 1}))
    assert not torch.equal(a, pipe.generate([0, 1, 2], snap=False, **run))
