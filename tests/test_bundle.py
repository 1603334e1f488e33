"""``vqldm export-bundle``: a MONAI bundle that samples with MONAI alone and reproduces ``vqldm sample``."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from vqldm.data.io import list_volumes, read_volume

from conftest import run_cli, with_updates, write_config
from test_reliability import assert_clean_error, cli

TOLERANCE = 1e-5  # issue 19: max abs difference between the bundle's volumes and vqldm sample's


def _export(tmp_path, capsys, config_path, *extra):
    rc, out, err = cli(capsys, "--quiet", "export-bundle", "--config", config_path, "--out", tmp_path / "bundle",
                       "--steps", 4, "--seed", 3, "--num-samples", 2, *extra)
    assert rc == 0, err
    return tmp_path / "bundle", out


def _brightened_stage1(trained_stage1, tmp_path):
    """The shared stage 1 with its decoder's last bias raised by 0.5: the tiny model's samples clamp to
    all-zero volumes otherwise, and two empty volumes would prove nothing."""
    ckpt = torch.load(trained_stage1["best"], map_location="cpu", weights_only=True)
    last = [k for k in ckpt["state_dict"] if k.startswith("decoder.") and k.endswith(".bias")][-1]
    ckpt["state_dict"][last] = ckpt["state_dict"][last] + 0.5
    torch.save(ckpt, tmp_path / "stage1_bright.pt")
    return tmp_path / "stage1_bright.pt"


def test_monai_bundle_run_reproduces_vqldm_sample(tmp_path, trained_stage1, trained_stage2, capsys):
    """Clip to the codebook range, snap and the global scale on (the defaults): the bundle expresses each."""
    stage1 = _brightened_stage1(trained_stage1, tmp_path)
    bundle, out = _export(tmp_path, capsys, trained_stage2["config_path"], "--vqvae-checkpoint", stage1)
    assert "python -m monai.bundle run" in out
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    assert cfg["scheduler"]["_target_"].endswith("DDIMScheduler") and cfg["scheduler"]["clip_sample"] is True
    assert cfg["inferer"]["_target_"] == "monai.inferers.LatentDiffusionInferer"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["vqldm"]["spacing_unit"] == "micron"
    for name in ("vqvae.pt", "diffusion_unet.pt"):  # plain state dicts: tensors only
        state = torch.load(bundle / "models" / name, map_location="cpu", weights_only=True)
        assert state and all(torch.is_tensor(v) for v in state.values())
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                          str(bundle / "configs" / "inference.json"), "--meta_file",
                          str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run_cli("--quiet", "sample", "--config", trained_stage2["config_path"], "--scheduler", "ddim", "--steps", 4,
                   "--seed", 3, "--num-samples", 2, "--out", tmp_path / "vqldm", "--vqvae-checkpoint", stage1) == 0
    ours = [read_volume(f) for f in list_volumes(tmp_path / "vqldm")]
    theirs = sorted((bundle / "samples").glob("sample_*.nii.gz"))
    assert len(theirs) == len(ours) == 2
    diffs = [float(np.abs(np.asarray(nib.load(t).dataobj, np.float32) - o.array).max()) for t, o in zip(theirs, ours)]
    print(f"bundle vs vqldm sample: max abs diff {max(diffs):.3g}")
    assert max(diffs) <= TOLERANCE, diffs
    # the tiny model's volumes are dim, but not constant and not clamped away: the comparison sees values
    assert all(float(o.array.max() - o.array.min()) > 0.02 and 0 < float(o.array.min()) for o in ours)
    assert not np.array_equal(ours[0].array, ours[1].array)
    zooms = nib.load(theirs[0]).header.get_zooms()
    assert np.allclose(zooms, ours[0].spacing)
    assert read_volume(theirs[0]).unit == ours[0].unit == "micron"  # the unit travels into the bundle's files too


def test_without_the_clip_the_bundle_turns_it_off(tmp_path, trained_stage2, capsys):
    c = with_updates(trained_stage2["config"], diffusion__clip_to_codebook_range=False)
    bundle, _ = _export(tmp_path, capsys, write_config(tmp_path / "c.yaml", c))
    assert json.loads((bundle / "configs" / "inference.json").read_text())["scheduler"]["clip_sample"] is False


def test_what_monai_cannot_express_is_refused_in_one_line(tmp_path, trained_stage2, capsys):
    c = with_updates(trained_stage2["config"], diffusion__snap_to_codebook=False)
    rc, _, err = cli(capsys, "export-bundle", "--config", write_config(tmp_path / "c.yaml", c), "--out", tmp_path / "b")
    assert_clean_error(rc, err, "diffusion.snap_to_codebook")
    assert not (tmp_path / "b").exists()


def test_an_existing_bundle_is_kept_unless_overwrite(tmp_path, trained_stage2, capsys):
    bundle, _ = _export(tmp_path, capsys, trained_stage2["config_path"])
    rc, _, err = cli(capsys, "export-bundle", "--config", trained_stage2["config_path"], "--out", bundle)
    assert_clean_error(rc, err, "--out", "--overwrite")
    _export(tmp_path, capsys, trained_stage2["config_path"], "--overwrite")
    assert list((bundle / "models").glob("previous_*/vqvae.pt"))


@pytest.mark.parametrize("kind", ["vqvae", "diffusion"])
def test_checkpoints_load_into_plain_monai_networks(trained_stage1, trained_stage2, kind):
    from monai.networks.nets import VQVAE, DiffusionModelUNet

    path = trained_stage1["best"] if kind == "vqvae" else trained_stage2["best"]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = (VQVAE if kind == "vqvae" else DiffusionModelUNet)(**ckpt["network"])
    net.load_state_dict(ckpt["state_dict"])  # strict: every key and shape matches
