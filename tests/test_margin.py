"""Sampling with a margin (``diffusion.sampling_margin``): a larger latent denoised, its centre decoded."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli, spy_unet_sizes, with_updates, write_config
from test_reliability import assert_clean_error, cli
from vqldm.data.io import read_volume
from vqldm.sampling.margin import cropped, padded


def test_padded_and_cropped_are_inverse_on_the_centre():
    z = torch.arange(2 * 3 * 6 * 7 * 4, dtype=torch.float32).reshape(2, 3, 6, 7, 4)
    assert padded([3, 4, 5, 4], [1, 2, 0]) == [3, 6, 9, 4]
    c = cropped(z, [1, 2, 0])
    assert c.shape == (2, 3, 4, 3, 4) and torch.equal(c, z[:, :, 1:5, 2:5, :])
    assert cropped(z, [0, 0, 0]) is z


def test_margin_denoises_a_larger_latent_and_decodes_its_centre(trained_stage2, tmp_path, monkeypatch):
    from vqldm.priors.diffusion.pipeline import DiffusionPipeline

    sizes, decoded = spy_unet_sizes(monkeypatch), []
    real_decode = DiffusionPipeline.decode_any
    monkeypatch.setattr(DiffusionPipeline, "decode_any",
                        lambda self, z, snap, tiled: decoded.append(z.clone()) or real_decode(self, z, snap, tiled))
    args = ["--quiet", "sample", "--config", trained_stage2["config_path"], "-n", "2", "--steps", "3",
            "--scheduler", "ddpm", "--seed", "5"]
    assert run_cli(*args, "--out", tmp_path / "plain") == 0
    assert set(sizes) == {(8, 8, 8)}  # the 32^3 patch's latent
    sizes.clear()
    assert run_cli(*args, "--set", "diffusion.sampling_margin=[1,1,0]", "--out", tmp_path / "m") == 0
    assert set(sizes) == {(10, 10, 8)}
    plain, margin = decoded
    assert plain.shape == margin.shape == (2, 4, 8, 8, 8) and torch.isfinite(margin).all()
    assert not torch.equal(plain, margin)
    assert read_volume(tmp_path / "m" / "sample_0000.nii.gz").array.shape == (32, 32, 32)
    assert json.loads((tmp_path / "m" / "samples.json").read_text())["sampling_margin"] == [1, 1, 0]
    assert json.loads((tmp_path / "plain" / "samples.json").read_text())["sampling_margin"] == [0, 0, 0]
    assert run_cli(*args, "--set", "diffusion.sampling_margin=[1,1,0]", "--out", tmp_path / "m2") == 0
    assert torch.equal(decoded[2], margin)  # the same seed gives the same samples


@pytest.mark.parametrize("margin, needle", [([1, -1, 0], "three latent cell counts"), ([1, 1], "three latent"),
                                            ([1, 1, 1], None)])
def test_a_bad_margin_is_one_line_naming_the_key(trained_stage2, tmp_path, capsys, margin, needle):
    c = with_updates(trained_stage2["config"], diffusion__sampling_margin=margin,
                     diffusion__num_channels=[16, 32, 32], diffusion__attention_levels=[False, False, True],
                     diffusion__num_head_channels=[0, 0, 32])
    rc, _, err = cli(capsys, "check", "--config", write_config(tmp_path / "c.yaml", c))
    # a 3-level UNet halves the 8^3 latent twice: 8 + 2 x 1 = 10 is not a multiple of 4
    assert_clean_error(rc, err, "diffusion.sampling_margin", *([needle] if needle else []))


def test_export_bundle_refuses_a_margin(trained_stage2, tmp_path, capsys):
    c = with_updates(trained_stage2["config"], diffusion__sampling_margin=[1, 1, 0])
    rc, _, err = cli(capsys, "export-bundle", "--config", write_config(tmp_path / "c.yaml", c), "--out", tmp_path / "b")
    assert_clean_error(rc, err, "diffusion.sampling_margin")
    assert not (tmp_path / "b").exists()
