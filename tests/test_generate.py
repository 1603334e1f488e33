"""Sampling, evaluation and the demo: ``vqldm sample``, ``vqldm evaluate``, ``vqldm demo``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, tiny_config_dict, write_config
from vqldm.data.io import list_volumes, read_volume
from vqldm.sampling.samplers import sample_latents
from vqldm.priors.diffusion.unet import build_unet

SCHED = {"type": "ddpm", "num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 0.0015,
         "beta_end": 0.0195, "prediction_type": "epsilon"}


# ------------------------------------------------------------------------------ pure samplers
@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpmpp_2m"])
def test_sampler_is_a_pure_function_of_its_inputs(kind):
    torch.manual_seed(0)
    unet = build_unet({"spatial_dims": 3, "in_channels": 4, "out_channels": 4, "channels": [16, 32],
                       "attention_levels": [False, False], "num_head_channels": [0, 8], "num_res_blocks": 1,
                       "norm_num_groups": 8}).eval()
    noise = torch.randn(2, 4, 8, 8, 8)
    den = lambda x, t, c: unet(x=x, timesteps=t)  # noqa: E731
    global_state = torch.get_rng_state()
    a = sample_latents(kind, den, noise, 5, SCHED, generator=torch.Generator().manual_seed(1))
    b = sample_latents(kind, den, noise, 5, SCHED, generator=torch.Generator().manual_seed(1))
    assert a.shape == noise.shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, noise)
    assert torch.equal(noise, noise.clone())  # the input is not modified in place
    assert torch.equal(torch.get_rng_state(), global_state)  # its randomness came from the generator alone
    if kind == "ddpm":  # the stochastic sampler follows its generator
        c = sample_latents(kind, den, noise, 5, SCHED, generator=torch.Generator().manual_seed(2))
        assert not torch.equal(a, c)


def test_sampler_registry_refuses_an_unknown_or_mismatched_sampler():
    from vqldm.errors import VqldmError
    from vqldm.sampling.samplers import SAMPLERS, check_sampler

    assert {"ddpm", "ddim", "dpmpp_2m", "rflow"} <= set(SAMPLERS)
    with pytest.raises(VqldmError, match="no such sampler"):
        check_sampler("euler_ancestral", SCHED)
    with pytest.raises(VqldmError, match="rflow objective; use rflow"):
        check_sampler("ddim", dict(SCHED, type="rflow"))


def test_condition_reaches_the_denoiser():
    seen = []

    def den(x, t, c):
        seen.append(c)
        return torch.zeros_like(x)

    sample_latents("ddim", den, torch.randn(1, 2, 4, 4, 4), 3, SCHED, condition={"class_labels": "a"})
    assert seen == [{"class_labels": "a"}] * 3


def test_rflow_sampler_integrates_a_known_velocity():
    """With the exact velocity of a point mass at x0 (v = x0 - noise), the flow lands on x0."""
    sc = dict(SCHED, type="rflow")
    noise = torch.randn(1, 2, 4, 4, 4)
    x0 = torch.full_like(noise, 0.5)
    out = sample_latents("rflow", lambda x, t, c: x0 - noise, noise, 10, sc)
    assert torch.allclose(out, x0, atol=1e-4)


# ------------------------------------------------------------------------------ vqldm sample
@pytest.fixture(scope="module")
def trained_stage2(tmp_path_factory, data_dir) -> dict:
    """Both stages trained long enough (about 10 s each) that decoded samples are not all black."""
    root = tmp_path_factory.mktemp("generate_run")
    cfg = tiny_config_dict(root, data_dir)
    cfg["data"]["patches_per_volume"] = 4
    cfg["vqvae"].update({"num_channels": [16, 32], "num_res_channels": 32, "num_embeddings": 32,
                         "embedding_dim": 8, "learning_rate": 2e-3})
    cfg["vqvae"]["training"]["n_epochs"] = 12
    cfg["diffusion"].update({"in_channels": 8, "out_channels": 8, "learning_rate": 2e-3})
    cfg["diffusion"]["training"]["n_epochs"] = 6
    path = write_config(root / "config.yaml", cfg)
    assert run_cli("--quiet", "train-vqvae", "--config", str(path)) == 0
    assert run_cli("--quiet", "train-diffusion", "--config", str(path)) == 0
    return {"config": cfg, "config_path": path}


def _sample(trained_stage2, out, *extra):
    return run_cli("--quiet", "sample", "--config", str(trained_stage2["config_path"]), "--num-samples", "3",
                   "--scheduler", "ddim", "--steps", "10", "--seed", "5", "--out", str(out), *extra)


def test_sample_writes_distinct_finite_volumes_and_is_repeatable(trained_stage2, tmp_path):
    assert _sample(trained_stage2, tmp_path / "A") == 0
    assert _sample(trained_stage2, tmp_path / "B") == 0
    files_a = list_volumes(tmp_path / "A")
    assert [f.name for f in files_a] == ["sample_0000.nii.gz", "sample_0001.nii.gz", "sample_0002.nii.gz"]
    vols = [read_volume(f) for f in files_a]
    for v in vols:
        assert v.array.shape == (32, 32, 32)
        assert np.isfinite(v.array).all() and v.array.min() >= 0 and v.array.max() <= 1
    assert not np.array_equal(vols[0].array, vols[1].array)
    assert not np.array_equal(vols[1].array, vols[2].array)
    for f in files_a:  # same seed: the same files, byte for byte
        assert f.read_bytes() == (tmp_path / "B" / f.name).read_bytes()
    with Image.open(tmp_path / "A" / "preview.png") as im:
        assert im.size[0] > 0
    rec = json.loads((tmp_path / "A" / "samples.json").read_text())
    assert rec["seed"] == 5 and rec["scheduler"] == "ddim" and rec["steps"] == 10
    assert len(rec["diffusion_sha256"]) == 64 and len(rec["vqvae_sha256"]) == 64
    # the voxel spacing of the training data travels into the samples
    train = read_volume(list_volumes(Path(trained_stage2["config"]["data"]["train_data_dir"]))[0])
    assert np.allclose(vols[0].spacing, train.spacing)


def test_sample_with_another_stage1_file_is_refused_unless_asked_for(trained_stage2, tmp_path, capsys, caplog):
    """The recorded stage-1 file must be the one the UNet learned; one given explicitly is used with a warning."""
    import shutil

    vq_dir = Path(trained_stage2["config"]["vqvae"]["checkpoints"]["output_dir"])
    diff_dir = Path(trained_stage2["config"]["diffusion"]["checkpoints"]["output_dir"])
    other = tmp_path / "other_stage1.pt"  # another stage-1 checkpoint of the same network: its latest one
    shutil.copy(vq_dir / "latest_checkpoint.pt", other)
    with caplog.at_level("WARNING", logger="vqldm"):
        assert _sample(trained_stage2, tmp_path / "A", "--vqvae-checkpoint", str(other)) == 0
    assert "is not the stage-1 checkpoint that" in caplog.text and "decoding with it anyway" in caplog.text
    moved = tmp_path / "moved"
    shutil.copytree(diff_dir, moved)
    ckpt = torch.load(moved / "best_model.pt", weights_only=True)
    ckpt["vqvae_path"] = str(other)  # as if the recorded file had been replaced by another
    torch.save(ckpt, moved / "best_model.pt")
    assert _sample(trained_stage2, tmp_path / "B", "--diffusion-checkpoint", str(moved / "best_model.pt")) == 2
    err = capsys.readouterr().err
    assert "pass the right one with --vqvae-checkpoint" in err and "Traceback" not in err


def test_sample_seed_changes_samples_and_tiff_output(trained_stage2, tmp_path):
    assert _sample(trained_stage2, tmp_path / "A") == 0
    assert run_cli("--quiet", "sample", "--config", str(trained_stage2["config_path"]), "--num-samples", "1",
                   "--scheduler", "ddim", "--steps", "10", "--seed", "6", "--format", "tiff",
                   "--out", str(tmp_path / "T")) == 0
    t = read_volume(tmp_path / "T" / "sample_0000.tif").array
    a = read_volume(tmp_path / "A" / "sample_0000.nii.gz").array
    assert t.shape == a.shape == (32, 32, 32)
    assert not np.array_equal(t, a)


def test_sample_refuses_a_folder_with_samples(trained_stage2, tmp_path, capsys):
    assert _sample(trained_stage2, tmp_path / "A") == 0
    assert _sample(trained_stage2, tmp_path / "A") != 0
    assert "--overwrite" in capsys.readouterr().err
    assert _sample(trained_stage2, tmp_path / "A", "--overwrite") == 0


def test_snap_off_decodes_the_continuous_latent(trained_stage2, tmp_path):
    assert _sample(trained_stage2, tmp_path / "on", "--snap", "on") == 0
    assert _sample(trained_stage2, tmp_path / "off", "--snap", "off") == 0
    on = read_volume(tmp_path / "on" / "sample_0000.nii.gz").array
    off = read_volume(tmp_path / "off" / "sample_0000.nii.gz").array
    assert not np.array_equal(on, off)
    assert json.loads((tmp_path / "off" / "samples.json").read_text())["snap_to_codebook"] is False


def test_ddpm_and_shape_option(trained_stage2, tmp_path):
    assert run_cli("--quiet", "sample", "--config", str(trained_stage2["config_path"]), "-n", "2",
                   "--scheduler", "ddpm", "--steps", "5", "--shape", "64", "64", "32",
                   "--out", str(tmp_path / "S")) == 0
    assert read_volume(tmp_path / "S" / "sample_0001.nii.gz").array.shape == (64, 64, 32)
    # a size the networks cannot produce is refused, naming the option
    assert run_cli("--quiet", "sample", "--config", str(trained_stage2["config_path"]), "-n", "1",
                   "--shape", "30", "30", "30", "--out", str(tmp_path / "X")) != 0


def test_sample_refuses_a_sampler_the_model_was_not_trained_for(trained_stage2, capsys, tmp_path):
    assert run_cli("--quiet", "sample", "--config", str(trained_stage2["config_path"]), "-n", "1",
                   "--scheduler", "rflow", "--out", str(tmp_path / "R")) != 0
    err = capsys.readouterr().err
    assert "--scheduler rflow" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ vqldm evaluate
def test_evaluate_writes_metrics_and_report(trained_stage2, tmp_path):
    assert _sample(trained_stage2, tmp_path / "S") == 0
    cfg = str(trained_stage2["config_path"])
    assert run_cli("--quiet", "evaluate", "--config", cfg, "--out", str(tmp_path / "E"),
                   "--samples", str(tmp_path / "S")) == 0
    m = json.loads((tmp_path / "E" / "metrics.json").read_text())
    s1 = m["stage1"]
    assert {"psnr", "ssim", "dice", "codebook_usage", "codebook_perplexity"} <= set(s1)
    assert 0 < s1["codebook_usage"] <= 1 and s1["codebook_perplexity"] >= 1
    stats = m["generation"]["statistics"]
    for key in ("foreground_fraction", "filament_length", "n_components", "orientation_azimuth", "intensity"):
        assert key in stats and "real_vs_real" in stats[key] and "generated_vs_real" in stats[key]
    assert "mmd" in m["generation"] and "diversity" in m["generation"]
    # the three rows: real train, their reconstructions and the samples, each against the same floor
    rows = m["stages"]["ratios"]
    assert set(rows) == set(stats) | {"mmd"}
    for name, r in rows.items():
        entry = stats[name] if name != "mmd" else m["generation"]["mmd"]
        assert set(r) - {"samples_interval"} == {"real_train", "reconstruction", "samples", "limited_by"}
        assert r["samples"] == entry["ratio"]
        # the samples' bracket over bootstrap redraws, where the ratio is defined
        assert r.get("samples_interval") == entry.get("ratio_interval")
        assert ("samples_interval" in r) == (r["samples"] is not None)
        assert r["limited_by"] in ("none (passes)", "the data (train and val differ)", "stage 1 (autoencoder)",
                                   "stage 2 (prior)")
    report = (tmp_path / "E" / "report.md").read_text()
    assert "Stage 1" in report and "real_vs_generated.png" in report
    assert "Which stage limits each statistic" in report and "stages.png" in report
    for png in ("reconstruction.png", "real_vs_generated.png", "histograms.png", "stages.png"):
        with Image.open(tmp_path / "E" / png) as im:
            assert im.size[0] > 10


@pytest.mark.parametrize("ratios,stage", [
    ((0.9, 1.1, 1.5), "none (passes)"),
    ((0.9, 1.1, 5.0), "stage 2 (prior)"),
    ((0.9, 6.0, 9.0), "stage 1 (autoencoder)"),
    ((0.9, None, 9.0), "stage 1 (autoencoder)"),
    ((3.0, 6.0, 9.0), "the data (train and val differ)"),
])
def test_limiting_stage_reads_the_three_rows(ratios, stage):
    from vqldm.commands.evaluate import limiting_stage

    assert limiting_stage(*ratios) == stage


def test_evaluate_without_samples_reports_stage1_only(trained_stage2, tmp_path):
    assert run_cli("--quiet", "evaluate", "--config", str(trained_stage2["config_path"]),
                   "--out", str(tmp_path / "E")) == 0
    m = json.loads((tmp_path / "E" / "metrics.json").read_text())
    assert "stage1" in m and "generation" not in m


# ------------------------------------------------------------------------------ vqldm demo
def test_demo_runs_the_whole_pipeline(tmp_path, monkeypatch, capsys):
    """The demo's five steps with a test-sized preset (the real preset is timed by hand, see docs)."""
    import vqldm.commands.demo as demo

    tiny = tiny_config_dict(tmp_path / "unused", tmp_path / "unused")
    tiny["vqvae"]["training"]["n_epochs"] = 1
    tiny["diffusion"]["training"]["n_epochs"] = 1
    monkeypatch.setitem(demo.PRESETS, "test", {"config": None, "shape": (32, 32, 32), "num_train": 4,
                                               "num_val": 4, "samples": 4})
    monkeypatch.setattr(demo, "preset_config_dict", lambda name: tiny if name == "test" else None)
    out = tmp_path / "demo"
    res = demo.run_demo(out, progress=False, preset="test")
    printed = capsys.readouterr().out
    assert "vqldm demo finished" in printed and str(out / "evaluation" / "report.md") in printed
    assert len(list_volumes(out / "samples")) == 4
    assert (out / "samples" / "preview.png").exists()
    assert (out / "evaluation" / "metrics.json").exists()
    assert (out / "config.yaml").exists()
    assert set(res["timings"]) >= {"stage1_s", "stage2_s", "sample_s", "evaluate_s", "total_s"}
    saved = json.loads((out / "timings.json").read_text())
    assert saved["preset"] == "test" and saved["threads"] >= 1 and saved["device"]
    assert saved["device"] == json.loads((out / "samples" / "samples.json").read_text())["device"]
    assert saved["total_s"] == pytest.approx(res["timings"]["total_s"])
    assert f"stage 2 {res['timings']['stage2_s']:.0f} s" in printed
    rate = json.loads((out / "evaluation" / "metrics.json").read_text())["generation"]["summary"]["redraw_pass_rate"]
    assert f"within 2x in {rate:.0%} of 100 bootstrap redraws of the samples" in printed
    demo.run_demo(out, progress=False, preset="test", overwrite=True)  # a rerun keeps the first run's times
    kept = [json.loads(p.read_text()) for p in out.glob("previous_*/timings.json")]
    assert [k["total_s"] for k in kept] == [saved["total_s"]]
    assert json.loads((out / "timings.json").read_text())["total_s"] != saved["total_s"]


def test_demo_preset_configs_are_valid_and_point_into_out(tmp_path):
    from vqldm.config import config_from_dict
    from vqldm.commands.demo import PRESETS, _under, preset_config_dict

    for name in PRESETS:
        d = _under(tmp_path, preset_config_dict(name))
        cfg = config_from_dict(d)
        assert cfg.vqvae.checkpoints.output_dir.startswith(str(tmp_path))
        assert cfg.diffusion.checkpoints.vqvae_path.startswith(str(tmp_path))
        assert list(cfg.data.patch_size) == list(PRESETS[name]["shape"])


def test_clip_range_bounds_the_predicted_clean_latent():
    """DDIM's last step returns the predicted clean latent: with clip_range it lies inside the range."""
    noise = torch.randn(2, 3, 4, 4, 4)
    wild = lambda x, t, c: 5.0 * torch.ones_like(x)  # noqa: E731  (a badly wrong epsilon)
    free = sample_latents("ddim", wild, noise, 5, SCHED)
    bounded = sample_latents("ddim", wild, noise, 5, SCHED, clip_range=(-0.5, 0.25))
    assert free.abs().max() > 1.0
    assert bounded.min() >= -0.5 - 1e-6 and bounded.max() <= 0.25 + 1e-6


def test_codebook_range_covers_every_quantised_latent():
    from vqldm.autoencoder.model import build_vqvae, codebook_range, quantized_latent

    torch.manual_seed(0)
    vq = build_vqvae({"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [8, 8],
                      "num_res_channels": 8, "num_res_layers": 1, "downsample_parameters": [[2, 4, 1, 1]] * 2,
                      "upsample_parameters": [[2, 4, 1, 1, 0]] * 2, "num_embeddings": 16, "embedding_dim": 4,
                      "commitment_cost": 0.25, "decay": 0.9, "dropout": 0.0, "act": "RELU",
                      "output_act": None}).eval()
    with torch.no_grad():
        z = quantized_latent(vq, torch.rand(2, 1, 16, 16, 16)) * 2.0
    lo, hi = codebook_range(vq, 2.0)
    assert lo <= float(z.min()) and float(z.max()) <= hi


@pytest.mark.parametrize("kind,steps", [("ddpm", 50), ("ddpm", 1000), ("ddim", 50)])
def test_samplers_reach_the_data_distribution_with_the_exact_denoiser(kind, steps):
    """Data ~ N(0, 0.5^2): with the Bayes-optimal epsilon every sampler must end near std 0.5.

    MONAI's DDPM step always moves from t to t-1, so DDPM with fewer steps than training
    timesteps must take the strided (DDIM eta=1) route or it ends far too noisy.
    """
    from vqldm.priors.diffusion.objective import build_train_scheduler

    ab = build_train_scheduler(SCHED).alphas_cumprod
    s2 = 0.25

    def eps_star(x, t, c):
        a = ab[t].view(-1, 1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * s2 + 1 - a)

    torch.manual_seed(0)
    out = sample_latents(kind, eps_star, torch.randn(64, 1, 8, 8, 8), steps, SCHED)
    # coarse steps with the posterior mean under-disperse a little (0.43 for 50 stochastic steps);
    # the t -> t-1 stepping bug this guards against ends at 0.94
    tol = 0.03 if steps == 1000 else 0.1
    assert abs(float(out.std()) - 0.5) < tol, float(out.std())


def test_weight_ema_copies_the_codebook_instead_of_averaging_it():
    from vqldm.engine.ema import EMA
    from vqldm.autoencoder.model import build_vqvae

    net = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [8], "num_res_channels": 8,
           "num_res_layers": 1, "downsample_parameters": [[2, 4, 1, 1]], "upsample_parameters": [[2, 4, 1, 1, 0]],
           "num_embeddings": 8, "embedding_dim": 4, "commitment_cost": 0.25, "decay": 0.9, "dropout": 0.0,
           "act": "RELU", "output_act": None}
    model = build_vqvae(net)
    ema = EMA(model, decay=0.99)
    q = model.quantizer.quantizer
    with torch.no_grad():
        q.embedding.weight.add_(10.0)  # e.g. a dead-code restart
        q.ema_w.add_(10.0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    ema.update(model)
    eq = ema.model.quantizer.quantizer
    assert torch.equal(eq.embedding.weight, q.embedding.weight)
    assert torch.equal(eq.ema_w, q.ema_w)
    trained = [(e, p) for e, p in zip(ema.model.parameters(), model.parameters()) if p.requires_grad]
    assert all(not torch.equal(e, p) for e, p in trained)  # trained weights are averaged, not copied


def test_an_output_path_that_is_a_file_gets_one_clear_line(trained_stage2, tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    assert _sample(trained_stage2, blocker) == 2
    err = capsys.readouterr().err
    assert "vqldm: error:" in err and "not_a_folder" in err and "Traceback" not in err
