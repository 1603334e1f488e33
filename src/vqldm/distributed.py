"""torch.distributed helpers: every call is a no-op in a single process.

Under ``torchrun`` the environment holds RANK/WORLD_SIZE/LOCAL_RANK; vqldm then uses NCCL on
GPUs and gloo on CPU, and only rank 0 writes files.

On GPUs the process group is ``cpu:gloo,cuda:nccl``: CUDA tensors travel over NCCL and the few
small CPU tensors (validation sums, codebook counts, the scale factor) over gloo, so every helper
here takes a tensor on either device.

Collectives must be entered by every rank in the same order: never call one of these from code
that only rank 0 runs (pictures, checkpoint writing, the final summary).
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

# Long rank-0-only work (checkpoint writes, pictures, the first latent encodings) happens between
# collectives; the other ranks wait for it in the next one. 30 minutes is torch's gloo default.
TIMEOUT = datetime.timedelta(minutes=30)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(use_cuda: bool) -> None:
    """Join the process group when launched by torchrun (idempotent); quiet the logs of ranks > 0."""
    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        return
    if use_cuda and torch.cuda.is_available():
        # bind this process to its GPU before NCCL creates a communicator, so ranks never share GPU 0
        lr = local_rank()
        if lr >= torch.cuda.device_count():
            from vqldm.errors import VqldmError

            raise VqldmError(f"torchrun: local rank {lr} needs GPU {lr} but only {torch.cuda.device_count()} "
                             f"are visible; lower --nproc_per_node")
        torch.cuda.set_device(lr)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    if backend == "gloo":
        # error paths skip shutdown(): leave no process group behind (and no warning about it). Not
        # for NCCL, whose abort was a collective in some versions and could hang a failing rank
        atexit.register(_destroy)
    if dist.get_rank() != 0:
        # every rank runs the same code: info lines would repeat world_size times; warnings still show
        logging.getLogger("vqldm").setLevel(logging.WARNING)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shutdown() -> None:
    """Wait for every rank (rank 0 may still be writing), then leave the process group."""
    if is_dist():
        barrier()
        dist.destroy_process_group()


def exit_process(code: int = 0) -> NoReturn:
    """End a finished torchrun rank: run the exit handlers, flush, then ``os._exit(code)``.

    Call it after :func:`shutdown`. It skips interpreter finalisation, where torch's C++ teardown
    sometimes aborted a gloo rank even after the process group was destroyed (SIGABRT, "terminate
    called without an active exception"). torchrun then reported the finished job as failed.
    """
    atexit._run_exitfuncs()  # what a normal exit runs first (logging, process-group clean-up)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        if "nccl" in str(dist.get_backend()):
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _collective(t: torch.Tensor, fn) -> torch.Tensor:
    """Run ``fn`` on ``t`` in place; a CPU tensor in a NCCL-only group (one made outside vqldm)
    makes a round trip through the current GPU."""
    if not is_dist():
        return t
    if t.device.type == "cpu" and str(dist.get_backend()) == "nccl":
        tmp = t.to(torch.device("cuda", torch.cuda.current_device()))
        fn(tmp)
        t.copy_(tmp.cpu())
        return t
    fn(t)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (CPU or CUDA tensor)."""
    return _collective(t, lambda x: dist.all_reduce(x, op=dist.ReduceOp.SUM))


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks (CPU or CUDA tensor)."""
    return _collective(t, lambda x: dist.all_reduce(x, op=dist.ReduceOp.MAX))


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: every rank ends up with rank ``src``'s values (CPU or CUDA tensor)."""
    return _collective(t, lambda x: dist.broadcast(x, src=src))


def broadcast_object(obj, src: int = 0):
    """A picklable value from rank ``src`` to every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
