"""Shared run set-up for both stages: data scan, loaders, DDP/compile wrapping."""

from __future__ import annotations

import logging

import torch

from vqldm.config import Config
from vqldm.data import pipeline
from vqldm import distributed as dist
from vqldm.runtime import Runtime, seed_everything

log = logging.getLogger("vqldm")


def scan_data(cfg: Config, progress: bool = True):
    """Read every train and val volume once (bad files are named before any compute is spent)."""
    train = pipeline.scan_volumes(cfg.data.train_data_dir, "train_data_dir", cfg.data.skip_unreadable,
                                  progress and dist.is_main())
    val = pipeline.scan_volumes(cfg.data.val_data_dir, "val_data_dir", cfg.data.skip_unreadable,
                                progress and dist.is_main())
    return train, val


def train_loader(cfg: Config, stage: str, dataset, rt: Runtime):
    sampler = None
    if dist.is_dist():
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=cfg.seed, drop_last=False)
    loader = pipeline.make_loader(dataset, cfg.batch_size(stage), shuffle=True, num_workers=cfg.data.num_workers,
                                  pin_memory=rt.is_cuda, sampler=sampler)
    return loader, sampler


def val_loader(cfg: Config, stage: str, dataset, rt: Runtime):
    sampler = None
    if dist.is_dist():
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False, drop_last=False)
    return pipeline.make_loader(dataset, cfg.batch_size(stage), shuffle=False, num_workers=0,
                                pin_memory=rt.is_cuda, sampler=sampler)


def wrap_for_training(module: torch.nn.Module, rt: Runtime, cuda_graphs: bool = False):
    """DDP under torchrun, then torch.compile when switched on (CUDA only).

    ``cuda_graphs`` compiles with ``mode="reduce-overhead"`` (CUDA graphs), for networks whose step
    is bound by kernel-launch overhead rather than arithmetic (the stage-2 UNet on small latents).
    """
    fwd = module
    if dist.is_dist():
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [rt.device.index] if rt.is_cuda else None
        fwd = DDP(module, device_ids=ids)
    if cuda_graphs and rt.is_cuda:
        fwd = torch.compile(fwd, mode="reduce-overhead")
    elif rt.compile:
        fwd = torch.compile(fwd)
    return fwd


def start(cfg: Config) -> None:
    """Process-wide set-up: distributed init and the base seed (network init is seeded by it)."""
    dist.init(cfg.device.use_cuda)
    seed_everything(cfg.seed)
    if dist.is_dist():
        log.info("distributed: rank %d of %d", dist.rank(), dist.world_size())
