"""Coarse-to-fine (issue 17): a diffusion prior conditioned on the block means of the volume it generates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vqldm.checkpoint import file_sha256, load_checkpoint
from vqldm.data.io import list_volumes, write_volume
from vqldm.latents import LatentCropDataset, block_means
from vqldm.priors.diffusion.coarse import coarse_concat
from vqldm.priors.diffusion.conditions import Asked, Slots, guided

from conftest import run_cli, tiny_config_dict, with_updates, write_config
from test_reliability import assert_clean_error, cli


def test_block_means_average_each_latent_voxels_block_and_pad_the_border():
    x = torch.zeros(1, 1, 8, 4, 6)
    x[0, 0, :4] = 1.0  # the first block along x is full, the second empty
    m = block_means(x, 4)
    assert m.shape == (1, 1, 2, 1, 2)  # 6 is padded to 8 along z (with zeros)
    assert torch.allclose(m[0, 0, :, 0, 0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(m[0, 0, :, 0, 1], torch.tensor([0.5, 0.0]))  # half the block is padding


def test_a_dropped_view_is_all_zeros_and_a_kept_one_carries_its_flag():
    coarse = torch.rand(2, 1, 3, 3, 2) + 0.1
    out = coarse_concat(coarse, torch.tensor([1.0, 0.0]))
    assert out.shape == (2, 2, 3, 3, 2)
    assert torch.equal(out[0, 0], coarse[0, 0]) and bool((out[0, 1] == 1).all())
    assert bool((out[1] == 0).all())


def test_guidance_zero_is_the_null_and_one_the_conditional_prediction():
    seen = []

    def den(x, t, condition=None):
        seen.append(condition["concat"].clone())
        return x + condition["concat"][:, :1].sum() + 10 * condition["concat"][:, 1:].mean()

    coarse, x, t = torch.rand(1, 1, 3, 3, 2), torch.randn(2, 4, 3, 3, 2), torch.zeros(2)
    slots, asked = Slots(None, 2, 0), Asked(coarse=coarse)
    cond = guided(den, slots, asked, 1.0)(x, t)
    assert len(seen) == 1 and bool((seen[0][:, 1] == 1).all()) and torch.equal(seen[0][1, 0], coarse[0, 0])
    null = guided(den, slots, None)(x, t)
    assert bool((seen[-1] == 0).all())
    assert torch.equal(guided(den, slots, asked, 0.0)(x, t), null)
    assert torch.equal(guided(den, slots, asked, 1.0)(x, t), cond)
    assert torch.allclose(guided(den, slots, asked, 3.0)(x, t), null + 3.0 * (cond - null))


def test_the_coarse_maps_are_cropped_where_the_latents_are():
    lat = torch.arange(2 * 6 * 6 * 4, dtype=torch.float32).view(2, 6, 6, 4)
    ds = LatentCropDataset([lat], [3, 3, 2], times=8, extra={"coarse": [lat[:1] * 10]})
    torch.manual_seed(0)
    for i in range(8):
        item = ds[i]
        assert torch.equal(item["coarse"], item["latent"][:1] * 10)


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def coarse_run(tmp_path_factory, data_dir, trained_stage1):
    root = tmp_path_factory.mktemp("coarse_run")
    cfg = tiny_config_dict(root, data_dir)
    cfg["diffusion"]["checkpoints"]["vqvae_path"] = str(trained_stage1["best"])
    cfg["diffusion"]["coarse_condition"] = True
    cfg_path = write_config(root / "config.yaml", cfg)
    assert run_cli("--quiet", "train-diffusion", "--config", cfg_path) == 0
    best = Path(cfg["diffusion"]["checkpoints"]["output_dir"]) / "best_model.pt"
    return {"root": root, "config": cfg, "config_path": cfg_path, "best": best}


def test_the_checkpoint_records_the_coarse_condition_and_the_wider_input(coarse_run, trained_stage1):
    ckpt = load_checkpoint(coarse_run["best"], kind="diffusion", what="test")
    assert ckpt["coarse_condition"] == {"stride": 4, "view": "volume"}
    assert ckpt["network"]["in_channels"] == ckpt["network"]["out_channels"] + 2 == 6


def test_on_the_fly_patches_train_with_their_coarse_view_too(coarse_run, tmp_path):
    cfg = with_updates(coarse_run["config"], data__augmentation=True,
                       diffusion__checkpoints__output_dir=str(tmp_path / "ckpt"),
                       diffusion__logging__log_dir=str(tmp_path / "logs"))
    assert run_cli("--quiet", "train-diffusion", "--config", write_config(tmp_path / "c.yaml", cfg)) == 0
    ckpt = load_checkpoint(tmp_path / "ckpt" / "best_model.pt", kind="diffusion", what="test")
    assert ckpt["latent_source"] == "on_the_fly" and ckpt["coarse_condition"] == {"stride": 4, "view": "volume"}


def test_sampling_follows_the_coarse_view_and_records_it(coarse_run, data_dir, tmp_path):
    vol = list_volumes(Path(data_dir) / "val")[0]
    common = ["--quiet", "sample", "--config", coarse_run["config_path"], "-n", 2, "--steps", 2, "--seed", 1]
    assert run_cli(*common, "--cond-volume", vol, "--out", tmp_path / "c") == 0
    rec = json.loads((tmp_path / "c" / "samples.json").read_text())["coarse_condition"]
    assert rec == {"volume": str(vol), "sha256": file_sha256(vol), "stride": 4, "view": "volume",
                   "guidance": 1.0}
    assert run_cli(*common, "--out", tmp_path / "u") == 0
    assert json.loads((tmp_path / "u" / "samples.json").read_text())["coarse_condition"] is None
    import vqldm

    model = vqldm.load_model(coarse_run["config_path"], device="cpu")
    pipe = model.pipeline
    pipe.set_coarse(str(vol))
    x, t = torch.randn(2, *pipe.latent_shape(None)), torch.full((2,), 500)
    with torch.no_grad():
        got = pipe.denoiser()(x, t)
        want = pipe.unet(x=torch.cat([x, coarse_concat(pipe.coarse.expand(2, -1, -1, -1, -1), torch.ones(2))], 1),
                         timesteps=t)
        null = pipe.unet(x=torch.cat([x, torch.zeros(2, 2, *x.shape[2:])], 1), timesteps=t)
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, null)


def test_bad_coarse_conditions_are_refused_in_one_line(coarse_run, trained_stage2, data_dir, tmp_path, capsys):
    vol = list_volumes(Path(data_dir) / "val")[0]
    args = ["sample", "-n", 1, "--steps", 2]
    small = tmp_path / "small.nii.gz"
    write_volume(small, np.zeros((16, 16, 16), np.float32))
    rc, _, err = cli(capsys, *args, "--config", coarse_run["config_path"], "--cond-volume", small, "--out", tmp_path / "a")
    assert_clean_error(rc, err, "--cond-volume", str(small), "[16, 16, 16]")
    rc, _, err = cli(capsys, *args, "--config", trained_stage2["config_path"], "--cond-volume", vol,
                     "--out", tmp_path / "b")
    assert_clean_error(rc, err, "--cond-volume", "diffusion.coarse_condition")
    rc, _, err = cli(capsys, *args, "--config", coarse_run["config_path"], "--cond-volume", vol, "--shape", 64, 64, 64,
                     "--out", tmp_path / "c")
    assert_clean_error(rc, err, "--cond-volume", "--shape")
    rc, _, err = cli(capsys, *args, "--config", coarse_run["config_path"], "--guidance", 2, "--out", tmp_path / "d")
    assert_clean_error(rc, err, "--guidance needs --class, --cond-volume or --cond")
    rc, _, err = cli(capsys, "export-bundle", "--config", coarse_run["config_path"], "--out", tmp_path / "e")
    assert_clean_error(rc, err, "coarse-to-fine")


def test_a_coarse_view_given_as_a_tensor_must_lie_on_the_latent_grid(coarse_run, data_dir):
    import vqldm
    from vqldm.errors import VqldmError

    pipe = vqldm.load_model(coarse_run["config_path"], device="cpu").pipeline
    pipe.set_coarse(str(list_volumes(Path(data_dir) / "val")[0]))
    from_file = pipe.coarse.clone()
    pipe.set_coarse_view(from_file * 0.5)
    assert torch.equal(pipe.coarse, from_file * 0.5) and pipe.coarse_path is None
    with pytest.raises(VqldmError, match="a coarse view must be"):
        pipe.set_coarse_view(torch.zeros(1, 1, 4, 4, 4))
