"""``vqldm train-vqvae``: wire data, the stage-1 task and the engine together."""

from __future__ import annotations

import logging

from vqldm.config import Config
from vqldm.data import pipeline
from vqldm import distributed as dist
from vqldm.engine import setup
from vqldm.runtime import make_runtime
from vqldm.engine.trainer import FitResult, Trainer
from vqldm.autoencoder.task import VQVAETask

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
    return build_vqvae_trainer(cfg, overwrite, progress).fit()
