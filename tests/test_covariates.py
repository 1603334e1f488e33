"""Covariates through cross-attention, several conditions at once, and the projection view (issue 17)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from vqldm.checkpoint import load_checkpoint
from vqldm.data.io import list_volumes, read_volume, write_volume
from vqldm.errors import VqldmError
from vqldm.latents import block_means
from vqldm.priors.diffusion.coarse import as_view, coarse_concat, condition_volume
from vqldm.priors.diffusion.conditions import Slots, guided, training_args, unet_args
from vqldm.priors.diffusion.covariates import asked_values, covariate_context, parse_cond, token_dim
from vqldm.priors.diffusion.unet import as_denoiser, build_unet

from conftest import labelled_prior, run_cli, tiny_config_dict, with_updates, write_config
from test_reliability import assert_clean_error, cli


# ------------------------------------------------------------------------------------- units
def test_a_covariate_token_carries_its_value_presence_and_identity_and_a_dropped_one_only_its_identity():
    ctx = covariate_context(torch.tensor([[0.25, 0.75]]), torch.tensor([[1.0, 0.0]]))
    assert ctx.shape == (1, 2, token_dim(2))
    kept, dropped = ctx[0, 0], ctx[0, 1]
    assert kept[0] == 0.25 and kept[-3] == 1.0 and kept[-2:].tolist() == [1.0, 0.0]
    assert bool((dropped[:-2] == 0).all()) and dropped[-2:].tolist() == [0.0, 1.0]
    other = covariate_context(torch.tensor([[0.5, 0.75]]), torch.tensor([[1.0, 0.0]]))
    assert not torch.equal(other[0, 0], kept) and torch.equal(other[0, 1], dropped)


def test_asked_covariates_are_normalised_by_the_training_range_and_checked(caplog):
    ranges = {"n": [5.0, 35.0], "z": [0.0, 1.0]}
    values, keep = asked_values({"n": 20.0}, ranges)
    assert values.tolist() == [0.5, 0.0] and keep.tolist() == [1.0, 0.0]
    with caplog.at_level(logging.WARNING, logger="vqldm"):
        values, _ = asked_values({"n": 50.0}, ranges)
    assert values[0] == pytest.approx(1.5) and "outside the training range [5, 35]" in caplog.text
    with pytest.raises(VqldmError, match="--cond thickness: unknown covariate; this model knows n, z"):
        asked_values({"thickness": 1.0}, ranges)
    assert parse_cond(["n=12", " z = 0.5"]) == {"n": 12.0, "z": 0.5}
    for bad in (["n"], ["n=lots"], ["=3"], ["n=1", "n=2"]):
        with pytest.raises(VqldmError, match="--cond"):
            parse_cond(bad)


def test_several_conditions_are_dropped_one_by_one_and_all_together():
    slots = Slots(2, 2, 2)
    b = 40000
    labels, coarse, values = torch.zeros(b, dtype=torch.long), torch.ones(b, 1, 2, 2, 2), torch.full((b, 2), 0.5)
    torch.manual_seed(0)
    out = training_args(slots, labels, coarse, values, 0.2)
    kept_class = out["class_labels"] == 0
    kept_view = out["concat"][:, 1, 0, 0, 0] == 1
    kept_cov = out["context"][:, :, token_dim(2) - 3] == 1
    # each is dropped on its own with 0.2, and all together with 0.2: kept with 0.8 * 0.8
    for kept in (kept_class, kept_view, kept_cov[:, 0], kept_cov[:, 1]):
        assert 0.62 < kept.float().mean() < 0.66
    none_kept = ~kept_class & ~kept_view & ~kept_cov.any(1)
    assert 0.194 < none_kept.float().mean() < 0.209  # the joint drop (0.2), plus coincidences (0.8 * 0.2^4)
    assert torch.equal(out["class_labels"][~kept_class], torch.full_like(out["class_labels"][~kept_class], 2))
    same = training_args(slots, labels, coarse, values, 0.0)
    assert bool((same["class_labels"] == 0).all()) and bool((same["concat"][:, 1] == 1).all())


def test_the_projection_view_is_the_mean_along_z_and_a_2d_image_gives_the_same_view(tmp_path):
    vol = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32)
    coarse = block_means(torch.from_numpy(vol)[None, None], 4)
    proj = as_view(coarse, "projection")
    assert proj.shape == coarse.shape and torch.allclose(proj[..., 0], coarse.mean(-1))
    assert torch.equal(proj[..., 0], proj[..., 1])
    write_volume(tmp_path / "v.nii.gz", vol)
    write_volume(tmp_path / "p.nii.gz", vol.mean(axis=2, keepdims=True))
    got = [condition_volume(tmp_path / f, np.asarray, [16, 16, 8], [4, 4, 2], 4, "projection") for f in ("v.nii.gz", "p.nii.gz")]
    assert torch.allclose(got[0], proj) and torch.allclose(got[1], proj, atol=1e-6)
    with pytest.raises(VqldmError, match=r"or \[32, 32, 1\] \(a projection along z\)"):
        condition_volume(tmp_path / "p.nii.gz", np.asarray, [32, 32, 8], [8, 8, 2], 4, "projection")
    with pytest.raises(VqldmError, match=r"shape \[16, 16, 1\]"):  # a volume model takes no 2D image
        condition_volume(tmp_path / "p.nii.gz", np.asarray, [16, 16, 8], [4, 4, 2], 4, "volume")


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def joint_run(tmp_path_factory, trained_stage1):
    """One tiny prior conditioned on a class, a covariate and the projection view at once."""
    return labelled_prior(tmp_path_factory.mktemp("joint_run"), trained_stage1["best"], covariates=["n_filaments"],
                          coarse_condition=True, coarse_view="projection")


def test_the_checkpoint_records_every_condition(joint_run):
    ckpt = load_checkpoint(joint_run["best"], kind="diffusion", what="test")
    gt = json.loads((joint_run["data"] / "ground_truth.json").read_text())
    counts = [t["n_filaments"] for t in gt["train"].values()]
    assert ckpt["classes"] == ["level0", "level1", "level2"]
    assert ckpt["covariates"] == {"n_filaments": [float(min(counts)), float(max(counts))]}
    assert ckpt["coarse_condition"] == {"stride": 4, "view": "projection"}
    net = ckpt["network"]
    assert net["with_conditioning"] and net["cross_attention_dim"] == token_dim(1) and net["num_class_embeds"] == 4
    assert Slots.of(net) == Slots(3, 2, 1)


def test_guidance_over_all_conditions_is_exact_at_zero_and_one(joint_run):
    import vqldm

    pipe = vqldm.load_model(joint_run["config_path"], device="cpu").pipeline
    vol = list_volumes(joint_run["data"] / "val")[0]
    pipe.set_coarse(str(vol))
    pipe.set_covariates({"n_filaments": 12.0})
    pipe.set_class("level1", 1.0)
    x, t = torch.randn(2, *pipe.latent_shape(None)), torch.full((2,), 700)
    den, slots = as_denoiser(pipe.unet, 2), pipe.slots
    with torch.no_grad():
        cond = den(x, t, unet_args(slots, x, pipe.asked()))
        null = den(x, t, unet_args(slots, x, None))
        assert not torch.allclose(cond, null)
        assert torch.equal(pipe.denoiser()(x, t), cond)
        for w, want in ((0.0, null), (1.0, cond)):
            assert torch.equal(guided(den, slots, pipe.asked(), w)(x, t), want)
        lo, hi = pipe.covariates["n_filaments"]
        ctx = unet_args(slots, x, pipe.asked())["context"]
        assert torch.allclose(ctx[:, 0, 0], torch.full((2,), (12.0 - lo) / (hi - lo)))
        view = coarse_concat(pipe.coarse.expand(2, -1, -1, -1, -1), torch.ones(2))
        direct = pipe.unet(x=torch.cat([x, view], 1), timesteps=t, class_labels=torch.tensor([1, 1]), context=ctx)
    assert torch.allclose(cond, direct)


def test_sampling_with_every_condition_records_them(joint_run, tmp_path):
    vol = list_volumes(joint_run["data"] / "val")[0]
    proj = tmp_path / "proj.nii.gz"
    write_volume(proj, read_volume(vol).array.mean(axis=2, keepdims=True))
    assert run_cli("--quiet", "sample", "--config", joint_run["config_path"], "-n", 2, "--steps", 2,
                   "--class", "level2", "--cond", "n_filaments=30", "--cond-volume", proj, "--guidance", 2,
                   "--out", tmp_path / "s") == 0
    rec = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert rec["class"] == "level2" and rec["guidance"] == 2.0
    assert rec["covariates"]["asked"] == {"n_filaments": 30.0} and "n_filaments" in rec["covariates"]["training_range"]
    assert rec["conditions"]["sample_0001"] == {"class": "level2", "covariates": {"n_filaments": 30.0}, "guidance": 2.0}
    assert rec["coarse_condition"]["view"] == "projection" and rec["coarse_condition"]["volume"] == str(proj)
    assert len(list_volumes(tmp_path / "s")) == 2


def test_bad_covariate_requests_are_refused_in_one_line(joint_run, trained_stage2, tmp_path, capsys):
    args = ["sample", "-n", 1, "--steps", 2]
    rc, _, err = cli(capsys, *args, "--config", joint_run["config_path"], "--cond", "thickness=3", "--out", tmp_path / "a")
    assert_clean_error(rc, err, "--cond thickness: unknown covariate; this model knows n_filaments")
    rc, _, err = cli(capsys, *args, "--config", trained_stage2["config_path"], "--cond", "n_filaments=3",
                     "--out", tmp_path / "b")
    assert_clean_error(rc, err, "--cond n_filaments", "without diffusion.covariates")
    rc, _, err = cli(capsys, *args, "--config", joint_run["config_path"], "--cond", "n_filaments", "--out", tmp_path / "c")
    assert_clean_error(rc, err, "--cond n_filaments: expected KEY=VALUE")
    unlabelled = with_updates(joint_run["config"], data__labels_file=None)
    rc, _, err = cli(capsys, "check", "--config", write_config(tmp_path / "u.yaml", unlabelled))
    assert_clean_error(rc, err, "diffusion.covariates", "data.labels_file")
    wrong = with_updates(joint_run["config"], diffusion__covariates=["thickness"],
                         diffusion__checkpoints__output_dir=str(tmp_path / "ck"))
    rc, _, err = cli(capsys, "train-diffusion", "--config", write_config(tmp_path / "w.yaml", wrong))
    assert_clean_error(rc, err, "diffusion.covariates: 'thickness' is not a numeric column")
    rc, _, err = cli(capsys, "export-bundle", "--config", joint_run["config_path"], "--out", tmp_path / "e")
    assert_clean_error(rc, err, "export-bundle")


def test_class_subfolders_train_a_class_conditional_prior(tmp_path, trained_stage1, data_dir):
    files = list_volumes(Path(data_dir) / "train") + list_volumes(Path(data_dir) / "val")
    for split in ("train", "val"):
        for k, cls in enumerate(("sparse", "dense")):
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            src = files[k % len(files)]
            (tmp_path / "d" / split / cls / src.name).write_bytes(src.read_bytes())
    cfg = tiny_config_dict(tmp_path, tmp_path / "d")
    cfg["data"]["class_folders"] = True
    cfg["diffusion"]["checkpoints"]["vqvae_path"] = str(trained_stage1["best"])
    cfg_path = write_config(tmp_path / "c.yaml", cfg)
    assert run_cli("--quiet", "train-diffusion", "--config", cfg_path) == 0
    ckpt = load_checkpoint(Path(cfg["diffusion"]["checkpoints"]["output_dir"]) / "best_model.pt", kind="diffusion",
                           what="test")
    assert ckpt["classes"] == ["dense", "sparse"]
    assert run_cli("--quiet", "sample", "--config", cfg_path, "-n", 1, "--steps", 2, "--class", "dense",
                   "--out", tmp_path / "s") == 0


def test_a_guide_with_other_covariates_cannot_guide(tmp_path):
    from vqldm.priors.diffusion.autoguidance import check_guide

    model = {"vqvae_sha256": "a", "latent_shape": [4, 8, 8, 8], "classes": None, "covariates": {"n": [5.0, 35.0]}}
    check_guide(dict(model), model, tmp_path / "g.pt", tmp_path / "m.pt")
    with pytest.raises(VqldmError, match="their covariates differ"):
        check_guide({**model, "covariates": {"n": [4.0, 35.0]}}, model, tmp_path / "g.pt", tmp_path / "m.pt")


def test_edits_follow_the_covariates_and_coarse_view_asked_for_and_record_them(joint_run, tmp_path, capsys):
    vol = list_volumes(joint_run["data"] / "val")[0]
    common = ["--quiet", "edit", "sdedit", "--config", joint_run["config_path"], "--input", vol, "-n", 1,
              "--steps", 4, "--strength", 0.5]
    assert run_cli(*common, "--cond", "n_filaments=30", "--cond-volume", vol, "--class", "level2", "--guidance", 2,
                   "--out", tmp_path / "e") == 0
    rec = json.loads((tmp_path / "e" / "sdedit.json").read_text())
    assert rec["covariates"] == {"n_filaments": 30.0} and rec["cond_volume"] == str(vol)
    assert rec["class"] == "level2" and rec["guidance"] == 2.0
    rc, _, err = cli(capsys, *common[1:], "--cond", "thickness=1", "--out", tmp_path / "f")
    assert_clean_error(rc, err, "--cond thickness: unknown covariate")


def test_check_reports_the_conditions_and_refuses_bad_labels_before_training(joint_run, tmp_path, capsys):
    assert run_cli("--quiet", "check", "--config", joint_run["config_path"], "--json") == 0
    report = json.loads(capsys.readouterr().out)
    gt = json.loads((joint_run["data"] / "ground_truth.json").read_text())
    counts = [t["n_filaments"] for t in gt["train"].values()]
    assert report["conditions"]["classes"] == {"level0": [1, 1], "level1": [1, 1], "level2": [1, 1]}
    assert report["conditions"]["covariates"] == {"n_filaments": [float(min(counts)), float(max(counts))]}
    ckpt = load_checkpoint(joint_run["best"], kind="diffusion", what="test")
    unet = sum(p.numel() for p in build_unet(ckpt["network"]).parameters())
    assert report["diffusion_parameters"] == unet  # the conditioned UNet that training builds
    assert run_cli("--quiet", "check", "--config", joint_run["config_path"]) == 0
    assert "conditions        3 classes (level0: 1 train / 1 val" in capsys.readouterr().out
    bad = tmp_path / "labels.csv"
    bad.write_text((joint_run["data"] / "labels.csv").read_text().replace("train/mt_0001.nii.gz", "train/gone.nii.gz"))
    rc, _, err = cli(capsys, "check", "--config", write_config(tmp_path / "b.yaml", with_updates(
        joint_run["config"], data__labels_file=str(bad))))
    assert_clean_error(rc, err, "data.labels_file", "without a label")
