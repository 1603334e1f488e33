"""Shared fixtures for the vqldm test suite: synthetic data, tiny configs, CLI runners, trained stages.

Everything runs on the CPU with tiny networks (VQ-VAE [8, 16] channels, 16 codes x 4 dims; UNet
[16, 32] channels) on 32^3 synthetic microtubule volumes, so each training run takes seconds.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

# The test machine has 2 cores shared with other work; OpenMP spin-waiting with several threads
# under contention slows the tiny 3D convolutions here by up to 100x, so the suite runs torch on one
# thread unless OMP_NUM_THREADS says otherwise (subprocesses inherit the same setting).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from vqldm.synth import write_dataset  # noqa: E402

torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))

SHAPE = (32, 32, 32)
NUM_TRAIN, NUM_VAL = 4, 2


# ----------------------------------------------------------------------------------- config
def tiny_config_dict(tmp_path, data_dir, patch=(32, 32, 32)) -> dict:
    """A complete config in the original README's YAML schema; every output lives under ``tmp_path``."""
    tmp_path, data_dir = Path(tmp_path), Path(data_dir)
    return {
        "seed": 42,
        "device": {"use_cuda": False, "gpu_id": 0, "mixed_precision": False},
        "data": {
            "train_data_dir": str(data_dir / "train"),
            "val_data_dir": str(data_dir / "val"),
            "patch_size": list(patch),
            "batch_size": 2,
            "voxel_resize": None,
            "cache_rate": 1.0,
            "num_workers": 0,
            "augmentation": False,
            "patches_per_volume": 1,
            "max_val_patches": 2,
        },
        "vqvae": {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 1,
            "num_channels": [8, 16],
            "num_res_channels": 16,
            "num_res_layers": 1,
            "num_embeddings": 16,
            "embedding_dim": 4,
            "learning_rate": 1.0e-3,
            "codebook": {"restart_window_steps": 3},
            "training": {
                "n_epochs": 1,
                "val_interval": 1,
                "save_interval": 1,
                "loss": {"reconstruction_loss_type": "combined"},
            },
            "checkpoints": {"output_dir": str(tmp_path / "vqvae_checkpoints")},
            "logging": {
                "log_dir": str(tmp_path / "vqvae_logs"),
                "log_interval": 1,
                "visualize_interval": 1,
                "num_visualize_samples": 1,
            },
        },
        "diffusion": {
            "spatial_dims": 3,
            "in_channels": 4,
            "out_channels": 4,
            "num_channels": [16, 32],
            "attention_levels": [False, True],
            "num_head_channels": [0, 16],
            "num_res_blocks": 1,
            "norm_num_groups": 8,
            "num_train_timesteps": 1000,
            "learning_rate": 1.0e-3,
            "scheduler": {
                "num_train_timesteps": 1000,
                "schedule": "linear_beta",
                "beta_start": 0.0015,
                "beta_end": 0.0195,
            },
            "training": {
                "n_epochs": 1,
                "val_interval": 1,
                "save_interval": 1,
                "ema_decay": 0.9,
            },
            "checkpoints": {
                "output_dir": str(tmp_path / "diffusion_checkpoints"),
                "vqvae_path": str(tmp_path / "vqvae_checkpoints" / "best_model.pt"),
            },
            "logging": {
                "log_dir": str(tmp_path / "diffusion_logs"),
                "log_interval": 1,
                "visualize_interval": 1,
                "num_visualize_samples": 1,
                "num_inference_steps": 2,
            },
        },
        "prior": {
            "attn_layers_dim": 16,
            "attn_layers_depth": 1,
            "attn_layers_heads": 2,
            "learning_rate": 1.0e-3,
            "training": {"n_epochs": 1, "val_interval": 1, "save_interval": 1, "ema_decay": 0.9},
            "checkpoints": {
                "output_dir": str(tmp_path / "prior_checkpoints"),
                "vqvae_path": str(tmp_path / "vqvae_checkpoints" / "best_model.pt"),
            },
            "logging": {
                "log_dir": str(tmp_path / "prior_logs"),
                "log_interval": 1,
                "visualize_interval": 1,
                "num_visualize_samples": 1,
            },
        },
    }


def write_config(path, cfg: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def with_updates(cfg: dict, **dotted) -> dict:
    """A deep copy of ``cfg`` with ``dotted__keys=value`` set (``a__b__c`` -> cfg['a']['b']['c'])."""
    cfg = copy.deepcopy(cfg)
    for key, value in dotted.items():
        parts = key.split("__")
        node = cfg
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def spy_unet_sizes(monkeypatch) -> list:
    """The spatial size of every latent the sampling pipeline's UNet is called on, appended as it runs."""
    from vqldm.priors.diffusion import pipeline

    sizes, real = [], pipeline.as_denoiser

    def spy(net, *channels):
        call = real(net, *channels)

        def wrapped(x, t, condition=None):
            sizes.append(tuple(x.shape[2:]))
            return call(x, t, condition)
        return wrapped

    monkeypatch.setattr(pipeline, "as_denoiser", spy)
    return sizes


# ----------------------------------------------------------------------------------- CLI
def run_cli(*args) -> int:
    """``vqldm ARGS`` in this process; returns the exit code (use capsys to read stdout/stderr)."""
    from vqldm.cli import main

    try:
        return main([str(a) for a in args])
    except SystemExit as e:  # argparse errors and --help
        return int(e.code or 0)


def run_cli_subprocess(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m vqldm ARGS`` in a fresh interpreter (a true end-to-end run)."""
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "vqldm", *[str(a) for a in args]], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """4 train + 2 val synthetic microtubule volumes of 32^3 (do not modify: shared by all tests)."""
    out = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(out, NUM_TRAIN, NUM_VAL, SHAPE, seed=3, progress=False)
    return out


@pytest.fixture
def cfg_dict(tmp_path, data_dir) -> dict:
    return tiny_config_dict(tmp_path, data_dir)


@pytest.fixture(scope="session")
def trained_stage1(tmp_path_factory, data_dir) -> dict:
    """Stage 1 trained once (2 epochs); returns paths. Tests must not write into these folders."""
    root = tmp_path_factory.mktemp("stage1_run")
    cfg = tiny_config_dict(root, data_dir)
    cfg["vqvae"]["training"]["n_epochs"] = 2
    cfg_path = write_config(root / "config.yaml", cfg)
    rc = run_cli("--quiet", "train-vqvae", "--config", cfg_path)
    assert rc == 0, "stage-1 training of the shared fixture failed"
    out = Path(cfg["vqvae"]["checkpoints"]["output_dir"])
    return {"root": root, "config": cfg, "config_path": cfg_path, "out_dir": out,
            "best": out / "best_model.pt", "latest": out / "latest_checkpoint.pt",
            "log_dir": Path(cfg["vqvae"]["logging"]["log_dir"])}


@pytest.fixture(scope="session")
def trained_stage2(tmp_path_factory, data_dir, trained_stage1) -> dict:
    """Stage 2 trained once (1 epoch, EMA on, latent cache) on the shared stage-1 model."""
    root = tmp_path_factory.mktemp("stage2_run")
    cfg = tiny_config_dict(root, data_dir)
    cfg["diffusion"]["checkpoints"]["vqvae_path"] = str(trained_stage1["best"])
    cfg["diffusion"]["scale_factor_batches"] = 64  # the whole (tiny) training set
    cfg_path = write_config(root / "config.yaml", cfg)
    stage1_sha = hashlib.sha256(Path(trained_stage1["best"]).read_bytes()).hexdigest()
    rc = run_cli("--quiet", "train-diffusion", "--config", cfg_path)
    assert rc == 0, "stage-2 training of the shared fixture failed"
    out = Path(cfg["diffusion"]["checkpoints"]["output_dir"])
    return {"root": root, "config": cfg, "config_path": cfg_path, "out_dir": out,
            "best": out / "best_model.pt", "latest": out / "latest_checkpoint.pt",
            "log_dir": Path(cfg["diffusion"]["logging"]["log_dir"]), "stage1_sha_before": stage1_sha}


def labelled_config(root, stage1_best, stage: str, num_val: int = 3) -> dict:
    """Three filament-density levels under ``root/data`` (``vqldm synth --vary density --levels 3``: 3 train
    and ``num_val`` val volumes of 32^3, ``labels.csv`` with a label and covariates) and a tiny config whose
    ``data.labels_file`` makes ``stage`` ("diffusion" or "prior") class-conditional, on the shared stage 1
    ``stage1_best``."""
    data = Path(root) / "data"
    assert run_cli("--quiet", "synth", "--out", data, "--num-train", 3, "--num-val", num_val, "--shape", 32, 32, 32,
                   "--vary", "density", "--levels", 3) == 0
    cfg = tiny_config_dict(root, data)
    cfg["data"]["labels_file"] = str(data / "labels.csv")
    cfg[stage]["checkpoints"]["vqvae_path"] = str(stage1_best)
    return cfg


def labelled_prior(root: Path, stage1_best, **diffusion) -> dict:
    """:func:`labelled_config` and a tiny stage 2 trained on it, with the ``diffusion`` keys given."""
    cfg = labelled_config(root, stage1_best, "diffusion")
    cfg["diffusion"].update(diffusion)
    cfg_path = write_config(root / "config.yaml", cfg)
    assert run_cli("--quiet", "train-diffusion", "--config", cfg_path) == 0
    return {"root": root, "data": root / "data", "config": cfg, "config_path": cfg_path,
            "best": Path(cfg["diffusion"]["checkpoints"]["output_dir"]) / "best_model.pt"}


def copy_tree(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)
