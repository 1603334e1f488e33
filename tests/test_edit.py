"""Volumes beyond the training patch and edits: sliding-window reconstruction (vqldm reconstruct)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
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
