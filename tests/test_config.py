"""The typed config (issue 2, item 3): the original README schema, defaults, overrides and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vqldm
from vqldm.config import (
    Config,
    config_from_dict,
    downsample_parameters,
    latent_shape,
    load_config,
    upsample_parameters,
)
from vqldm.data.io import check_data_dirs
from vqldm.errors import VqldmError

from conftest import run_cli, run_cli_subprocess, tiny_config_dict, with_updates, write_config

PACKAGED_TINY = Path(vqldm.__file__).parent / "configs" / "tiny.yaml"


def readme_schema_yaml(data_dir: Path, out: Path) -> str:
    """Every section and key that issue 2 item 3 lists for the original README's schema."""
    return f"""\
seed: 42

device:
  use_cuda: false
  gpu_id: 0
  mixed_precision: true

data:
  train_data_dir: "{data_dir / 'train'}"
  val_data_dir: "{data_dir / 'val'}"
  patch_size: [32, 32, 32]
  batch_size: 2
  voxel_resize: null
  cache_rate: 1.0
  num_workers: 0
  augmentation: true

vqvae:
  spatial_dims: 3
  in_channels: 1
  out_channels: 1
  num_channels: [8, 16]
  num_res_channels: 16
  num_res_layers: 1
  num_embeddings: 16
  embedding_dim: 4
  downsample_parameters: [[2, 4, 1, 1], [2, 4, 1, 1]]
  upsample_parameters: [[2, 4, 1, 1, 0], [2, 4, 1, 1, 0]]
  learning_rate: 1e-4
  training:
    n_epochs: 100
    batch_size: 3
    learning_rate: 2e-4
    val_interval: 5
    save_interval: 10
    fast_dev_run: false
    fast_dev_run_batches: 2
    loss:
      reconstruction_loss_type: "combined"
      weighted:
        foreground_weight: 10.0
        background_weight: 1.0
        threshold: 0.1
      dice:
        smooth: 1e-5
      combined:
        dice_weight: 1.0
        weighted_weight: 1.0
  checkpoints:
    output_dir: "{out / 'vqvae_checkpoints'}"
    resume_from: null
  logging:
    log_dir: "{out / 'vqvae_logs'}"
    log_interval: 10
    visualize_interval: 5
    num_visualize_samples: 4

diffusion:
  spatial_dims: 3
  in_channels: 4
  out_channels: 4
  num_channels: [32, 64]
  attention_levels: [false, true]
  num_head_channels: [0, 32]
  num_res_blocks: 2
  num_train_timesteps: 1000
  learning_rate: 1e-4
  scheduler:
    num_train_timesteps: 1000
    schedule: "linear_beta"
    beta_start: 0.0015
    beta_end: 0.0195
  training:
    n_epochs: 300
    batch_size: 5
    learning_rate: 5e-5
    val_interval: 10
    save_interval: 10
    fast_dev_run: false
    fast_dev_run_batches: 2
    loss:
      reconstruction_loss_type: "l1"
  checkpoints:
    output_dir: "{out / 'diffusion_checkpoints'}"
    vqvae_path: "{out / 'vqvae_checkpoints' / 'best_model.pt'}"
    resume_from: null
  logging:
    log_dir: "{out / 'diffusion_logs'}"
    log_interval: 10
    visualize_interval: 10
    num_visualize_samples: 2
    num_inference_steps: 50
"""


# ----------------------------------------------------------------------------------- schema
def test_readme_schema_loads_unchanged(tmp_path, data_dir):
    path = tmp_path / "readme.yaml"
    path.write_text(readme_schema_yaml(data_dir, tmp_path), encoding="utf-8")
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.seed == 42
    assert cfg.device.use_cuda is False and cfg.device.mixed_precision is True
    assert cfg.data.patch_size == [32, 32, 32] and cfg.data.voxel_resize is None
    assert cfg.data.augmentation is True
    assert cfg.vqvae.num_embeddings == 16 and cfg.vqvae.embedding_dim == 4
    assert cfg.vqvae.downsample_parameters == [[2, 4, 1, 1], [2, 4, 1, 1]]
    assert cfg.vqvae.upsample_parameters == [[2, 4, 1, 1, 0], [2, 4, 1, 1, 0]]
    assert cfg.vqvae.learning_rate == pytest.approx(1e-4)  # YAML 1.1 reads "1e-4" as a string
    assert isinstance(cfg.vqvae.learning_rate, float)
    t = cfg.vqvae.training
    assert t.n_epochs == 100 and t.val_interval == 5 and t.save_interval == 10
    assert t.fast_dev_run is False and t.fast_dev_run_batches == 2
    assert t.loss.reconstruction_loss_type == "combined"
    assert t.loss.weighted.foreground_weight == 10.0 and t.loss.dice.smooth == pytest.approx(1e-5)
    assert cfg.vqvae.checkpoints.output_dir == str(tmp_path / "vqvae_checkpoints")
    assert cfg.vqvae.checkpoints.resume_from is None
    assert cfg.vqvae.logging.num_visualize_samples == 4
    d = cfg.diffusion
    assert d.attention_levels == [False, True] and d.num_head_channels == [0, 32]
    assert d.scheduler.schedule == "linear_beta"
    assert d.scheduler.beta_start == pytest.approx(0.0015) and d.scheduler.beta_end == pytest.approx(0.0195)
    assert d.checkpoints.vqvae_path == str(tmp_path / "vqvae_checkpoints" / "best_model.pt")
    assert d.logging.num_inference_steps == 50
    # stage-level training values override the shared ones
    assert cfg.batch_size("vqvae") == 3 and cfg.batch_size("diffusion") == 5
    assert cfg.learning_rate("vqvae") == pytest.approx(2e-4)
    assert cfg.learning_rate("diffusion") == pytest.approx(5e-5)


def test_packaged_tiny_config_latent_shape(data_dir):
    cfg = load_config(PACKAGED_TINY, [f"data.train_data_dir={data_dir / 'train'}",
                                      f"data.val_data_dir={data_dir / 'val'}"])
    # 32^3 patches, two stride-2 levels, embedding_dim 8 -> [8, 8, 8, 8]
    assert cfg.data.patch_size == [32, 32, 32] and cfg.vqvae.embedding_dim == 8
    assert latent_shape(cfg) == [8, 8, 8, 8]


def test_defaults_follow_original_readme():
    cfg = config_from_dict({})
    assert cfg.vqvae.checkpoints.output_dir == "outputs/vq_ldm/vqvae_checkpoints"
    assert cfg.vqvae.logging.log_dir == "outputs/vq_ldm/vqvae_logs"
    assert cfg.diffusion.checkpoints.output_dir == "outputs/vq_ldm/diffusion_checkpoints"
    assert cfg.diffusion.logging.log_dir == "outputs/vq_ldm/diffusion_logs"
    assert cfg.diffusion.checkpoints.vqvae_path == "outputs/vq_ldm/vqvae_checkpoints/best_model.pt"
    assert cfg.data.train_data_dir == "data/microtubules/nifti/train"
    assert cfg.data.val_data_dir == "data/microtubules/nifti/val"
    assert cfg.data.patch_size == [64, 64, 64] and cfg.data.batch_size == 4
    assert cfg.vqvae.num_embeddings == 256 and cfg.vqvae.embedding_dim == 32
    assert cfg.diffusion.in_channels == 32
    assert cfg.diffusion.scheduler.schedule == "linear_beta"
    assert cfg.diffusion.scheduler.beta_start == pytest.approx(0.0015)
    assert cfg.diffusion.scheduler.beta_end == pytest.approx(0.0195)
    # one stride-2 level per num_channels entry
    n = len(cfg.vqvae.num_channels)
    down, up = downsample_parameters(cfg.vqvae), upsample_parameters(cfg.vqvae)
    assert len(down) == n and len(up) == n
    assert all(p[0] == 2 for p in down) and all(p[0] == 2 for p in up)
    assert latent_shape(cfg) == [32] + [64 // 2**n] * 3


def test_partial_section_keeps_stage_specific_defaults():
    cfg = config_from_dict({"vqvae": {"checkpoints": {"resume_from": "x.pt"}},
                            "diffusion": {"checkpoints": {"output_dir": "elsewhere"}}})
    assert cfg.vqvae.checkpoints.output_dir == "outputs/vq_ldm/vqvae_checkpoints"
    assert cfg.vqvae.checkpoints.resume_from == "x.pt"
    assert cfg.diffusion.checkpoints.output_dir == "elsewhere"
    assert cfg.diffusion.checkpoints.vqvae_path == "outputs/vq_ldm/vqvae_checkpoints/best_model.pt"


def test_one_stride2_level_per_channel_entry(tmp_path, data_dir):
    d = tiny_config_dict(tmp_path, data_dir)
    d["vqvae"]["num_channels"] = [8, 8, 16]
    d["data"]["patch_size"] = [32, 32, 16]
    d["diffusion"]["num_channels"] = [16]
    d["diffusion"]["attention_levels"] = [False]
    d["diffusion"]["num_head_channels"] = [16]  # the middle block's attention needs a head size
    cfg = config_from_dict(d)
    assert latent_shape(cfg) == [4, 4, 4, 2]


def test_training_section_overrides_shared_values(tmp_path, data_dir):
    d = tiny_config_dict(tmp_path, data_dir)
    d["data"]["batch_size"] = 2
    d["vqvae"]["learning_rate"] = 1e-3
    d["diffusion"]["learning_rate"] = 1e-3
    cfg = config_from_dict(d)
    assert cfg.batch_size("vqvae") == 2 and cfg.batch_size("diffusion") == 2
    assert cfg.learning_rate("vqvae") == pytest.approx(1e-3)
    d["vqvae"]["training"]["batch_size"] = 7
    d["vqvae"]["training"]["learning_rate"] = 3e-4
    d["diffusion"]["training"]["batch_size"] = 5
    d["diffusion"]["training"]["learning_rate"] = 2e-5
    cfg = config_from_dict(d)
    assert cfg.batch_size("vqvae") == 7 and cfg.batch_size("diffusion") == 5
    assert cfg.learning_rate("vqvae") == pytest.approx(3e-4)
    assert cfg.learning_rate("diffusion") == pytest.approx(2e-5)


# ----------------------------------------------------------------------------------- --set
def test_set_overrides_parse_types(tmp_path, data_dir):
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path, data_dir))
    cfg = load_config(path, [
        "vqvae.training.n_epochs=7",
        "vqvae.learning_rate=2e-4",
        "data.cache_rate=0.5",
        "data.patch_size=[16, 16, 16]",
        "data.voxel_resize=[24,24,24]",
        "data.augmentation=true",
        "vqvae.checkpoints.resume_from=null",
        "diffusion.scheduler.type=rflow",
        "diffusion.attention_levels=[false, false]",
        "diffusion.scale_factor=0.25",
    ])
    assert cfg.vqvae.training.n_epochs == 7 and isinstance(cfg.vqvae.training.n_epochs, int)
    assert cfg.vqvae.learning_rate == pytest.approx(2e-4) and isinstance(cfg.vqvae.learning_rate, float)
    assert cfg.data.cache_rate == 0.5
    assert cfg.data.patch_size == [16, 16, 16]
    assert cfg.data.voxel_resize == [24, 24, 24]
    assert cfg.data.augmentation is True
    assert cfg.vqvae.checkpoints.resume_from is None
    assert cfg.diffusion.scheduler.type == "rflow"
    assert cfg.diffusion.attention_levels == [False, False]
    assert cfg.diffusion.scale_factor == 0.25
    # null back over a list value
    cfg = load_config(path, ["data.voxel_resize=[24,24,24]", "data.voxel_resize=null"])
    assert cfg.data.voxel_resize is None


def test_set_override_wins_over_file_and_reaches_cli(tmp_path, data_dir, capsys):
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path, data_dir))
    rc = run_cli("check", "--config", path, "--json", "--set", "vqvae.training.batch_size=3",
                 "--set", "diffusion.training.learning_rate=5e-5", "--set", "vqvae.embedding_dim=8",
                 "--set", "diffusion.in_channels=8", "--set", "diffusion.out_channels=8")
    out = capsys.readouterr()
    assert rc == 0, out.err
    report = json.loads(out.out)
    assert report["latent_shape"] == [8, 8, 8, 8]
    assert report["batch_size"] == {"vqvae": 3, "diffusion": 2}
    assert report["learning_rate"]["diffusion"] == pytest.approx(5e-5)
    assert report["learning_rate"]["vqvae"] == pytest.approx(1e-3)


def test_set_malformed_override_names_it(tmp_path, data_dir):
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path, data_dir))
    with pytest.raises(VqldmError, match="vqvae.num_embeddings"):
        load_config(path, ["vqvae.num_embeddings"])


# ----------------------------------------------------------------------------------- errors
# (updates applied to the tiny config dict, keys/paths the message must name)
MISTAKES = {
    "unknown_key": ({"vqvae__num_embedings": 64}, ["vqvae.num_embedings", "num_embeddings"]),
    "unknown_section_key": ({"data__patchsize": [32, 32, 32]}, ["data.patchsize", "patch_size"]),
    "wrong_type_int": ({"vqvae__num_embeddings": "many"}, ["vqvae.num_embeddings"]),
    "wrong_type_list": ({"data__patch_size": 32}, ["data.patch_size"]),
    "wrong_type_bool": ({"data__augmentation": "sometimes"}, ["data.augmentation"]),
    "wrong_type_float": ({"vqvae__learning_rate": "fast"}, ["vqvae.learning_rate"]),
    "in_channels": ({"diffusion__in_channels": 8}, ["diffusion.in_channels", "vqvae.embedding_dim"]),
    "out_channels": ({"diffusion__out_channels": 8}, ["diffusion.out_channels", "vqvae.embedding_dim"]),
    "downsample_len": ({"vqvae__downsample_parameters": [[2, 4, 1, 1]]}, ["vqvae.downsample_parameters"]),
    "upsample_len": ({"vqvae__upsample_parameters": [[2, 4, 1, 1, 0]] * 3}, ["vqvae.upsample_parameters"]),
    "attention_len": ({"diffusion__attention_levels": [False, True, True]}, ["diffusion.attention_levels"]),
    "heads_len": ({"diffusion__num_head_channels": [0]}, ["diffusion.num_head_channels"]),
    # latent 8^3 (32^3, two stride-2 levels) cannot be halved four times by a 5-level UNet
    "latent_not_halvable": ({"diffusion__num_channels": [16, 16, 16, 16, 16],
                             "diffusion__attention_levels": [False] * 5,
                             "diffusion__num_head_channels": [0] * 5},
                            ["diffusion.num_channels", "data.patch_size"]),
    "timestep_bias_negative": ({"diffusion__scheduler__timestep_bias": -0.5}, ["diffusion.scheduler.timestep_bias"]),
    "timestep_bias_rflow": ({"diffusion__scheduler__timestep_bias": 1.0, "diffusion__scheduler__type": "rflow"},
                            ["diffusion.scheduler.timestep_bias", "rflow"]),
    "timestep_bias_epochs_alone": ({"diffusion__scheduler__timestep_bias_epochs": 10},
                                   ["diffusion.scheduler.timestep_bias_epochs", "timestep_bias"]),
    "self_condition_rflow": ({"diffusion__self_condition": True, "diffusion__scheduler__type": "rflow"},
                             ["diffusion.self_condition", "rflow"]),
    "self_condition_min_timestep": ({"diffusion__self_condition_min_timestep": 1000},
                                    ["diffusion.self_condition_min_timestep", "[0, 1000)"]),
    # 30 -> 15 -> 7 -> 14 -> 28: does not decode back to 30
    "patch_round_trip": ({"data__patch_size": [30, 30, 30]}, ["data.patch_size"]),
}


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_config_mistake_names_key(name, tmp_path, data_dir):
    updates, must_name = MISTAKES[name]
    d = with_updates(tiny_config_dict(tmp_path, data_dir), **updates)
    with pytest.raises(VqldmError) as ei:
        check_data_dirs(config_from_dict(d).data)
    msg = str(ei.value)
    for s in must_name:
        assert s in msg, (name, msg)


def test_did_you_mean(tmp_path, data_dir):
    d = with_updates(tiny_config_dict(tmp_path, data_dir), vqvae__num_embedings=64)
    with pytest.raises(VqldmError, match=r"did you mean 'num_embeddings'"):
        config_from_dict(d)


def test_missing_data_dir_named(tmp_path, data_dir):
    missing = tmp_path / "no_such_dir"
    d = with_updates(tiny_config_dict(tmp_path, data_dir), data__train_data_dir=str(missing))
    with pytest.raises(VqldmError) as ei:
        check_data_dirs(config_from_dict(d).data)
    assert "data.train_data_dir" in str(ei.value) and str(missing) in str(ei.value)


def test_empty_data_dir_named(tmp_path, data_dir):
    empty = tmp_path / "empty_val"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a volume")
    d = with_updates(tiny_config_dict(tmp_path, data_dir), data__val_data_dir=str(empty))
    with pytest.raises(VqldmError) as ei:
        check_data_dirs(config_from_dict(d).data)
    assert "data.val_data_dir" in str(ei.value) and str(empty) in str(ei.value)


def test_missing_config_file_named(tmp_path):
    with pytest.raises(VqldmError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_named(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("data: [unclosed\n", encoding="utf-8")
    with pytest.raises(VqldmError, match="broken.yaml"):
        load_config(p)


# ----------------------------------------------------------------------------------- CLI
def _single_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_check_json_prints_latent_shape(tmp_path, data_dir, capsys):
    rc = run_cli("check", "--config", PACKAGED_TINY, "--json",
                 "--set", f"data.train_data_dir={data_dir / 'train'}",
                 "--set", f"data.val_data_dir={data_dir / 'val'}")
    out = capsys.readouterr()
    assert rc == 0, out.err
    report = json.loads(out.out)
    assert report["latent_shape"] == [8, 8, 8, 8]
    assert report["vqvae_parameters"] > 0 and report["diffusion_parameters"] > 0
    assert report["data"]["train_data_dir"]["files"] == 4
    assert report["data"]["val_data_dir"]["files"] == 2
    assert report["data"]["train_data_dir"]["shapes"] == [[32, 32, 32]]


def test_cli_check_human_report(tmp_path, data_dir, capsys):
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path, data_dir))
    rc = run_cli("--quiet", "check", "--config", path)
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "latent shape" in out.out and "[4, 8, 8, 8]" in out.out


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_cli_mistake_one_line_no_traceback(name, tmp_path, data_dir, capsys):
    updates, must_name = MISTAKES[name]
    path = write_config(tmp_path / "c.yaml", with_updates(tiny_config_dict(tmp_path, data_dir), **updates))
    rc = run_cli("check", "--config", path, "--json")
    out = capsys.readouterr()
    assert rc != 0
    line = _single_error_line(out.err)
    for s in must_name:
        assert s in line, (name, line)


def test_cli_set_mistake_and_missing_dir(tmp_path, data_dir, capsys):
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path, data_dir))
    rc = run_cli("check", "--config", path, "--set", "vqvae.num_embedings=64")
    out = capsys.readouterr()
    assert rc != 0
    line = _single_error_line(out.err)
    assert "vqvae.num_embedings" in line and "num_embeddings" in line

    missing = tmp_path / "gone"
    rc = run_cli("check", "--config", path, "--json", "--set", f"data.val_data_dir={missing}")
    out = capsys.readouterr()
    assert rc != 0
    line = _single_error_line(out.err)
    assert "data.val_data_dir" in line and str(missing) in line


@pytest.mark.parametrize("command", ["train-vqvae", "train-diffusion"])
def test_cli_every_config_command_reports_mistakes(command, tmp_path, data_dir, capsys):
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path, data_dir))
    rc = run_cli(command, "--config", path, "--set", "diffusion.in_channels=8")
    out = capsys.readouterr()
    assert rc != 0
    line = _single_error_line(out.err)
    assert "diffusion.in_channels" in line


def test_subprocess_check_json(data_dir):
    r = run_cli_subprocess("check", "--config", PACKAGED_TINY, "--json",
                           "--set", f"data.train_data_dir={data_dir / 'train'}",
                           "--set", f"data.val_data_dir={data_dir / 'val'}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["latent_shape"] == [8, 8, 8, 8]


def test_subprocess_mistake_clean_error(tmp_path, data_dir):
    d = with_updates(tiny_config_dict(tmp_path, data_dir), vqvae__num_embedings=64)
    path = write_config(tmp_path / "c.yaml", d)
    r = run_cli_subprocess("check", "--config", path)
    assert r.returncode != 0
    line = _single_error_line(r.stderr)
    assert "vqvae.num_embedings" in line and "num_embeddings" in line
    assert r.stdout.strip() == ""


def test_subprocess_help_lists_subcommands():
    r = run_cli_subprocess("--help")
    assert r.returncode == 0
    for c in ("synth", "check", "train-vqvae", "train-diffusion", "sample", "evaluate", "demo", "benchmark"):
        assert c in r.stdout


def test_config_is_read_only_once_loaded(tmp_path, data_dir):
    """No code can change a validated config: what a checkpoint dictates travels as its own value."""
    import dataclasses

    cfg = config_from_dict(tiny_config_dict(tmp_path, data_dir))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.intensity_range = [-1.0, 1.0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    # a partial section still merges over that section's own defaults
    d = tiny_config_dict(tmp_path, data_dir)
    d["diffusion"]["checkpoints"] = {"output_dir": str(tmp_path / "elsewhere")}
    assert config_from_dict(d).diffusion.checkpoints.vqvae_path == "outputs/vq_ldm/vqvae_checkpoints/best_model.pt"
