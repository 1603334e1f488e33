"""``vqldm import-checkpoint``: checkpoints of the upstream scripts -> vqldm's self-describing ones.

The upstream ``3d_vq_ldm/train_vqvae.py`` saved ``{epoch, vqvae_state_dict, optimizer_state_dict,
best_val_loss}`` from the GenerativeModels-era ``VQVAE``, always built with ReLU activations (the
output's included) and that package's codebook EMA decay of 0.5; its weights have the layout of MONAI's
``VQVAE``. ``train_diffusion.py`` saved ``{epoch, unet_state_dict, optimizer_state_dict, scale_factor,
best_val_loss}`` from the old ``DiffusionModelUNet``, whose attention layers MONAI's
``DiffusionModelUNet.load_old_state_dict`` renames. The networks' arguments come from the upstream
config (``--config``). The files are untrusted: they load with ``weights_only=True``. Nothing is
written until both have loaded, key for key, into their networks.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vqldm.autoencoder.model import build_vqvae, vqvae_net_config
from vqldm.checkpoint import header, load_untrusted, rebuild, save_atomic
from vqldm.config import Config, apply_overrides, config_from_dict, latent_shape, load_config, load_yaml
from vqldm.data.pipeline import normalization_of
from vqldm.data.units import grid_of
from vqldm.errors import VqldmError
from vqldm.files import archive_previous, atomic_write_bytes
from vqldm.latents import stage1_meta
from vqldm.priors.diffusion.objective import scheduler_config
from vqldm.priors.diffusion.unet import build_unet, unet_net_config

log = logging.getLogger("vqldm")

BEST = "best_model.pt"
UPSTREAM_VQVAE = {"act": "RELU", "output_act": "RELU", "decay": 0.5}  # what the upstream scripts built
UPSTREAM_NUM_RES_BLOCKS = 1  # train_diffusion.py's value where its config gives none
SPACING = [1.0, 1.0, 1.0]  # the upstream data pipeline resampled every volume to unit spacing


@dataclass
class ImportOptions:
    config: str
    vqvae_checkpoint: Path
    out_dir: Path
    diffusion_checkpoint: Path | None = None
    overrides: tuple[str, ...] = ()
    overwrite: bool = False


def _raw(opts: ImportOptions) -> dict:
    return apply_overrides(load_yaml(opts.config), list(opts.overrides))


def imported_config(opts: ImportOptions) -> Config:
    """The upstream config in vqldm's keys, describing the networks the upstream scripts built, with
    every path under ``out_dir`` (absolute, so the file works from any folder)."""
    raw = _raw(opts)
    d = load_config(opts.config, list(opts.overrides)).to_dict()  # says what it translated
    d["data"]["intensity_range"] = [0.0, 1.0]  # the upstream pipeline scaled intensities to [0, 1]
    out = opts.out_dir.resolve()
    v, u = d["vqvae"], d["diffusion"]
    v["act"], v["output_act"], v["codebook"]["decay"] = (UPSTREAM_VQVAE[k] for k in ("act", "output_act", "decay"))
    v["checkpoints"] = {"output_dir": str(out / "vqvae_checkpoints"), "resume_from": None, "vqvae_path": None}
    v["logging"]["log_dir"] = str(out / "vqvae_logs")
    u["checkpoints"] = {"output_dir": str(out / "diffusion_checkpoints"), "resume_from": None,
                        "vqvae_path": str(out / "vqvae_checkpoints" / BEST)}
    u["logging"]["log_dir"] = str(out / "diffusion_logs")
    u["scheduler"]["type"], u["scheduler"]["prediction_type"] = "ddpm", "epsilon"  # the upstream DDPMScheduler
    if opts.diffusion_checkpoint and "num_res_blocks" not in (raw.get("diffusion") or {}):
        u["num_res_blocks"] = UPSTREAM_NUM_RES_BLOCKS
        log.info("diffusion.num_res_blocks: %d, as train_diffusion.py built its UNet without the key",
                 UPSTREAM_NUM_RES_BLOCKS)
    return config_from_dict(d, source=str(out / "config.yaml"))


def _upstream_file(path: Path, what: str, key: str, script: str) -> dict:
    ckpt = load_untrusted(path, what)
    if isinstance(ckpt, dict) and "vqldm_checkpoint" in ckpt:
        raise VqldmError(f"{what}: {path} is already a vqldm checkpoint; use it as it is")
    if isinstance(ckpt, dict) and key not in ckpt and "model_state_dict" in ckpt:
        raise VqldmError(f"{what}: {path} holds model_state_dict, a checkpoint of the upstream conditional "
                         f"diffusion script; vqldm has no projection-conditioned prior, so only {script}'s "
                         f"{key} imports")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(key), dict):
        held = ", ".join(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise VqldmError(f"{what}: {path} is not a {script} checkpoint (no {key}; it holds {held or 'nothing'})")
    if not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in ckpt[key].items()):
        raise VqldmError(f"{what}: {path}: {key} is not a state dict of named tensors")
    return ckpt


def _load_old_unet(net: dict, state: dict, path: Path):
    """The MONAI UNet of ``net`` holding ``state`` (old GenerativeModels layout, or already MONAI's):
    every weight must find its place and every place a weight, else one line."""
    what = "--diffusion-checkpoint"
    unet = build_unet(net)
    new_keys = set(unet.state_dict())
    already_new, old = all(k in new_keys for k in state), dict(state)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # MONAI prints while converting
            unet.load_old_state_dict(old)  # takes each weight it places out of ``old``
    except (KeyError, RuntimeError) as e:
        raise VqldmError(f"{what}: {path} does not fit the diffusion UNet that --config describes "
                         f"({str(e).splitlines()[0][:200]}); check diffusion.num_channels, attention_levels, "
                         f"num_head_channels and num_res_blocks") from None
    if not already_new and (old or len(state) != len(new_keys)):
        extra = f"e.g. {next(iter(old))} has no place" if old else f"{len(new_keys) - len(state)} left unfilled"
        raise VqldmError(f"{what}: {path} holds {len(state)} weights, the UNet of --config {len(new_keys)} "
                         f"({extra}); check diffusion.num_channels, attention_levels and num_res_blocks")
    return unet


def _scale_factor(ckpt: dict, path: Path) -> float:
    s = ckpt.get("scale_factor")
    if isinstance(s, torch.Tensor) and s.numel() == 1:
        s = float(s)
    if not isinstance(s, (int, float)) or isinstance(s, bool) or not (math.isfinite(s) and s > 0):
        raise VqldmError(f"--diffusion-checkpoint: {path}: scale_factor must be a positive number, got {s!r}")
    return float(s)


@dataclass
class Upstream:
    """Both upstream files, loaded into vqldm's networks and checked, before anything is written."""

    cfg: Config
    vqvae: torch.nn.Module
    vq_file: dict
    unet: torch.nn.Module | None = None
    diff_file: dict | None = None
    scale_factor: float | None = None


def load_upstream(opts: ImportOptions) -> Upstream:
    cfg = imported_config(opts)
    vq_file = _upstream_file(opts.vqvae_checkpoint, "--vqvae-checkpoint", "vqvae_state_dict", "train_vqvae.py")
    vq_net = vqvae_net_config(cfg)
    vqvae = rebuild(lambda: build_vqvae(vq_net), vq_file["vqvae_state_dict"], "--vqvae-checkpoint",
                    opts.vqvae_checkpoint, "VQ-VAE of the network --config describes")
    up = Upstream(cfg, vqvae, vq_file)
    if opts.diffusion_checkpoint:
        p = opts.diffusion_checkpoint
        up.diff_file = _upstream_file(p, "--diffusion-checkpoint", "unet_state_dict", "train_diffusion.py")
        up.scale_factor = _scale_factor(up.diff_file, p)
        up.unet = _load_old_unet(unet_net_config(cfg), up.diff_file["unet_state_dict"], p)
    return up


def _plain(x):
    """An upstream record value as a plain number (or None)."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _record(file: dict, path: Path, script: str) -> dict:
    return {"imported_from": {"path": str(Path(path).resolve()), "script": script, "epoch": _plain(file.get("epoch")),
                              "best_val_loss": _plain(file.get("best_val_loss"))}}


def stage1_checkpoint(up: Upstream, path: Path) -> dict:
    """A vqldm stage-1 ``best_model.pt`` of the upstream VQ-VAE."""
    cfg, f = up.cfg, up.vq_file
    d = header("vqvae")
    d.update({"epoch": int(_plain(f.get("epoch")) or 0), "step": 0, "val_loss": None,
              "best_val_loss": _plain(f.get("best_val_loss")), "ema": False, "config": cfg.to_dict(),
              "state_dict": up.vqvae.state_dict(), "network": vqvae_net_config(cfg),
              "normalization": normalization_of(cfg).to_dict(),
              "data": {"patch_size": list(cfg.data.patch_size), **grid_of(SPACING).to_meta(),
                       "foreground_threshold": cfg.data.foreground_threshold},
              "latent_shape": latent_shape(cfg), "codebook": {"restarted_total": 0}})
    d.update(_record(f, path, "train_vqvae.py"))
    return d


def stage2_checkpoint(up: Upstream, vq_ckpt: dict, path: Path) -> dict:
    """A vqldm stage-2 ``best_model.pt`` of the upstream UNet (after stage 1 is written: it records its hash)."""
    cfg, f = up.cfg, up.diff_file
    d = header("diffusion")
    d.update({"epoch": int(_plain(f.get("epoch")) or 0), "step": 0, "val_loss": None,
              "best_val_loss": _plain(f.get("best_val_loss")), "ema": False, "config": cfg.to_dict(),
              "state_dict": up.unet.state_dict(), "network": unet_net_config(cfg),
              "scheduler": scheduler_config(cfg), "scale_factor": up.scale_factor})
    d.update(stage1_meta(cfg, "diffusion", vq_ckpt, grid_of(SPACING), latent_shape(cfg), cached=False))
    d["latent_source"] = "imported"
    d.update(_record(f, path, "train_diffusion.py"))
    return d


def _prepare_out(opts: ImportOptions, dirs: list[Path]) -> None:
    taken = [p for p in [opts.out_dir / "config.yaml"] + [d / BEST for d in dirs] if p.exists()]
    if taken and not opts.overwrite:
        raise VqldmError(f"--out: {taken[0]} already exists; pass --overwrite to move the earlier files to "
                         f"previous_<time>/")
    for folder, pattern in [(opts.out_dir, "config.yaml")] + [(d, BEST) for d in dirs]:
        if folder.is_dir():
            archive_previous(folder, (pattern,))


def import_checkpoints(opts: ImportOptions) -> dict:
    """Load and check both upstream files, then write OUT/vqvae_checkpoints/best_model.pt,
    OUT/diffusion_checkpoints/best_model.pt (with ``--diffusion-checkpoint``) and OUT/config.yaml."""
    up = load_upstream(opts)
    vq_path = Path(up.cfg.vqvae.checkpoints.output_dir) / BEST
    diff_path = Path(up.cfg.diffusion.checkpoints.output_dir) / BEST
    _prepare_out(opts, [vq_path.parent] + ([diff_path.parent] if up.unet is not None else []))
    vq_ckpt = stage1_checkpoint(up, opts.vqvae_checkpoint)
    save_atomic(vq_ckpt, vq_path)
    written = {"vqvae": vq_path}
    if up.unet is not None:
        save_atomic(stage2_checkpoint(up, vq_ckpt, opts.diffusion_checkpoint), diff_path)
        written["diffusion"] = diff_path
    config_path = Path(up.cfg.source)
    atomic_write_bytes(config_path, up.cfg.to_yaml().encode("utf-8"))
    written["config"] = config_path
    return written
