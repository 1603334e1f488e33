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
    train = pipeline.scan_data_dir(cfg, "train_data_dir", progress and dist.is_main())
    val = pipeline.scan_data_dir(cfg, "val_data_dir", progress and dist.is_main())
    return train, val


def train_loader(cfg: Config, stage: str, dataset, rt: Runtime):
    sampler = None
    if dist.is_dist():
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=cfg.seed, drop_last=False)
    loader = pipeline.make_loader(dataset, cfg.batch_size(stage), shuffle=True, num_workers=cfg.data.num_workers,
                                  pin_memory=rt.is_cuda, sampler=sampler)
    return loader, sampler


class ShardSampler(torch.utils.data.Sampler):
    """Items ``rank, rank + world, ...`` in order: every item on exactly one rank, none repeated.

    Unlike ``DistributedSampler`` it does not pad the shards to equal length, so validation sums
    reduced over ranks weigh every tile once, as in a single process. Ranks may run a different
    number of validation batches; the engine's only collective there comes after the loop.
    """

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def val_loader(cfg: Config, stage: str, dataset, rt: Runtime):
    sampler = None
    if dist.is_dist():
        n, world = len(dataset), dist.world_size()
        if n >= world:
            sampler = ShardSampler(n, dist.rank(), world)
        else:
            # every rank needs one batch: ranks reduce the same metric keys, which a rank without data lacks
            sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False, drop_last=False)
            log.warning("validation: %d tiles for %d ranks; tiles are repeated to give every rank one, so "
                        "validation metrics weigh some tiles twice", n, world)
    return pipeline.make_loader(dataset, cfg.batch_size(stage), shuffle=False, num_workers=0,
                                pin_memory=rt.is_cuda, sampler=sampler)


def wrap_for_training(module: torch.nn.Module, rt: Runtime):
    """DDP under torchrun, then torch.compile when switched on (CUDA only).

    Compilation fuses elementwise work into fewer kernels; CUDA graphs are not its business here:
    the engine records the whole training step, optimizer included (:mod:`vqldm.graphs`).
    """
    fwd = module
    if dist.is_dist():
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [rt.device.index] if rt.is_cuda else None
        fwd = DDP(module, device_ids=ids)
    if rt.compile:
        fwd = torch.compile(fwd)
    return fwd


def sync_gradients(module: torch.nn.Module) -> torch.nn.Module:
    """Keep a module that is not DDP-wrapped identical on every rank, as DDP would.

    For networks the task calls several times per step (the stage-1 discriminator sees the
    reconstruction twice and the input once), which DDP's one-forward-one-backward contract does
    not allow. Parameters and buffers start from rank 0's; after every backward pass that reaches
    the module its gradients are averaged over ranks in one all-reduce (queued at the end of the
    backward pass, so the order in which autograd visits parameters does not matter); in train
    mode its buffers (BatchNorm statistics) are broadcast from rank 0 after each forward, so every
    rank holds rank 0's, the ones checkpointed (DDP's ``broadcast_buffers`` does this before each
    forward, which leaves each rank's own last update in place). A no-op in a single process.
    """
    if not dist.is_dist():
        return module
    import torch.distributed as tdist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
    params = [p for p in module.parameters() if p.requires_grad]
    world = dist.world_size()
    state = {"queued": False}

    def reduce_all() -> None:
        state["queued"] = False
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        flat /= world
        for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(r)

    def on_grad(_p) -> None:
        if not state["queued"]:
            state["queued"] = True
            torch.autograd.Variable._execution_engine.queue_callback(reduce_all)

    for p in params:
        p.register_post_accumulate_grad_hook(on_grad)

    buffers = list(module.buffers())

    def broadcast_buffers(mod, _inputs, _output) -> None:
        if mod.training and buffers:
            with torch.no_grad():
                for b in buffers:
                    dist.broadcast(b.data, src=0)

    module.register_forward_hook(broadcast_buffers)
    return module


def start(cfg: Config) -> None:
    """Process-wide set-up: distributed init and the base seed (network init is seeded by it)."""
    dist.init(cfg.device.use_cuda)
    seed_everything(cfg.seed)
    if dist.is_dist():
        log.info("distributed: rank %d of %d", dist.rank(), dist.world_size())
