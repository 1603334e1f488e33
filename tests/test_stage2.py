"""Stage 2 (issue 4): latent diffusion on the frozen VQ-VAE latent."""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from vqldm import latents
from vqldm.latents import load_vqvae
from vqldm.autoencoder.model import build_vqvae

from conftest import run_cli, run_cli_subprocess, tiny_config_dict, write_config

CODEBOOK_BUFFERS = ("quantizer.quantizer.embedding.weight", "quantizer.quantizer.ema_w",
                    "quantizer.quantizer.ema_cluster_size")


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def stage2_config(tmp_path, data_dir, trained_stage1, **diffusion_training) -> dict:
    cfg = tiny_config_dict(tmp_path, data_dir)
    cfg["diffusion"]["checkpoints"]["vqvae_path"] = str(trained_stage1["best"])
    cfg["diffusion"]["training"].update(diffusion_training)
    return cfg


@pytest.fixture
def captured_vqvae(monkeypatch):
    """Keep a handle on the VQ-VAE that train-diffusion loads (same object the run uses)."""
    box = {}
    original = latents.load_vqvae

    def wrapper(*args, **kwargs):
        model, ckpt = original(*args, **kwargs)
        box["model"] = model
        return model, ckpt

    monkeypatch.setattr(latents, "load_vqvae", wrapper)
    return box


def assert_stage1_untouched(model: torch.nn.Module, stage1_file: Path) -> None:
    file_sd = load(stage1_file)["state_dict"]
    sd = model.state_dict()
    assert sd.keys() == file_sd.keys()
    for k in CODEBOOK_BUFFERS:
        assert k in sd, (k, sorted(sd)[:10])
    for k in sd:
        assert torch.equal(sd[k].cpu(), file_sd[k]), f"stage-1 tensor {k} changed during stage 2"
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------------- shared run
def test_checkpoint_loads_weights_only_and_is_self_describing(trained_stage2, trained_stage1):
    for p in (trained_stage2["best"], trained_stage2["latest"]):
        ckpt = load(p)
        assert ckpt["kind"] == "stage2"
        for key in ("network", "scheduler", "scale_factor", "vqvae_sha256", "latent_shape", "normalization",
                    "state_dict"):
            assert key in ckpt, key
        assert ckpt["network"]["channels"] == [16, 32] and ckpt["network"]["in_channels"] == 4
        assert ckpt["scheduler"]["type"] == "ddpm"
        assert ckpt["scheduler"]["schedule"] == "linear_beta"
        assert ckpt["scheduler"]["beta_start"] == pytest.approx(0.0015)
        assert ckpt["scheduler"]["beta_end"] == pytest.approx(0.0195)
        assert ckpt["vqvae_sha256"] == sha256(trained_stage1["best"])
        assert ckpt["latent_shape"] == [4, 8, 8, 8]
        sf = ckpt["scale_factor"]
        assert isinstance(sf, float) and math.isfinite(sf) and sf > 0
        assert ckpt["latent_source"] == "cache"
    assert not list(trained_stage2["out_dir"].glob("*.tmp"))


def test_stage1_file_unchanged_by_stage2(trained_stage2, trained_stage1):
    assert sha256(trained_stage1["best"]) == trained_stage2["stage1_sha_before"]


def _independent_latents(stage1_best: Path, files: list[Path]) -> torch.Tensor:
    """Quantised latents of the training volumes, computed with MONAI's API and plain min-max scaling."""
    ckpt = load(stage1_best)
    model = build_vqvae(ckpt["network"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    zs = []
    with torch.no_grad():
        for f in files:
            a = np.asarray(nib.load(str(f)).dataobj, dtype=np.float64)
            a = (a - a.min()) / (a.max() - a.min())
            x = torch.from_numpy(a).float()[None, None]
            zs.append(model.encode_stage_2_inputs(x).double())
    return torch.cat(zs)


def test_scale_factor_is_inverse_std_of_latents(trained_stage2, trained_stage1, data_dir):
    files = sorted((data_dir / "train").glob("*.nii.gz"))
    z = _independent_latents(trained_stage1["best"], files)
    expected = 1.0 / float(z.std(unbiased=False))
    for p in (trained_stage2["best"], trained_stage2["latest"]):
        assert load(p)["scale_factor"] == pytest.approx(expected, rel=1e-4)


def test_channel_latent_norm_standardises_each_channel(tmp_path, data_dir, trained_stage1):
    """``diffusion.latent_norm: channel``: each channel's own mean and 1/std, measured on the same
    latents an independent MONAI encode gives; sampling undoes it (a round trip is the identity)."""
    from vqldm.latents import LatentNorm

    cfg = stage2_config(tmp_path, data_dir, trained_stage1)
    cfg["diffusion"]["latent_norm"] = "channel"
    cfg["diffusion"]["scale_factor_batches"] = 64  # the whole (tiny) training set
    assert run_cli("--quiet", "train-diffusion", "--config", str(write_config(tmp_path / "c.yaml", cfg))) == 0
    ckpt = load(tmp_path / "diffusion_checkpoints" / "best_model.pt")
    z = _independent_latents(trained_stage1["best"], sorted((data_dir / "train").glob("*.nii.gz")))
    flat = z.transpose(0, 1).flatten(1)
    assert ckpt["latent_shift"] == pytest.approx(flat.mean(1).tolist(), rel=1e-4, abs=1e-5)
    assert ckpt["latent_scale"] == pytest.approx((1.0 / flat.std(1, unbiased=False)).tolist(), rel=1e-4)
    norm = LatentNorm.from_checkpoint(ckpt)
    zn = norm.normalize(z.float())
    assert torch.allclose(zn.transpose(0, 1).flatten(1).std(1, unbiased=False), torch.ones(z.shape[1]), atol=1e-3)
    assert torch.allclose(norm.denormalize(zn), z.float(), atol=1e-5)
    lo, hi = norm.codebook_range(load_vqvae(trained_stage1["best"], make_runtime_cpu())[0])
    assert lo <= float(zn.min()) and float(zn.max()) <= hi
    assert run_cli("--quiet", "sample", "--config", str(tmp_path / "c.yaml"), "-n", "2", "--steps", "3",
                   "--out", str(tmp_path / "S")) == 0


def make_runtime_cpu():
    from vqldm.config import config_from_dict
    from vqldm.runtime import make_runtime

    return make_runtime(config_from_dict({"device": {"use_cuda": False}}))


def test_ema_weights_in_best_model(trained_stage2):
    best = load(trained_stage2["best"])
    latest = load(trained_stage2["latest"])
    ts = latest["training_state"]
    assert best["ema"] is True and ts["ema"] is not None
    raw, ema, snap = ts["model"], ts["ema"], best["state_dict"]
    assert snap.keys() == raw.keys() == ema.keys()
    for k in snap:
        assert torch.equal(snap[k], ema[k]), f"best_model.pt {k} is not the EMA weight"
    differs = [k for k in snap if snap[k].dtype.is_floating_point and not torch.equal(snap[k], raw[k])]
    assert differs, "best_model.pt holds the raw weights, not the EMA"
    # the latest snapshot's inference weights are the EMA too
    for k in snap:
        assert torch.equal(latest["state_dict"][k], ema[k])


def test_stage2_tensorboard(trained_stage2):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained_stage2["log_dir"]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "val/loss", "train/learning_rate"):
        assert tag in scalars, (tag, sorted(scalars))
    assert all(math.isfinite(e.value) for e in acc.Scalars("train/loss"))
    assert "diffusion/real_vs_generated" in acc.Tags()["images"]


# ----------------------------------------------------------------------------------- latents
def test_cache_run_explicit_scale_factor_and_frozen_stage1(tmp_path, data_dir, trained_stage1, captured_vqvae,
                                                           caplog):
    before = sha256(trained_stage1["best"])
    cfg = stage2_config(tmp_path, data_dir, trained_stage1)
    path = write_config(tmp_path / "c.yaml", cfg)
    with caplog.at_level(logging.INFO, logger="vqldm"):
        rc = run_cli("train-diffusion", "--config", path, "--set", "diffusion.scale_factor=0.37")
    assert rc == 0
    for p in ("best_model.pt", "latest_checkpoint.pt"):
        ckpt = load(tmp_path / "diffusion_checkpoints" / p)
        assert ckpt["scale_factor"] == pytest.approx(0.37)
        assert ckpt["latent_source"] == "cache"
    assert "latent cache" in caplog.text
    assert_stage1_untouched(captured_vqvae["model"], trained_stage1["best"])
    assert sha256(trained_stage1["best"]) == before


def test_on_the_fly_with_augmentation_and_frozen_stage1(tmp_path, data_dir, trained_stage1, captured_vqvae,
                                                        caplog):
    before = sha256(trained_stage1["best"])
    cfg = stage2_config(tmp_path, data_dir, trained_stage1, n_epochs=2)
    cfg["data"]["augmentation"] = True
    path = write_config(tmp_path / "c.yaml", cfg)
    with caplog.at_level(logging.INFO, logger="vqldm"):
        rc = run_cli("train-diffusion", "--config", path)
    assert rc == 0
    ckpt = load(tmp_path / "diffusion_checkpoints" / "best_model.pt")
    assert ckpt["latent_source"] == "on_the_fly"
    assert math.isfinite(ckpt["scale_factor"]) and ckpt["scale_factor"] > 0
    assert "on the fly" in caplog.text
    assert_stage1_untouched(captured_vqvae["model"], trained_stage1["best"])
    assert sha256(trained_stage1["best"]) == before


def test_latent_cache_switch_off(tmp_path, data_dir, trained_stage1):
    cfg = stage2_config(tmp_path, data_dir, trained_stage1)
    cfg["diffusion"]["latent_cache"] = False
    assert run_cli("--quiet", "train-diffusion", "--config", write_config(tmp_path / "c.yaml", cfg)) == 0
    assert load(tmp_path / "diffusion_checkpoints" / "best_model.pt")["latent_source"] == "on_the_fly"


# ----------------------------------------------------------------------------------- resume
def test_resume_is_bit_identical(tmp_path, data_dir, trained_stage1):
    a = stage2_config(tmp_path / "a", data_dir, trained_stage1, n_epochs=2)
    cfg_a = write_config(tmp_path / "a.yaml", a)
    assert run_cli("--quiet", "train-diffusion", "--config", cfg_a) == 0
    latest_a = Path(a["diffusion"]["checkpoints"]["output_dir"]) / "latest_checkpoint.pt"
    assert run_cli("--quiet", "train-diffusion", "--config", cfg_a, "--set", "diffusion.training.n_epochs=3",
                   "--set", f"diffusion.checkpoints.resume_from={latest_a}") == 0
    c = stage2_config(tmp_path / "c", data_dir, trained_stage1, n_epochs=3)
    assert run_cli("--quiet", "train-diffusion", "--config", write_config(tmp_path / "c.yaml", c)) == 0
    latest_c = Path(c["diffusion"]["checkpoints"]["output_dir"]) / "latest_checkpoint.pt"

    r, u = load(latest_a), load(latest_c)
    assert r["epoch"] == u["epoch"] == 3 and r["step"] == u["step"] == 6
    assert r["scale_factor"] == u["scale_factor"]
    for what in ("model", "ema"):
        ra, ua = r["training_state"][what], u["training_state"][what]
        assert ra.keys() == ua.keys()
        for k in ra:
            assert torch.equal(ra[k], ua[k]), f"{what}.{k} differs after resume"
    for k in r["state_dict"]:
        assert torch.equal(r["state_dict"][k], u["state_dict"][k]), k
    ro = r["training_state"]["optimizers"]["unet"]["state"]
    uo = u["training_state"]["optimizers"]["unet"]["state"]
    assert ro.keys() == uo.keys()
    for i in ro:
        for name in ro[i]:
            assert torch.equal(torch.as_tensor(ro[i][name]), torch.as_tensor(uo[i][name])), (i, name)
    assert r["val_loss"] == u["val_loss"]


def test_second_fresh_run_refused(tmp_path, data_dir, trained_stage1, capsys):
    cfg = stage2_config(tmp_path, data_dir, trained_stage1)
    path = write_config(tmp_path / "c.yaml", cfg)
    assert run_cli("--quiet", "train-diffusion", "--config", path) == 0
    best = tmp_path / "diffusion_checkpoints" / "best_model.pt"
    before = sha256(best)
    capsys.readouterr()
    rc = run_cli("--quiet", "train-diffusion", "--config", path)
    err = capsys.readouterr().err
    assert rc != 0 and "resume_from" in err and "--overwrite" in err and "Traceback" not in err
    assert sha256(best) == before


# ----------------------------------------------------------------------------------- errors
def test_missing_vqvae_path_named(tmp_path, data_dir, trained_stage1, capsys):
    missing = tmp_path / "nowhere" / "best_model.pt"
    cfg = stage2_config(tmp_path, data_dir, trained_stage1)
    cfg["diffusion"]["checkpoints"]["vqvae_path"] = str(missing)
    rc = run_cli("--quiet", "train-diffusion", "--config", write_config(tmp_path / "c.yaml", cfg))
    err = capsys.readouterr().err
    assert rc != 0
    assert str(missing) in err and "diffusion.checkpoints.vqvae_path" in err
    assert "Traceback" not in err
    assert not (tmp_path / "diffusion_checkpoints" / "best_model.pt").exists()


def test_invalid_vqvae_file_named(tmp_path, data_dir, trained_stage1, trained_stage2, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    cfg = stage2_config(tmp_path, data_dir, trained_stage1)
    path = write_config(tmp_path / "c.yaml", cfg)
    rc = run_cli("--quiet", "train-diffusion", "--config", path, "--set", f"diffusion.checkpoints.vqvae_path={junk}")
    err = capsys.readouterr().err
    assert rc != 0 and str(junk) in err and "Traceback" not in err
    # a stage-2 checkpoint where a stage-1 one belongs
    rc = run_cli("--quiet", "train-diffusion", "--config", path,
                 "--set", f"diffusion.checkpoints.vqvae_path={trained_stage2['best']}")
    err = capsys.readouterr().err
    assert rc != 0 and str(trained_stage2["best"]) in err and "Traceback" not in err


def test_embedding_dim_mismatch_named(tmp_path, data_dir, trained_stage1, capsys):
    cfg = stage2_config(tmp_path, data_dir, trained_stage1)
    # the config is self-consistent (8 == 8) but the stage-1 checkpoint has embedding_dim 4
    cfg["vqvae"]["embedding_dim"] = 8
    cfg["diffusion"]["in_channels"] = 8
    cfg["diffusion"]["out_channels"] = 8
    rc = run_cli("--quiet", "train-diffusion", "--config", write_config(tmp_path / "c.yaml", cfg))
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert "diffusion.in_channels" in err and "embedding_dim" in err
    assert not (tmp_path / "diffusion_checkpoints" / "best_model.pt").exists()


def test_stage1_network_disagreement_checkpoint_wins_with_warning(tmp_path, data_dir, trained_stage1, caplog):
    cfg = stage2_config(tmp_path, data_dir, trained_stage1)
    cfg["vqvae"]["num_channels"] = [16, 32]  # the checkpoint was trained with [8, 16]
    cfg["vqvae"]["num_embeddings"] = 64
    with caplog.at_level(logging.WARNING, logger="vqldm"):
        rc = run_cli("--quiet", "train-diffusion", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert rc == 0
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "vqvae.num_channels" in warnings or "vqvae.channels" in warnings, warnings
    assert "num_embeddings" in warnings
    assert load(tmp_path / "diffusion_checkpoints" / "best_model.pt")["vqvae_network"]["channels"] == [8, 16]


# ----------------------------------------------------------------------------------- schedulers
@pytest.mark.parametrize("key,value", [("type", "rflow"), ("prediction_type", "v_prediction")])
def test_other_training_objectives_train(tmp_path, data_dir, trained_stage1, key, value):
    """Rectified flow and v-prediction train too, and the checkpoint records which was used."""
    cfg = stage2_config(tmp_path, data_dir, trained_stage1)
    cfg["diffusion"]["scheduler"][key] = value
    assert run_cli("--quiet", "train-diffusion", "--config", write_config(tmp_path / "c.yaml", cfg)) == 0
    ckpt = load(tmp_path / "diffusion_checkpoints" / "best_model.pt")
    assert ckpt["scheduler"][key] == value
    assert math.isfinite(ckpt["val_loss"])


def test_timestep_bias_draws_the_noisy_end_more_often():
    """``timestep_bias`` b draws t with density ~ t^b: for b = 1 the share below T/2 is 1/4 (uniform: 1/2), the
    mean is 2T/3; b = 0 stays uniform, and so does a biased objective switched back."""
    from vqldm.priors.diffusion.objective import Objective

    sc = {"type": "ddpm", "num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4,
          "beta_end": 0.02, "prediction_type": "v_prediction"}
    z = torch.zeros(200_000, 1)
    torch.manual_seed(0)
    uniform, biased = Objective(sc).sample_timesteps(z).float(), Objective(sc, 1.0).sample_timesteps(z).float()
    assert uniform.min() == 0 and uniform.max() == 999 and abs(float((uniform < 500).float().mean()) - 0.5) < 0.01
    assert biased.min() >= 0 and biased.max() <= 999
    assert abs(float((biased < 500).float().mean()) - 0.25) < 0.01 and abs(float(biased.mean()) - 666.7) < 3
    switched = Objective(sc, 1.0)
    switched.set_biased(False)  # after timestep_bias_epochs: uniform again
    after = switched.sample_timesteps(z).float()
    assert abs(float((after < 500).float().mean()) - 0.5) < 0.01 and not switched.biased


def test_timestep_bias_epochs_switch_to_uniform_and_resume_in_the_same_phase(tmp_path, data_dir, trained_stage1,
                                                                             monkeypatch):
    """With ``timestep_bias_epochs: 1`` epoch 1 draws with the bias and epoch 2 uniformly; the checkpoints record
    the bias, its epochs and the phase, and a resumed run continues in the phase it stopped in."""
    from vqldm.priors.diffusion import task as task_mod

    cfg = stage2_config(tmp_path, data_dir, trained_stage1)
    cfg["diffusion"]["scheduler"].update(timestep_bias=1.0, timestep_bias_epochs=1)
    cfg["diffusion"]["training"]["n_epochs"] = 2
    draws = []
    orig = task_mod.Objective.sample_timesteps

    def spy(self, z0):
        t = orig(self, z0)
        draws.append((self.biased, t))
        return t

    monkeypatch.setattr(task_mod.Objective, "sample_timesteps", spy)
    assert run_cli("--quiet", "train-diffusion", "--config", write_config(tmp_path / "c.yaml", cfg)) == 0
    monkeypatch.undo()
    phases = [b for b, _ in draws]
    assert phases[0] is True and phases[-1] is False and phases == sorted(phases, reverse=True)
    ckpt = load(tmp_path / "diffusion_checkpoints" / "latest_checkpoint.pt")
    assert ckpt["timestep_bias"] == 1.0 and ckpt["timestep_bias_epochs"] == 1 and "timestep_bias" not in ckpt["scheduler"]
    from vqldm.priors.diffusion.objective import Objective
    from vqldm.priors.diffusion.task import DiffusionTask

    fresh = DiffusionTask.__new__(DiffusionTask)
    fresh.objective = Objective(ckpt["scheduler"], 1.0)
    assert fresh.objective.biased
    fresh.load_extra_state(ckpt["training_state"]["task"])
    assert fresh.objective.biased is False


def test_subprocess_train_diffusion_end_to_end(tmp_path, data_dir, trained_stage1):
    before = sha256(trained_stage1["best"])
    cfg = stage2_config(tmp_path, data_dir, trained_stage1)
    r = run_cli_subprocess("--quiet", "train-diffusion", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert r.returncode == 0, r.stderr
    ckpt = load(tmp_path / "diffusion_checkpoints" / "best_model.pt")
    assert ckpt["scale_factor"] > 0 and math.isfinite(ckpt["scale_factor"])
    assert sha256(trained_stage1["best"]) == before


def test_cached_latent_crops_of_larger_volumes(tmp_path, data_dir, trained_stage1, captured_vqvae):
    """16^3 patches of 32^3 volumes: whole-volume latents are cached and cropped to the 4^3 latent patch."""
    cfg = stage2_config(tmp_path, data_dir, trained_stage1)
    cfg["data"]["patch_size"] = [16, 16, 16]
    cfg["data"]["patches_per_volume"] = 2
    assert run_cli("--quiet", "train-diffusion", "--config", write_config(tmp_path / "c.yaml", cfg)) == 0
    ckpt = load(tmp_path / "diffusion_checkpoints" / "best_model.pt")
    assert ckpt["latent_source"] == "cache"
    assert ckpt["latent_shape"] == [4, 4, 4, 4]
    assert math.isfinite(ckpt["scale_factor"]) and ckpt["scale_factor"] > 0
    assert_stage1_untouched(captured_vqvae["model"], trained_stage1["best"])


def test_latent_cache_crops_are_foreground_biased_like_stage1():
    """A sparse volume larger than the patch: with ratio 1 every latent crop holds foreground."""
    from vqldm.latents import LatentCropDataset, foreground_masks

    img = torch.zeros(1, 64, 64, 16)
    img[0, 50:54, 50:54, 4:8] = 1.0  # one bright blob in a corner
    vols = [{"image": img}]
    lat = [torch.randn(4, 16, 16, 4)]  # stride 4
    masks = foreground_masks(vols, lat, [0.0, 1.0], 0.1, 4)
    assert masks[0].shape == (16, 16, 4) and masks[0].sum() > 0
    assert masks[0][12:14, 12:14, 1:2].all() and not masks[0][:8].any()
    torch.manual_seed(0)
    biased = LatentCropDataset(lat, [4, 4, 2], 1, masks, fg_ratio=1.0)
    uniform = LatentCropDataset(lat, [4, 4, 2], 1)

    def hits(ds):
        n = 0
        for _ in range(50):
            crop = ds[0]["latent"]
            # a crop holds foreground when it equals the latent at a masked position
            zz = lat[0]
            for sx in range(13):
                for sy in range(13):
                    for sz in range(3):
                        if torch.equal(zz[:, sx:sx + 4, sy:sy + 4, sz:sz + 2], crop):
                            n += bool(masks[0][sx:sx + 4, sy:sy + 4, sz:sz + 2].any())
        return n

    assert hits(biased) == 50
    assert hits(uniform) < 25


def test_latent_crop_of_a_patch_sized_volume_draws_as_without_masks():
    from vqldm.latents import LatentCropDataset

    lat = [torch.randn(4, 4, 4, 2)]
    ds = LatentCropDataset(lat, [4, 4, 2], 1, [torch.ones(4, 4, 2, dtype=torch.bool)], fg_ratio=0.75)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    _ = ds[0]
    uniform = LatentCropDataset(lat, [4, 4, 2], 1)
    torch.set_rng_state(before)
    _ = uniform[0]
    after_uniform = torch.get_rng_state()
    torch.set_rng_state(before)
    _ = ds[0]
    assert torch.equal(torch.get_rng_state(), after_uniform)  # same draws as without the masks
