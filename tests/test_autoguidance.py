"""Autoguidance: training keeps an early snapshot as the guide; sampling extrapolates away from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vqldm.checkpoint import file_sha256, load_checkpoint
from vqldm.errors import VqldmError
from vqldm.priors.diffusion.autoguidance import GUIDE, autoguided

from conftest import copy_tree, run_cli, tiny_config_dict, with_updates, write_config
from test_reliability import assert_clean_error, cli


# ---------------------------------------------------------------------------------- the mix
def _counting(scale: float, calls: list):
    def f(x, t, condition=None):
        calls.append(int(t[0]))
        return x * scale
    return f


def test_the_guide_is_mixed_in_only_from_min_timestep_and_not_called_below():
    model_calls, guide_calls = [], []
    den = autoguided(_counting(2.0, model_calls), _counting(1.0, guide_calls), weight=3.0, min_timestep=600)
    x = torch.randn(2, 4, 3, 3, 3)
    high, low = torch.full((2,), 700), torch.full((2,), 599)
    assert torch.allclose(den(x, high), x + 3.0 * (2.0 * x - x))  # guide + w (model - guide)
    assert torch.equal(den(x, low), 2.0 * x)
    assert guide_calls == [700] and model_calls == [700, 599]


def test_weight_one_is_the_model_exactly_and_never_calls_the_guide():
    guide_calls = []
    den = autoguided(lambda x, t, c=None: x * 2.0, _counting(1.0, guide_calls), weight=1.0, min_timestep=0)
    x = torch.randn(1, 4, 3, 3, 3)
    assert torch.equal(den(x, torch.full((1,), 999)), x * 2.0) and guide_calls == []


def test_rescale_pulls_each_guided_sample_back_to_the_models_spread():
    from vqldm.priors.diffusion.unet import guidance_rescale

    model = _counting(2.0, [])
    x = torch.randn(2, 4, 3, 3, 3)
    x[1] *= 5.0  # the two samples differ in spread: the rescale is per sample
    high, low = torch.full((2,), 700), torch.full((2,), 599)
    guided = autoguided(model, _counting(1.0, []), weight=3.0, min_timestep=600)(x, high)
    full = autoguided(model, _counting(1.0, []), weight=3.0, min_timestep=600, rescale=1.0)
    out = full(x, high)
    assert torch.allclose(out.flatten(1).std(dim=1), (2.0 * x).flatten(1).std(dim=1), rtol=1e-5)
    assert torch.allclose(out / out.flatten(1).std(dim=1).view(-1, 1, 1, 1, 1),
                          guided / guided.flatten(1).std(dim=1).view(-1, 1, 1, 1, 1), rtol=1e-5)  # same direction
    half = autoguided(model, _counting(1.0, []), weight=3.0, min_timestep=600, rescale=0.5)(x, high)
    assert torch.allclose(half, 0.5 * guided + 0.5 * out, rtol=1e-5, atol=1e-6)
    assert torch.equal(full(x, low), 2.0 * x)  # below min_timestep: the model alone, untouched
    assert guidance_rescale(guided, 2.0 * x, 0.0) is guided  # rescale 0: the guided output itself


# ---------------------------------------------------------------------------------- training keeps the guide
@pytest.fixture(scope="module")
def guided_run(tmp_path_factory, data_dir, trained_stage1):
    """A 2-epoch stage 2 that keeps its epoch-1 weights as the guide."""
    root = tmp_path_factory.mktemp("guided_run")
    cfg = tiny_config_dict(root, data_dir)
    cfg["diffusion"]["checkpoints"]["vqvae_path"] = str(trained_stage1["best"])
    cfg["diffusion"]["training"]["n_epochs"] = 2
    cfg["diffusion"]["autoguidance"] = {"guide_epoch": 1, "weight": 3.0, "min_timestep": 500}
    cfg_path = write_config(root / "config.yaml", cfg)
    assert run_cli("--quiet", "train-diffusion", "--config", cfg_path) == 0
    out = Path(cfg["diffusion"]["checkpoints"]["output_dir"])
    return {"root": root, "config": cfg, "config_path": cfg_path, "out": out, "best": out / "best_model.pt",
            "guide": out / GUIDE}


def test_training_keeps_the_guide_and_every_later_checkpoint_records_it(guided_run):
    guide = load_checkpoint(guided_run["guide"], kind="diffusion", what="test")
    assert guide["epoch"] == 1
    rec = {"epoch": 1, "sha256": file_sha256(guided_run["guide"])}
    for name in ("best_model.pt", "latest_checkpoint.pt"):
        ckpt = load_checkpoint(guided_run["out"] / name, kind="diffusion", what="test")
        assert ckpt["epoch"] == 2 and ckpt["snapshots"] == {GUIDE: rec}
    # the guide is a diffusion checkpoint of its own: not the final weights
    final = load_checkpoint(guided_run["best"], kind="diffusion", what="test")["state_dict"]
    assert any(not torch.equal(final[k], v) for k, v in guide["state_dict"].items())


def test_a_fresh_run_over_it_archives_the_guide_and_a_resume_elsewhere_brings_it_along(guided_run, tmp_path):
    root = copy_tree(guided_run["root"], tmp_path / "run")
    cfg = json.loads(json.dumps(guided_run["config"]).replace(str(guided_run["root"]), str(root)))
    out = Path(cfg["diffusion"]["checkpoints"]["output_dir"])
    first = file_sha256(out / GUIDE)
    # resume the copied run into a new folder for one more epoch: the guide comes along, unchanged
    cont = with_updates(cfg, diffusion__training__n_epochs=3,
                        diffusion__checkpoints__resume_from=str(out / "latest_checkpoint.pt"),
                        diffusion__checkpoints__output_dir=str(tmp_path / "cont"))
    assert run_cli("--quiet", "train-diffusion", "--config", write_config(tmp_path / "cont.yaml", cont)) == 0
    assert file_sha256(tmp_path / "cont" / GUIDE) == first
    rec = load_checkpoint(tmp_path / "cont" / "latest_checkpoint.pt", kind="diffusion", what="test")["snapshots"]
    assert rec == {GUIDE: {"epoch": 1, "sha256": first}}
    # a fresh run with --overwrite moves the earlier guide aside with the other checkpoints
    assert run_cli("--quiet", "train-diffusion", "--config", write_config(tmp_path / "c.yaml", cfg), "--overwrite") == 0
    archived = list(out.glob(f"previous_*/{GUIDE}"))
    assert len(archived) == 1 and file_sha256(archived[0]) == first


# ---------------------------------------------------------------------------------- sampling
def test_the_pipeline_mixes_the_guide_unet_as_configured(guided_run):
    import vqldm

    model = vqldm.load_model(guided_run["config_path"], device="cpu")
    pipe = model.pipeline
    pipe.set_autoguidance(3.0, 500)
    x = torch.randn(2, *pipe.latent_shape(None))
    with torch.no_grad():
        for t in (900, 100):
            tt = torch.full((2,), t)
            main, guide = pipe.unet(x=x, timesteps=tt), pipe.guide(x=x, timesteps=tt)
            want = torch.lerp(guide, main, 3.0) if t >= 500 else main
            assert torch.allclose(pipe.denoiser()(x, tt), want, atol=1e-6)
    assert pipe.autoguidance_record()["guide"] == str(guided_run["guide"])
    assert pipe.autoguidance_record()["guide_epoch"] == 1


def test_sample_records_the_guide_and_guiding_with_the_model_itself_is_plain_sampling(guided_run, tmp_path):
    common = ["--quiet", "sample", "--config", guided_run["config_path"], "-n", 2, "--steps", 3, "--seed", 5]
    assert run_cli(*common, "--out", tmp_path / "guided") == 0
    rec = json.loads((tmp_path / "guided" / "samples.json").read_text())["autoguidance"]
    assert rec["weight"] == 3.0 and rec["min_timestep"] == 500 and rec["guide_epoch"] == 1 and rec["rescale"] == 0.0
    assert rec["guide_sha256"] == file_sha256(guided_run["guide"])
    assert run_cli(*common, "--autoguidance", 1, "--out", tmp_path / "plain") == 0
    assert json.loads((tmp_path / "plain" / "samples.json").read_text())["autoguidance"] is None
    import vqldm

    model = vqldm.load_model(guided_run["config_path"], device="cpu")
    kw = {"seed": 5, "sampler": "ddim", "steps": 3, "batch_size": 2}
    plain = model.sample(2, autoguidance=1.0, **kw).volumes
    itself = model.sample(2, autoguidance=3.0, guide_checkpoint=guided_run["best"], **kw).volumes
    assert (plain == itself).all()  # guide + w (model - guide) with guide = model is the model, bit for bit


def test_a_missing_or_foreign_guide_is_refused_in_one_line(guided_run, trained_stage2, tmp_path, capsys):
    args = ["sample", "-n", 1, "--steps", 2]
    rc, _, err = cli(capsys, *args, "--config", trained_stage2["config_path"], "--autoguidance", 2,
                     "--out", tmp_path / "a")
    assert_clean_error(rc, err, "records no guide", "--autoguidance 1")
    # a guide_model.pt that is not the one the run recorded
    root = copy_tree(guided_run["out"], tmp_path / "ckpts")
    (root / GUIDE).write_bytes((root / "latest_checkpoint.pt").read_bytes())
    rc, _, err = cli(capsys, *args, "--config", guided_run["config_path"], "--diffusion-checkpoint",
                     root / "best_model.pt", "--out", tmp_path / "b")
    assert_clean_error(rc, err, str(root / GUIDE), "sha256")
    # a guide of another latent (here: another recorded stage 1)
    other = load_checkpoint(guided_run["guide"], kind="diffusion", what="test")
    other["vqvae_sha256"] = "0" * 64
    torch.save(other, tmp_path / "other.pt")
    rc, _, err = cli(capsys, *args, "--config", guided_run["config_path"], "--guide-checkpoint", tmp_path / "other.pt",
                     "--out", tmp_path / "c")
    assert_clean_error(rc, err, "--guide-checkpoint", "vqvae_sha256")
    rc, _, err = cli(capsys, *args, "--config", guided_run["config_path"], "--autoguidance", 0.5,
                     "--out", tmp_path / "d")
    assert_clean_error(rc, err, "--autoguidance")
    rc, _, err = cli(capsys, *args, "--config", guided_run["config_path"], "--autoguidance", 1,
                     "--guide-checkpoint", guided_run["guide"], "--out", tmp_path / "e")
    assert_clean_error(rc, err, "--guide-checkpoint needs an autoguidance weight above 1")
    assert not any((tmp_path / d).exists() for d in "abcde")


@pytest.mark.parametrize("key,value", [("guide_epoch", 2), ("weight", 0.5), ("min_timestep", 1000), ("rescale", 1.5)])
def test_bad_autoguidance_settings_name_their_key(guided_run, tmp_path, capsys, key, value):
    cfg = with_updates(guided_run["config"], **{f"diffusion__autoguidance__{key}": value})
    rc, _, err = cli(capsys, "check", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert_clean_error(rc, err, f"diffusion.autoguidance.{key}")


def test_the_token_prior_and_the_bundle_refuse_autoguidance(guided_run, tmp_path, capsys):
    rc, _, err = cli(capsys, "sample", "--config", guided_run["config_path"], "--prior", "transformer",
                     "--autoguidance", 2, "--out", tmp_path / "t")
    assert_clean_error(rc, err, "--autoguidance")
    rc, _, err = cli(capsys, "export-bundle", "--config", guided_run["config_path"], "--out", tmp_path / "b")
    assert_clean_error(rc, err, "diffusion.autoguidance.weight")
    from vqldm.api import Model

    with pytest.raises(VqldmError, match="token prior"):
        Model(None, None, "transformer").sample(1, autoguidance=2.0)


def test_edits_take_autoguidance_only_when_asked(guided_run, trained_stage2, data_dir, tmp_path, capsys):
    from vqldm.data.io import list_volumes

    vol = list_volumes(Path(data_dir) / "val")[0]
    args = ["edit", "sdedit", "--input", vol, "--strength", 0.5, "-n", 1, "--steps", 4]
    rc, _, err = cli(capsys, "--quiet", *args, "--config", guided_run["config_path"], "--out", tmp_path / "plain")
    assert rc == 0, err  # the config's weight 3 is the sampler's; edits use the model alone unless asked
    assert all(json.loads(p.read_text())["autoguidance"] is None for p in (tmp_path / "plain").glob("*.json"))
    rc, _, err = cli(capsys, "--quiet", *args, "--config", guided_run["config_path"], "--autoguidance", 3,
                     "--out", tmp_path / "guided")
    assert rc == 0, err
    recs = [json.loads(p.read_text())["autoguidance"] for p in (tmp_path / "guided").glob("*.json")]
    assert recs and all(r["weight"] == 3.0 and r["min_timestep"] == 500 and r["guide_epoch"] == 1 for r in recs)
    rc, _, err = cli(capsys, *args, "--config", trained_stage2["config_path"], "--autoguidance", 3,
                     "--out", tmp_path / "none")
    assert_clean_error(rc, err, "records no guide")
