"""``vqldm train-vqvae``: wire data, the stage-1 task and the engine together."""

from __future__ import annotations

import logging

from vqldm.config import Config
from vqldm.data import pipeline
from vqldm import distributed as dist
from vqldm.engine import setup
from vqldm.runtime import make_runtime
from vqldm.engine.trainer import FitResult, Trainer
from vqldm.stage1.task import Stage1Task

log = logging.getLogger("vqldm")


def train_vqvae(cfg: Config, overwrite: bool = False, progress: bool = True) -> FitResult:
    setup.start(cfg)
    rt = make_runtime(cfg)
    train_info, val_info = setup.scan_data(cfg, progress)
    norm = pipeline.normalization_of(cfg)
    train_ds = pipeline.train_dataset(cfg, train_info.files)
    val_ds = pipeline.val_dataset(cfg, val_info.files)
    train_loader, sampler = setup.train_loader(cfg, "vqvae", train_ds, rt)
    val_loader = setup.val_loader(cfg, "vqvae", val_ds, rt)
    task = Stage1Task(cfg, rt, norm, train_info.spacing)
    task.train_forward = setup.wrap_for_training(task.train_forward, rt)
    bs = cfg.batch_size("vqvae")
    log.info("stage 1: %d train volumes x %d patches, %d val tiles, batch %d (effective %d), lr %g",
             len(train_info.files), cfg.data.patches_per_volume, len(val_ds), bs, bs * dist.world_size(),
             cfg.learning_rate("vqvae"))
    trainer = Trainer(cfg, task, train_loader, val_loader, rt, overwrite=overwrite, progress=progress,
                      train_sampler=sampler)
    return trainer.fit()
