"""Configs written for the upstream project's scripts (issue 16): they load, every upstream key is
translated or accepted with a warning, typos are still refused, and training starts from them.

The fixtures in tests/fixtures/upstream/ follow the layout (sections, keys and values) of the upstream
``vq_ldm_config_local.yaml``, ``conditional_diffusion_config.yaml`` and ``ldm_config_local.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from vqldm.config import config_from_dict, load_config
from vqldm.data.pipeline import scan_data_dir
from vqldm.errors import VqldmError

from conftest import run_cli, tiny_config_dict, with_updates

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
VQ_LDM = FIXTURES / "vq_ldm_config_local.yaml"
CONDITIONAL = FIXTURES / "conditional_diffusion_config.yaml"
LDM = FIXTURES / "ldm_config_local.yaml"

# every key of the VQ-LDM fixture that vqldm's schema does not have under that name
VQ_LDM_UPSTREAM_KEYS = {
    "data.voxel_size", "data.pin_memory", "data.max_data_size_for_train", "data.max_data_size_for_val",
    "data.augmentation.enabled", "data.augmentation.use_patch_based", "data.augmentation.use_center_crop_for_val",
    "data.augmentation.invert_intensity",
    *(f"vqvae.training.loss.{k}" for k in (
        "weighted.recon_loss_type", "dice.sigmoid", "combined.recon_weight", "combined.recon_loss_type",
        "combined.foreground_weight", "combined.background_weight", "combined.threshold", "combined.dice_smooth")),
}


def _data_sets(data_dir, patch="[32,32,16]") -> list[str]:
    return [f"data.train_data_dir={data_dir / 'train'}", f"data.val_data_dir={data_dir / 'val'}",
            f"data.voxel_size={patch}", "data.num_workers=0"]


# ----------------------------------------------------------------------------------- loading
def test_vq_ldm_config_loads_as_shipped_with_a_note_per_upstream_key():
    cfg = load_config(VQ_LDM)
    noted = {n.key for n in cfg.migration}
    assert VQ_LDM_UPSTREAM_KEYS <= noted, VQ_LDM_UPSTREAM_KEYS - noted
    d = cfg.data
    assert d.patch_size == [96, 96, 48] and d.voxel_resize == [128, 128, 64]
    assert d.max_train_volumes == 4 and d.max_val_volumes == 4
    assert d.augmentation is False  # enabled, but no flip/rotate probability: the upstream scripts did neither
    loss = cfg.vqvae.training.loss
    assert loss.reconstruction_loss_type == "combined"
    # the combined block is what the upstream scripts read for "combined"
    assert loss.weighted.foreground_weight == 100.0 and loss.weighted.background_weight == 0.5
    assert loss.weighted.threshold == pytest.approx(0.01) and loss.weighted.base == "l1"
    assert loss.combined.dice_weight == 0.5 and loss.combined.weighted_weight == 1.0
    assert loss.dice.smooth == pytest.approx(1e-5)
    assert cfg.batch_size("vqvae") == 2 and cfg.learning_rate("diffusion") == pytest.approx(1e-4)
    assert cfg.diffusion.training.fast_dev_run is True and cfg.device.gpu_id == 0
    # no-effect keys are warnings, translations are info lines; one note per key
    levels = {n.key: n.level for n in cfg.migration}
    assert levels["data.pin_memory"] == "warning" and levels["data.voxel_size"] == "info"
    assert levels["vqvae.training.loss.weighted.foreground_weight"] == "warning"  # shadowed by combined's
    assert len(noted) == len(cfg.migration)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.patch_size = [1, 1, 1]


def test_conditional_config_loads_unconditional_with_warnings():
    cfg = load_config(CONDITIONAL, ["data.voxel_size=[32,32,32]"])
    levels = {n.key: n.level for n in cfg.migration}
    for k in ("condition_channels", "condition_embed_dim", "projection_axis"):
        assert levels[f"diffusion.{k}"] == "warning"
    # the upstream conditional model diffused the image (1 channel); vqldm's UNet diffuses the latent
    assert cfg.diffusion.in_channels == cfg.vqvae.embedding_dim == cfg.diffusion.out_channels
    assert levels["diffusion.in_channels"] == "info"
    assert cfg.diffusion.norm_num_groups == 8  # what the upstream conditional script built with
    assert cfg.diffusion.num_channels == [16, 32, 64] and cfg.diffusion.scheduler.beta_start == pytest.approx(5e-4)


def test_conditional_config_follows_a_given_embedding_dim():
    cfg = load_config(CONDITIONAL, ["data.voxel_size=[32,32,32]", "vqvae.embedding_dim=4"])
    assert cfg.diffusion.in_channels == cfg.diffusion.out_channels == 4


def test_shipped_conditional_shape_is_one_line_naming_keys():
    """At 96x96x48 the default VQ-VAE's latent (12x12x6) cannot be halved twice by the 3-level UNet."""
    with pytest.raises(VqldmError, match=r"diffusion.num_channels") as e:
        load_config(CONDITIONAL)
    assert "\n" not in str(e.value)


def test_ldm_kl_autoencoder_config_refused_in_one_line(capsys):
    rc = run_cli("check", "--config", LDM)
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "autoencoder" in lines[0] and "KL" in lines[0] and "VQ-VAE" in lines[0]


TYPOS = {
    "data__voxel_sise": ("data.voxel_sise", "voxel_size"),
    "data__augmentation": ({"enabeld": True}, "data.augmentation.enabeld", "enabled"),
    "vqvae__training__loss__combined__recon_weigth": ("combined.recon_weigth", "recon_weight"),
    "diffusion__condition_channel": ("diffusion.condition_channel", "condition_channels"),
}


@pytest.mark.parametrize("key", sorted(TYPOS))
def test_typos_of_upstream_keys_are_refused_with_a_suggestion(key, tmp_path, data_dir):
    *value, named, suggestion = TYPOS[key]
    d = with_updates(tiny_config_dict(tmp_path, data_dir), **{key: value[0] if value else 1})
    with pytest.raises(VqldmError) as e:
        config_from_dict(d)
    assert named in str(e.value) and f"did you mean '{suggestion}'" in str(e.value)


def test_explicit_vqldm_key_wins_over_its_upstream_spelling(tmp_path, data_dir):
    d = with_updates(tiny_config_dict(tmp_path, data_dir), data__voxel_size=[64, 64, 64])
    cfg = config_from_dict(d)
    assert cfg.data.patch_size == [32, 32, 32]
    assert [n.level for n in cfg.migration if n.key == "data.voxel_size"] == ["warning"]


def test_augmentation_mapping_with_flips_turns_augmentation_on(tmp_path, data_dir):
    d = with_updates(tiny_config_dict(tmp_path, data_dir),
                     data__augmentation={"enabled": True, "random_flip_prob": 0.3, "invert_intensity": True})
    cfg = config_from_dict(d)
    assert cfg.data.augmentation is True
    levels = {n.key: n.level for n in cfg.migration}
    assert levels["data.augmentation.random_flip_prob"] == "warning"  # vqldm flips with 0.5
    assert levels["data.augmentation.invert_intensity"] == "warning"


def test_combined_block_without_combined_loss_has_no_effect(tmp_path, data_dir):
    d = with_updates(tiny_config_dict(tmp_path, data_dir), vqvae__training__loss={
        "reconstruction_loss_type": "weighted", "weighted": {"foreground_weight": 7.0},
        "combined": {"foreground_weight": 100.0, "recon_weight": 2.0}})
    cfg = config_from_dict(d)
    assert cfg.vqvae.training.loss.weighted.foreground_weight == 7.0
    assert cfg.vqvae.training.loss.combined.weighted_weight == 1.0
    assert {n.level for n in cfg.migration} == {"warning"}


@pytest.mark.parametrize("where", ["scheduler", "top"])
def test_one_step_count_sets_both_copies(where, tmp_path, data_dir):
    d = tiny_config_dict(tmp_path, data_dir)
    del d["diffusion"]["num_train_timesteps"], d["diffusion"]["scheduler"]["num_train_timesteps"]
    (d["diffusion"]["scheduler"] if where == "scheduler" else d["diffusion"])["num_train_timesteps"] = 500
    cfg = config_from_dict(d)
    assert cfg.diffusion.num_train_timesteps == cfg.diffusion.scheduler.num_train_timesteps == 500


def test_upstream_loss_without_a_type_is_upstreams_l1(tmp_path, data_dir):
    d = with_updates(tiny_config_dict(tmp_path, data_dir), vqvae__training__loss={
        "weighted": {"recon_loss_type": "mse"}, "combined": {"recon_weight": 2.0}})
    cfg = config_from_dict(d)
    assert cfg.vqvae.training.loss.reconstruction_loss_type == "l1"
    assert cfg.vqvae.training.loss.weighted.base == "mse"


BAD_VALUES = {
    "data__voxel_size": ("big", "data.voxel_size"),
    "data__max_data_size_for_train": (0, "data.max_data_size_for_train"),
    "data__augmentation": ({"enabled": True, "random_flip_prob": "often"}, "data.augmentation.random_flip_prob"),
}


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_bad_upstream_value_names_the_upstream_key(key, tmp_path, data_dir):
    value, named = BAD_VALUES[key]
    with pytest.raises(VqldmError, match=named.replace(".", r"\.")):
        config_from_dict(with_updates(tiny_config_dict(tmp_path, data_dir), **{key: value}))


def test_plain_vqldm_config_has_no_notes(tmp_path, data_dir):
    assert config_from_dict(tiny_config_dict(tmp_path, data_dir)).migration == ()


def test_max_volumes_limit_the_data_read(tmp_path, data_dir):
    cfg = config_from_dict(with_updates(tiny_config_dict(tmp_path, data_dir), data__max_data_size_for_train=2))
    files = scan_data_dir(cfg, "train_data_dir").files
    assert [f.name for f in files] == sorted(f.name for f in (data_dir / "train").iterdir())[:2]
    assert len(scan_data_dir(cfg, "val_data_dir").files) == 2


# ----------------------------------------------------------------------------------- CLI
def test_check_prints_every_translation(data_dir, tmp_path, capsys):
    sets = sum((["--set", s] for s in _data_sets(data_dir)), [])
    rc = run_cli("check", "--config", VQ_LDM, *sets)
    out = capsys.readouterr()
    assert rc == 0, out.err
    for key in VQ_LDM_UPSTREAM_KEYS:
        assert key in out.out, key
    rc = run_cli("check", "--config", VQ_LDM, "--json", *sets)
    report = json.loads(capsys.readouterr().out)
    assert {n["key"] for n in report["upstream_keys"]} >= VQ_LDM_UPSTREAM_KEYS
    assert report["data"]["train_data_dir"]["files"] == 4  # max_data_size_for_train: 4


def test_config_print_gives_the_same_config_in_vqldm_keys(tmp_path, capsys, caplog):
    rc = run_cli("config", "--print", "--config", VQ_LDM)
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "upstream key data.voxel_size" in caplog.text  # the notes are log lines (stderr), the YAML is stdout
    new = tmp_path / "new.yaml"
    new.write_text(out.out, encoding="utf-8")
    assert "voxel_size" not in out.out and "recon_weight" not in out.out
    converted = load_config(new)
    assert converted.migration == ()
    assert converted.to_dict() == load_config(VQ_LDM).to_dict()
    rc = run_cli("-q", "config", "--config", VQ_LDM, "--out", tmp_path / "written.yaml")
    assert rc == 0 and yaml.safe_load((tmp_path / "written.yaml").read_text()) == yaml.safe_load(out.out)


# ----------------------------------------------------------------------------------- training
SMALL_VQVAE = ["vqvae.num_channels=[8,16]", "vqvae.num_res_channels=16", "vqvae.num_res_layers=1",
               "vqvae.num_embeddings=16", "vqvae.embedding_dim=4", "vqvae.downsample_parameters=[[2,4,1,1],[2,4,1,1]]",
               "vqvae.upsample_parameters=[[2,4,1,1,0],[2,4,1,1,0]]", "vqvae.codebook.restart_window_steps=3"]


def _train_both(config: Path, sets: list[str], out: Path) -> None:
    sets = sets + [f"vqvae.checkpoints.output_dir={out / 'vq'}", f"vqvae.logging.log_dir={out / 'vq_logs'}",
                   f"diffusion.checkpoints.output_dir={out / 'diff'}", f"diffusion.logging.log_dir={out / 'diff_logs'}",
                   f"diffusion.checkpoints.vqvae_path={out / 'vq' / 'best_model.pt'}",
                   "vqvae.training.fast_dev_run=true", "diffusion.training.fast_dev_run=true",
                   "diffusion.logging.num_inference_steps=2", "vqvae.logging.num_visualize_samples=1",
                   "diffusion.logging.num_visualize_samples=1"]
    args = sum((["--set", s] for s in sets), [])
    for command in ("train-vqvae", "train-diffusion"):
        assert run_cli("--quiet", command, "--config", config, *args) == 0, command
    for stage in ("vq", "diff"):
        assert (out / stage / "best_model.pt").is_file()


def test_training_starts_from_the_vq_ldm_config(tmp_path, data_dir):
    sets = _data_sets(data_dir) + SMALL_VQVAE + [
        "diffusion.in_channels=4", "diffusion.out_channels=4", "diffusion.num_channels=[32,64]",
        "diffusion.num_head_channels=[0,32]"]
    _train_both(VQ_LDM, sets, tmp_path / "run")


def test_training_starts_from_the_conditional_config(tmp_path, data_dir):
    _train_both(CONDITIONAL, _data_sets(data_dir, "[32,32,32]") + SMALL_VQVAE, tmp_path / "run")
