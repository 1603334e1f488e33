"""Self-conditioning (``diffusion.self_condition``): the UNet sees its own clean-latent estimate."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from vqldm.priors.diffusion.objective import Objective
from vqldm.priors.diffusion.unet import as_denoiser, build_unet
from vqldm.sampling.samplers import sample_latents, schedule_kwargs
from vqldm.sampling.self_condition import KEY, SelfCondition, predicted_x0, training_input

from conftest import run_cli, with_updates, write_config
from test_reliability import assert_clean_error, cli
from test_stage2 import load, stage2_config

SCHEDULE = {"type": "ddpm", "num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 0.0015,
            "beta_end": 0.0195, "prediction_type": "v_prediction"}


def _abar(schedule=SCHEDULE) -> torch.Tensor:
    return DDPMScheduler(**schedule_kwargs(schedule)).alphas_cumprod


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_the_noising(prediction_type):
    sch = DDPMScheduler(**schedule_kwargs({**SCHEDULE, "prediction_type": prediction_type}))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 4, 4, 2, generator=g), torch.randn(4, 3, 4, 4, 2, generator=g)
    t = torch.tensor([0, 250, 600, 990])
    x_t = sch.add_noise(x0, noise, t)
    target = sch.get_velocity(x0, noise, t) if prediction_type == "v_prediction" else noise
    assert torch.allclose(predicted_x0(target, x_t, t, sch.alphas_cumprod, prediction_type), x0, atol=1e-3)


class Recorder:
    """A fake denoiser: records each call's input, timesteps, condition and grad mode; returns ``x / 2``."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, condition=None):
        self.calls.append({"x": x.clone(), "t": t.clone(), "cond": dict(condition or {}),
                           "grad": torch.is_grad_enabled()})
        return x / 2


def test_training_input_estimates_the_first_half_without_gradients_from_min_timestep():
    x_t = torch.randn(6, 2, 3, 3, 2)
    t = torch.tensor([700, 100, 900, 800, 800, 800])
    labels = torch.arange(6)
    den = Recorder()
    est = training_input(den, x_t, t, {"class_labels": labels}, _abar(), "v_prediction", SelfCondition(500))
    (call,) = den.calls
    assert call["grad"] is False and torch.equal(call["x"], x_t[:3]) and torch.equal(call["t"], t[:3])
    assert torch.equal(call["cond"]["class_labels"], labels[:3])  # the condition is sliced with the batch
    want = predicted_x0(x_t[:3] / 2, x_t[:3], t[:3], _abar(), "v_prediction")
    assert torch.allclose(est[0], want[0]) and torch.allclose(est[2], want[2])
    assert not est[0].eq(0).all()
    assert est[1].eq(0).all()  # t = 100 < 500: zeros, as at sampling time
    assert est[3:].eq(0).all()  # the second half learns to denoise without an estimate


def test_objective_feeds_the_estimate_in_training_and_zeros_in_validation():
    obj = Objective(SCHEDULE, self_condition=SelfCondition(0))
    z0, noise = torch.randn(4, 2, 3, 3, 2), torch.randn(4, 2, 3, 3, 2)
    t = torch.tensor([900, 800, 700, 600])
    den = Recorder()
    obj.loss(den, z0, noise, t)
    first, second = den.calls
    assert first["grad"] is False and first["x"].shape[0] == 2 and second["grad"] is True
    assert not second["cond"][KEY][:2].eq(0).all() and second["cond"][KEY][2:].eq(0).all()
    den.calls.clear()
    with torch.no_grad():
        obj.loss(den, z0, noise, t)
    (only,) = den.calls
    assert KEY not in only["cond"]  # validation: one pass, the UNet's own zeros
    den.calls.clear()
    Objective(SCHEDULE).loss(den, z0, noise, t)
    assert len(den.calls) == 1 and KEY not in den.calls[0]["cond"]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_samplers_hand_each_step_the_last_estimate_from_min_timestep(sampler):
    den = Recorder()
    noise = torch.randn(2, 2, 3, 3, 2, generator=torch.Generator().manual_seed(0))
    sample_latents(sampler, den, noise, 8, SCHEDULE, generator=torch.Generator().manual_seed(1),
                   self_condition=SelfCondition(400))
    first, *rest = den.calls
    assert first["cond"][KEY].eq(0).all()
    for before, now in zip(den.calls, rest):
        est = now["cond"][KEY]
        if int(now["t"][0]) < 400:
            assert est.eq(0).all()
        else:
            want = predicted_x0(before["x"] / 2, before["x"], before["t"], _abar(), "v_prediction")
            assert torch.allclose(est, want)
    assert any(int(c["t"][0]) < 400 for c in rest) and any(int(c["t"][0]) >= 400 for c in rest)
    plain = Recorder()
    sample_latents(sampler, plain, noise, 8, SCHEDULE, generator=torch.Generator().manual_seed(1))
    assert all(KEY not in c["cond"] for c in plain.calls)


def test_rflow_sampling_refuses_self_conditioning():
    from vqldm.errors import VqldmError

    with pytest.raises(VqldmError, match="ddpm-objective"):
        sample_latents("rflow", Recorder(), torch.randn(1, 2, 3, 3, 2), 4, {**SCHEDULE, "type": "rflow"},
                       self_condition=SelfCondition(0))


def test_as_denoiser_appends_the_estimate_after_the_coarse_channels():
    seen = {}

    def net(x, timesteps, **kw):
        seen["x"] = x
        return x[:, :2]

    x, coarse, est = torch.zeros(1, 2, 3, 3, 2), torch.ones(1, 2, 3, 3, 2), torch.full((1, 2, 3, 3, 2), 5.0)
    den = as_denoiser(net, extra_channels=2, self_cond_channels=2)
    den(x, torch.zeros(1), {"concat": coarse, KEY: est})
    assert seen["x"].shape[1] == 6 and seen["x"][:, 2:4].eq(1).all() and seen["x"][:, 4:].eq(5).all()
    den(x, torch.zeros(1), None)
    assert seen["x"].shape[1] == 6 and seen["x"][:, 4:].eq(0).all()  # no estimate given: zeros
    as_denoiser(net)(x, torch.zeros(1), {KEY: est})
    assert seen["x"].shape[1] == 2  # a plain UNet ignores an estimate


def test_self_conditioned_run_records_itself_samples_and_refuses_the_bundle(tmp_path, data_dir, trained_stage1,
                                                                            capsys):
    cfg = stage2_config(tmp_path, data_dir, trained_stage1)
    cfg["diffusion"].update(self_condition=True, self_condition_min_timestep=300)
    path = write_config(tmp_path / "c.yaml", cfg)
    assert run_cli("--quiet", "train-diffusion", "--config", path) == 0
    ckpt = load(tmp_path / "diffusion_checkpoints" / "best_model.pt")
    latent = cfg["diffusion"]["out_channels"]
    assert ckpt["network"]["in_channels"] == 2 * latent and ckpt["network"]["self_condition_channels"] == latent
    assert ckpt["self_condition"] == {"min_timestep": 300}
    unet = build_unet(ckpt["network"])
    assert unet.conv_in.conv.in_channels == 2 * latent
    unet.load_state_dict(ckpt["state_dict"])
    out = tmp_path / "samples"
    assert run_cli("--quiet", "sample", "--config", path, "-n", "2", "--steps", "4", "--out", out) == 0
    assert json.loads((out / "samples.json").read_text())["self_condition"] == {"min_timestep": 300}
    rc, _, err = cli(capsys, "export-bundle", "--config", write_config(
        tmp_path / "b.yaml", with_updates(cfg, diffusion__snap_to_codebook=True)), "--out", tmp_path / "b")
    assert_clean_error(rc, err, "self-conditioned", "diffusion.self_condition")
    assert not (tmp_path / "b").exists()


def test_classifier_free_guidance_hands_the_estimate_to_both_calls():
    from vqldm.priors.diffusion.conditions import Asked, Slots, guided

    den = Recorder()
    slots = Slots(null_class=2, extra_channels=0, covariates=0)
    x, est = torch.randn(2, 2, 3, 3, 2), torch.randn(2, 2, 3, 3, 2)
    guided(den, slots, Asked(label=0), 2.0)(x, torch.full((2,), 500), {KEY: est})
    asked, null = den.calls
    assert asked["cond"]["class_labels"].eq(0).all() and null["cond"]["class_labels"].eq(2).all()
    assert torch.equal(asked["cond"][KEY], est) and torch.equal(null["cond"][KEY], est)
