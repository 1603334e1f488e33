"""Volumes beyond the training patch and edits: sliding-window reconstruction (vqldm reconstruct)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, spy_unet_sizes
from vqldm.commands.edit import INTERPOLATE_DEPTH
from vqldm.data.io import list_volumes, read_volume, write_volume
from vqldm.metrics.reconstruction import psnr, seam_ratio
from vqldm.sampling.window import aligned_overlap, encode_windowed, window_borders
from vqldm.synth.microtubules import MicrotubuleParams, synth_volume


def _stage1(trained_stage1):
    from vqldm.commands.reconstruct import load_stage1
    from vqldm.config import load_config

    return load_stage1(load_config(trained_stage1["config_path"]), None)


def _train_volume(trained_stage1):
    return read_volume(list_volumes(Path(trained_stage1["config"]["data"]["train_data_dir"]))[0])


def _wide(shape=(64, 32, 32), seed=0) -> np.ndarray:
    """A synthetic volume of ``shape`` at the fixture data's voxel size (32^3 over the default field)."""
    p = MicrotubuleParams(fov_nm=(8000.0 * shape[0] / 32, 8000.0 * shape[1] / 32, 300.0 * shape[2] / 32),
                          n_filaments=(8, 16))
    return synth_volume(tuple(shape), np.random.default_rng(seed), p)[0]


def _write(folder: Path, name: str, vol: np.ndarray, like, spacing=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_volume(folder / name, vol, spacing or like.spacing, like.unit, None)


def test_aligned_overlap_puts_every_window_on_the_latent_grid():
    for roi, stride, o in [([48, 48, 24], 4, 0.25), ([32, 32, 32], 4, 0.5), ([12, 12, 6], 1, 0.25), ([8], 4, 0.9)]:
        for r, ov in zip(roi, aligned_overlap(roi, stride, o)):
            step = int(r * (1.0 - ov))  # what MONAI computes
            assert step % stride == 0 and step >= stride
    assert window_borders([96], [48], 4) == [[36, 48, 84]]  # MONAI: windows at 0, 36 and 48 (the last one fits)


def test_seam_ratio_sees_a_step_at_a_border():
    rng = np.random.default_rng(0)
    smooth = torch.from_numpy(rng.random((64, 16, 16)).astype(np.float32))
    assert abs(seam_ratio(smooth, [[32], [], []]) - 1) < 0.1
    seamed = smooth.clone()
    seamed[32:] += 0.5
    assert seam_ratio(seamed, [[32], [], []]) > 1.5


def test_one_window_is_the_whole_volume_encoding(trained_stage1):
    """A volume the size of the patch is one window: the same codes as encoding it whole."""
    from vqldm.latents import encode

    s1 = _stage1(trained_stage1)
    x = s1.to_network(_train_volume(trained_stage1).array)
    whole = encode(s1.vqvae, x, s1.rt)
    assert torch.allclose(encode_windowed(s1.vqvae, x, s1.patch, s1.stride), whole, atol=1e-5)


def test_windowed_reconstruction_matches_the_whole_one(trained_stage1):
    """Two patches wide: windowed and whole-volume reconstructions agree within 0.5 dB against the input."""
    from vqldm.commands.reconstruct import reconstruct_one
    from vqldm.latents import encode
    from vqldm.sampling.decode import decode_latents
    from vqldm.latents import LatentNorm

    s1 = _stage1(trained_stage1)
    vol = _wide()
    whole = decode_latents(s1.vqvae, encode(s1.vqvae, s1.to_network(vol), s1.rt), LatentNorm(1.0), s1.intensity_range,
                           False, None, s1.ckpt.get("intensity_calibration"))[0, 0]
    win = torch.from_numpy(reconstruct_one(s1, vol, 0.25))
    assert win.shape == whole.shape == vol.shape
    target = torch.from_numpy(vol)[None]
    assert abs(float(psnr(win[None], target)) - float(psnr(whole[None], target))) < 0.5


def test_reconstruct_cli_writes_volumes_of_any_size_with_the_input_grid(trained_stage1, tmp_path):
    train = _train_volume(trained_stage1)
    _write(tmp_path / "in", "wide.nii.gz", _wide(), train)
    _write(tmp_path / "in", "odd.nii.gz", _wide((37, 30, 33), seed=1), train)  # not a multiple of the stride
    cfg, out = trained_stage1["config_path"], tmp_path / "out"
    assert run_cli("--quiet", "reconstruct", "--config", cfg, "--volumes", tmp_path / "in", "--out", out) == 0
    for name, shape in [("recon_wide.nii.gz", (64, 32, 32)), ("recon_odd.nii.gz", (37, 30, 33))]:
        v = read_volume(out / name)
        assert v.array.shape == shape and np.isfinite(v.array).all()
        assert np.allclose(v.spacing, train.spacing, rtol=1e-5) and v.unit == train.unit
    rec = json.loads((out / "reconstruct.json").read_text())
    assert [r["file"] for r in rec["volumes"]] == ["odd.nii.gz", "wide.nii.gz"]
    assert all(np.isfinite(r["psnr_db"]) for r in rec["volumes"]) and (out / "reconstruct.png").stat().st_size > 0


def test_reconstruct_refuses_another_spacing_and_an_earlier_output(trained_stage1, tmp_path, capsys):
    train = _train_volume(trained_stage1)
    _write(tmp_path / "in", "a.nii.gz", _wide(), train)
    cfg, out = trained_stage1["config_path"], tmp_path / "out"
    assert run_cli("--quiet", "reconstruct", "--config", cfg, "--volumes", tmp_path / "in", "--out", out) == 0
    assert run_cli("--quiet", "reconstruct", "--config", cfg, "--volumes", tmp_path / "in", "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli("--quiet", "reconstruct", "--config", cfg, "--volumes", tmp_path / "in", "--out", out,
                   "--overwrite") == 0
    assert len(list(out.glob("previous_*/recon_a.nii.gz"))) == 1  # the earlier output was moved, not lost
    _write(tmp_path / "bad", "b.nii.gz", _wide(), train, spacing=[2 * s for s in train.spacing])
    assert run_cli("--quiet", "reconstruct", "--config", cfg, "--volumes", tmp_path / "bad",
                   "--out", tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert "b.nii.gz" in err and "voxel spacing" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------------------------------ edits
SCHEDULE = {"type": "ddpm", "num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 0.0015,
            "beta_end": 0.0195}


def _gaussian_denoiser(mean: torch.Tensor, sd: float, prediction_type: str):
    """The exact model of data drawn from N(mean, sd^2 I): what it predicts at (x, t)."""
    from monai.networks.schedulers import DDPMScheduler

    ac = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=0.0015,
                       beta_end=0.0195).alphas_cumprod.double()

    def f(x, t, condition=None):
        a = ac[t].view(-1, *[1] * (x.dim() - 1)).to(x)
        x0 = mean + a.sqrt() * sd**2 * (x - a.sqrt() * mean) / (a * sd**2 + 1 - a)  # E[x0 | x_t]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * x0
        return x0 if prediction_type == "sample" else eps
    return f


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_inversion_then_regeneration_gives_back_the_latent(prediction_type):
    """With the exact model of Gaussian data, inverting a sample and regenerating from its noise
    returns it; its noise is the sample's standardised value (the probability-flow map of a Gaussian)."""
    from vqldm.sampling.edit import ddim_from, ddim_invert

    sched = {**SCHEDULE, "prediction_type": prediction_type}
    g = torch.Generator().manual_seed(0)
    mean, sd = torch.randn(1, 2, 4, 4, 4, generator=g), 0.5
    z0 = mean + sd * torch.randn(1, 2, 4, 4, 4, generator=g)
    den = _gaussian_denoiser(mean, sd, prediction_type)
    noise = ddim_invert(den, z0, 200, sched)  # DDIM is first order: the error shrinks with the step
    assert torch.allclose(noise, (z0 - mean) / sd, atol=0.06)
    assert torch.allclose(ddim_from(den, noise, 200, sched), z0, atol=0.06)
    assert not torch.allclose(ddim_from(den, torch.randn(z0.shape, generator=g), 200, sched), z0, atol=0.06)


def test_partial_inversion_reaches_the_level_and_interpolation_ends_are_the_inputs_at_any_depth():
    """With the exact model of Gaussian data: inverting to an intermediate timestep gives the
    probability-flow latent there; depth 1 is the whole chain (inversion, slerp, regeneration) exactly;
    at every depth frames 0 and N come back to the two inputs; a depth outside (0, 1] is refused."""
    from vqldm.errors import VqldmError
    from vqldm.sampling.edit import _scheduler, ddim_from, ddim_invert, interpolate_latents, sdedit_start, slerp

    sched = {**SCHEDULE, "prediction_type": "v_prediction"}
    g = torch.Generator().manual_seed(2)
    mean, sd = torch.randn(1, 2, 4, 4, 4, generator=g), 0.5
    za, zb = (mean + sd * torch.randn(1, 2, 4, 4, 4, generator=g) for _ in range(2))
    den = _gaussian_denoiser(mean, sd, "v_prediction")
    first, t = sdedit_start(1000, sched, 0.4, "--depth")  # many steps: DDIM's first-order error is small
    a = float(_scheduler(sched, 1000).alphas_cumprod[t])
    flow = a**0.5 * mean + (a * sd**2 + 1 - a) ** 0.5 * (za - mean) / sd  # x_t of za on the Gaussian's flow
    part = ddim_invert(den, za, 1000, sched, first)
    assert 0 < first < 999 and torch.allclose(part, flow, atol=0.03) and not torch.allclose(part, za, atol=0.3)
    noise = ddim_invert(den, torch.cat([za, zb]), 20, sched)
    full = ddim_from(den, torch.cat([slerp(noise[:1], noise[1:], k / 4) for k in range(5)]), 20, sched)
    assert torch.equal(interpolate_latents(den, za, zb, 4, 20, sched, 1.0), full)
    for depth in (0.2, 0.5, 1.0):
        z = interpolate_latents(den, za, zb, 4, 1000, sched, depth)
        assert z.shape == (5, 2, 4, 4, 4)
        assert torch.allclose(z[0], za[0], atol=0.03) and torch.allclose(z[-1], zb[0], atol=0.03)
        assert not torch.allclose(z[2], za[0], atol=0.3) and not torch.allclose(z[2], zb[0], atol=0.3)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(VqldmError, match=f"^--depth {bad}: must lie in \\(0, 1\\]$"):
            interpolate_latents(den, za, zb, 4, 20, sched, bad)


def test_slerp_ends_and_sdedit_start():
    from vqldm.errors import VqldmError
    from vqldm.sampling.edit import sdedit_start, slerp

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)  # slerp keeps the norm of (near-orthogonal) Gaussian noise; lerp shrinks it
    assert mid.norm() > 0.9 * a.norm() and (0.5 * (a + b)).norm() < mid.norm()
    sched = {**SCHEDULE, "prediction_type": "epsilon"}
    assert sdedit_start(50, sched, 1.0) == (0, 999)
    first, t = sdedit_start(50, sched, 0.3)
    assert t <= 0.3 * 999 and first > 0
    with pytest.raises(VqldmError, match="strength"):
        sdedit_start(50, sched, 1.5)


def _edit(trained_stage2, kind, out, *extra):
    return run_cli("--quiet", "edit", kind, "--config", trained_stage2["config_path"], "--steps", "10",
                   "--out", out, *extra)


def test_interpolate_writes_frames_whose_ends_are_the_inputs(trained_stage2, tmp_path):
    val = list_volumes(Path(trained_stage2["config"]["data"]["val_data_dir"]))
    assert _edit(trained_stage2, "interpolate", tmp_path / "i", "--a", val[0], "--b", val[1], "--frames", "3") == 0
    frames = [read_volume(tmp_path / "i" / f"frame_{k:04d}.nii.gz") for k in range(4)]
    like = read_volume(val[0])
    assert all(f.array.shape == like.array.shape and np.allclose(f.spacing, like.spacing) for f in frames)
    rec = json.loads((tmp_path / "i" / "frame.json").read_text())
    assert len(rec["foreground_fraction"]) == 4 and rec["frames"] == 3
    assert rec["depth"] == INTERPOLATE_DEPTH and rec["steps_run"] <= 10
    # the end frames are the inputs' VQ-VAE reconstructions: (almost) every latent voxel gets its input's code back
    # (this tiny stage 1 decodes to almost nothing, so the codes, not the voxels, show it)
    assert rec["codes_frame0_as_a"] >= 0.9 and rec["codes_last_frame_as_b"] >= 0.9
    assert rec["psnr_frame0_vs_a_reconstruction_db"] >= 25 and rec["psnr_last_frame_vs_b_reconstruction_db"] >= 25
    assert (tmp_path / "i" / "frame.png").stat().st_size > 0


def test_interpolate_depth_is_recorded_keeps_the_ends_and_bad_depth_is_one_line(trained_stage2, tmp_path, capsys):
    val = list_volumes(Path(trained_stage2["config"]["data"]["val_data_dir"]))
    pair = ("--a", val[0], "--b", val[1], "--frames", "2")
    assert _edit(trained_stage2, "interpolate", tmp_path / "half", *pair, "--depth", "0.5") == 0
    rec = json.loads((tmp_path / "half" / "frame.json").read_text())
    assert rec["depth"] == 0.5 and rec["start_timestep"] <= 0.5 * 999 and 0 < rec["steps_run"] < 10
    assert rec["codes_frame0_as_a"] >= 0.9 and rec["codes_last_frame_as_b"] >= 0.9
    capsys.readouterr()
    for bad in ("0", "1.5", "-0.2"):
        assert _edit(trained_stage2, "interpolate", tmp_path / "bad", *pair, "--depth", bad) == 2
        err = capsys.readouterr().err
        assert f"--depth {float(bad)}: must lie in (0, 1]" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_sdedit_variants_are_seeded_and_bad_input_is_one_line(trained_stage2, tmp_path, capsys):
    val = list_volumes(Path(trained_stage2["config"]["data"]["val_data_dir"]))
    args = ("--input", val[0], "--strength", "0.4", "-n", "2")
    assert _edit(trained_stage2, "sdedit", tmp_path / "a", *args) == 0
    assert _edit(trained_stage2, "sdedit", tmp_path / "b", *args) == 0
    for i in range(2):  # same seed, same files
        name = f"sdedit_{i:04d}.nii.gz"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    kept = json.loads((tmp_path / "a" / "sdedit.json").read_text())
    assert kept["strength"] == 0.4 and kept["steps_run"] < 10
    assert _edit(trained_stage2, "sdedit", tmp_path / "full", "--input", val[0], "--strength", "1", "-n", "2") == 0
    fresh = json.loads((tmp_path / "full" / "sdedit.json").read_text())
    assert fresh["steps_run"] == 10
    # (this tiny stage 1 decodes to almost nothing: the codes show the edit) a weak edit keeps more of the
    # input's codes than a fresh sample, and the two variants differ
    assert min(kept["codes_as_input"]) > max(fresh["codes_as_input"])
    assert kept["codes_as_input"][0] != kept["codes_as_input"][1]
    assert _edit(trained_stage2, "sdedit", tmp_path / "a", *args) == 2  # nothing overwritten
    like = read_volume(val[0])
    _write(tmp_path / "in", "odd.nii.gz", like.array[:30], like)
    _write(tmp_path / "in", "far.nii.gz", like.array, like, spacing=[2 * s for s in like.spacing])
    capsys.readouterr()
    for bad, needle in [(("--input", val[0], "--strength", "1.5"), "--strength 1.5"),
                        (("--input", val[0], "--strength", "0"), "--strength 0"),
                        (("--input", tmp_path / "in" / "odd.nii.gz"), "not one the VQ-VAE decodes to"),
                        (("--input", tmp_path / "in" / "far.nii.gz"), "voxel spacing")]:
        assert _edit(trained_stage2, "sdedit", tmp_path / "c", *bad) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert _edit(trained_stage2, "interpolate", tmp_path / "c", "--a", val[0], "--b",
                 tmp_path / "in" / "odd.nii.gz") == 2


def test_feather_and_latent_mask():
    from vqldm.commands.edit import feather, latent_mask

    m = np.zeros((16, 8, 8), bool)
    m[4:6, 2:4, 2:4] = True
    w = feather(m, 2)
    assert (w[m] == 1).all() and w[9, 3, 3] == 0 and 0 < w[7, 3, 3] < 1  # 1 inside, 0 three voxels away
    lm = latent_mask(m, 4)
    assert lm.shape == (1, 1, 4, 2, 2) and lm.sum() == 1 and lm[0, 0, 1, 0, 0] == 1  # the block holding it


def test_inpaint_keeps_every_voxel_outside_the_feathered_mask(trained_stage2, tmp_path, capsys):
    from vqldm.commands.edit import feather

    val = list_volumes(Path(trained_stage2["config"]["data"]["val_data_dir"]))
    like = read_volume(val[0])
    mask = np.zeros(like.array.shape, np.float32)
    mask[8:20, 8:20, 8:20] = 1
    _write(tmp_path / "m", "mask.nii.gz", mask, like)
    assert _edit(trained_stage2, "inpaint", tmp_path / "o", "--input", val[0], "--mask",
                 tmp_path / "m" / "mask.nii.gz", "--feather", "2", "--resample", "2") == 0
    out = read_volume(tmp_path / "o" / "inpaint_0000.nii.gz")
    outside = feather(mask > 0, 2) == 0
    assert np.array_equal(out.array[outside], like.array[outside])  # bit for bit
    assert not np.array_equal(out.array[mask > 0], like.array[mask > 0])  # the region did change
    assert np.allclose(out.spacing, like.spacing)
    rec = json.loads((tmp_path / "o" / "inpaint.json").read_text())
    assert rec["voxels_changed_outside_feather"] == 0 and rec["latent_voxels_regenerated"] == 27
    capsys.readouterr()
    _write(tmp_path / "m", "small.nii.gz", mask[:16], like)
    _write(tmp_path / "m", "empty.nii.gz", 0 * mask, like)
    for bad, needle in [("small.nii.gz", "differs from --input's"), ("empty.nii.gz", "the mask is empty")]:
        assert _edit(trained_stage2, "inpaint", tmp_path / "p", "--input", val[0], "--mask", tmp_path / "m" / bad) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_outpaint_grows_the_volume_and_keeps_the_input(trained_stage2, tmp_path, capsys):
    val = list_volumes(Path(trained_stage2["config"]["data"]["val_data_dir"]))
    like = read_volume(val[0])
    assert _edit(trained_stage2, "outpaint", tmp_path / "o", "--input", val[0], "--pad", "8", "0", "0",
                 "--feather", "0", "--resample", "1") == 0
    out = read_volume(tmp_path / "o" / "outpaint_0000.nii.gz")
    assert out.array.shape == (48, 32, 32)
    assert np.array_equal(out.array[8:40], like.array)
    assert np.allclose(out.affine[:3, 3], like.affine[:3, 3] - like.affine[:3, 0] * 8)  # the origin moved back
    capsys.readouterr()
    assert _edit(trained_stage2, "outpaint", tmp_path / "p", "--input", val[0], "--pad", "3", "0", "0") == 2
    assert "not one the VQ-VAE decodes to" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ large samples
def test_tiled_denoiser_runs_tiles_and_blends_them_exactly():
    """A voxel-wise model gives the same output tiled as whole (the blend weights sum to one), each
    sample keeps its own timestep, and the model never sees more than one tile."""
    from vqldm.sampling.window import tiled_denoiser

    seen = []

    def f(x, t, condition=None):
        seen.append(tuple(x.shape))
        return x * t.view(-1, 1, 1, 1, 1).float() + 1.0

    x = torch.randn(2, 3, 20, 12, 6, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 7])
    out = tiled_denoiser(f, [8, 8, 6])(x, t)
    assert torch.allclose(out, f(x, t), atol=1e-5)
    assert max(s[2] for s in seen[:-1]) == 8 and all(s[3] <= 8 and s[0] == 1 for s in seen[:-1])
    seen.clear()
    small = x[:, :, :8, :8]
    assert torch.equal(tiled_denoiser(f, [8, 8, 6])(small, t), f(small, t)) and seen[0] == tuple(small.shape)


def test_sample_beyond_the_patch_is_tiled_and_seamless_in_shape(trained_stage2, tmp_path, monkeypatch):
    """--shape beyond the training patch: the UNet sees training-size tiles only."""
    sizes = spy_unet_sizes(monkeypatch)
    assert run_cli("--quiet", "sample", "--config", trained_stage2["config_path"], "-n", "1", "--steps", "3",
                   "--scheduler", "ddim", "--shape", "64", "32", "32", "--out", tmp_path / "S") == 0
    v = read_volume(tmp_path / "S" / "sample_0000.nii.gz")
    assert v.array.shape == (64, 32, 32) and np.isfinite(v.array).all()
    assert sizes and set(sizes) == {(8, 8, 8)}  # the training latent of the 32^3 patch
