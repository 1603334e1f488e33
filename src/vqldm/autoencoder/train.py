"""``vqldm train-vqvae``: wire data, the stage-1 task and the engine together."""

from __future__ import annotations

import logging

from vqldm.config import Config
from vqldm.data import pipeline
from vqldm import distributed as dist
from vqldm.engine import setup
from vqldm.runtime import make_runtime
from vqldm.engine.trainer import FitResult, Trainer
from vqldm.autoencoder.calibration import calibration_of
from vqldm.autoencoder.model import build_vqvae, total_stride
from vqldm.autoencoder.task import VQVAETask
from vqldm.checkpoint import load_checkpoint, save_atomic

log = logging.getLogger("vqldm")


def build_vqvae_trainer(cfg: Config, overwrite: bool = False, progress: bool = True) -> Trainer:
    """Everything ``train_vqvae`` runs, ready to ``fit()`` (under torchrun: this rank's share).

    The trainer's ``task`` holds the network (``task.model``) and the codebook
    (``task.quantizer``): tests and scripts read them after ``fit()``.
    """
    setup.start(cfg)
    rt = make_runtime(cfg)
    train_info, val_info = setup.scan_data(cfg, progress)
    norm = pipeline.normalization_of(cfg)
    train_ds = pipeline.train_dataset(cfg, train_info.files)
    val_ds = pipeline.val_dataset(cfg, val_info.files)
    train_loader, sampler = setup.train_loader(cfg, "vqvae", train_ds, rt)
    val_loader = setup.val_loader(cfg, "vqvae", val_ds, rt)
    task = VQVAETask(cfg, rt, norm, train_info.spacing)
    task.train_forward = setup.wrap_for_training(task.train_forward, rt)
    if task.disc is not None:  # called three times a step: gradients averaged by hooks, not DDP
        setup.sync_gradients(task.disc)
    bs, world = cfg.batch_size("vqvae"), dist.world_size()
    log.info("stage 1: %d train volumes x %d patches, %d val tiles, batch %d per rank x %d rank(s) = effective "
             "batch %d, lr %g%s", len(train_info.files), cfg.data.patches_per_volume, len(val_ds), bs, world,
             bs * world, cfg.learning_rate("vqvae"), " (not scaled with the number of ranks)" if world > 1 else "")
    return Trainer(cfg, task, train_loader, val_loader, rt, overwrite=overwrite, progress=progress,
                   train_sampler=sampler)


def train_vqvae(cfg: Config, overwrite: bool = False, progress: bool = True) -> FitResult:
    trainer = build_vqvae_trainer(cfg, overwrite, progress)
    res = trainer.fit()
    if cfg.vqvae.intensity_calibration:
        if dist.is_main() and res.best_path is not None:
            calibrate_checkpoints(cfg, trainer, [res.best_path, res.latest_path])
        dist.barrier()  # no rank reads the checkpoints before the table is in them
    return res


def calibrate_checkpoints(cfg: Config, trainer: Trainer, paths) -> dict:
    """Fit the intensity calibration (:mod:`vqldm.autoencoder.calibration`) with the weights of
    ``best_model.pt`` on the training volumes, and add it to each checkpoint in ``paths``."""
    task = trainer.task
    model = build_vqvae(task.net_config)
    model.load_state_dict(load_checkpoint(paths[0], kind="vqvae")["state_dict"])
    model = trainer.rt.frozen(model)
    files = pipeline.scan_data_dir(cfg, "train_data_dir").files
    volumes = pipeline.val_dataset(cfg, files, task.norm).volumes  # deterministic load / normalise / pad
    table = calibration_of(model, volumes, task.norm.intensity_range, trainer.rt, total_stride(task.net_config))
    for path in paths:
        ckpt = load_checkpoint(path, kind="vqvae")
        ckpt["intensity_calibration"] = table
        save_atomic(ckpt, path)
    log.info("intensity calibration fitted on %d training volumes and stored in %s", len(files),
             ", ".join(str(p) for p in paths))
    return table
