"""Where and how tensors run: device, AMP dtype, memory format, compile. Decided once per run."""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vqldm.config import Config
from vqldm import distributed as dist

log = logging.getLogger("vqldm")


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool
    compile: bool
    cuda_graphs: bool

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def needs_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def prepare_module(self, m: torch.nn.Module) -> torch.nn.Module:
        m = m.to(self.device)
        if self.channels_last:
            m = m.to(memory_format=torch.channels_last_3d)
        return m

    def frozen(self, m: torch.nn.Module) -> torch.nn.Module:
        """``m`` on this device, in eval mode, without gradients: a network that is only run."""
        m = self.prepare_module(m).eval()
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.is_cuda else cpu_name()
        amp = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[self.amp_dtype]
        extras = [x for x, on in (("channels_last_3d", self.channels_last), ("torch.compile", self.compile),
                                  ("CUDA graphs", self.cuda_graphs)) if on]
        return f"{self.device} ({name}), {amp}" + (", " + ", ".join(extras) if extras else "")


def make_runtime(cfg: Config) -> Runtime:
    d = cfg.device
    use_cuda = d.use_cuda and torch.cuda.is_available()
    if use_cuda:
        index = dist.local_rank() if dist.launched_by_torchrun() else d.gpu_id
        if index >= torch.cuda.device_count():
            from vqldm.errors import VqldmError

            raise VqldmError(f"device.gpu_id: GPU {index} requested but only {torch.cuda.device_count()} visible")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = d.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        amp = None
        if d.mixed_precision:
            amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        device, amp = torch.device("cpu"), _cpu_amp(d.cpu_bf16)
    return Runtime(device=device, amp_dtype=amp, channels_last=use_cuda and d.channels_last,
                   compile=use_cuda and d.compile, cuda_graphs=use_cuda and d.cuda_graphs)


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else the architecture platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN: AVX-512 BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _cpu_amp(asked: bool) -> torch.dtype | None:
    """``device.cpu_bf16``: bf16 autocast where the CPU has native bf16 (there 3D convolutions train about
    1.7x faster than in fp32, docs/performance.md); elsewhere emulated bf16 is slower than fp32, so fp32."""
    if not asked:
        return None
    if cpu_has_bf16():
        return torch.bfloat16
    log.info("device.cpu_bf16: this CPU has no native bf16 (AVX-512 BF16 or AMX); running in fp32")
    return None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    seed = int(seed) % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample ``index`` under ``seed``: which samples a run draws, and the noise of
    each, depend on neither the batch size nor the number of ranks (the MONAI bundle's inference.json
    writes the same formula as an expression)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


def epoch_seed(base: int, epoch: int, rank: int = 0) -> int:
    """Seed of one epoch on one rank: resuming at an epoch boundary replays exactly."""
    return (int(base) * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**31 - 1)
