"""Where a training step's time goes on the GPU: wall time vs summed kernel time, and the top kernels.

For the benchmark's networks (the original README's VQ-VAE and UNet) it profiles a few warm steps of
  - the bare step (bf16 autocast, channels_last_3d, plain L1/MSE, fused AdamW; no engine), and
  - vqldm's engine step under the given switches,
and prints, per step: wall ms, summed kernel ms (the GPU's busy time), kernel launches, then the
top kernels by GPU time. Wall time well above kernel time means the step waits on the host.

    PYTHONPATH=src python benchmarks/profile_steps.py [--compile] [--graphs] [--stage 1|2|both]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from vqldm import benchmark as B
from vqldm.runtime import make_runtime

STEPS = 5


def _kernel_stats(prof) -> tuple[float, int, list[tuple[str, float, int]]]:
    total_us, launches, rows = 0.0, 0, []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0.0)
        if dev_us > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            total_us += dev_us
            launches += e.count
            rows.append((e.key, dev_us, e.count))
    rows.sort(key=lambda r: -r[1])
    return total_us, launches, rows


def profile_step(name: str, step) -> None:
    for _ in range(8):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / STEPS
    total_us, launches, rows = _kernel_stats(prof)
    print(f"== {name}: wall {wall * 1e3:.2f} ms/step, kernels {total_us / 1e3 / STEPS:.2f} ms/step, "
          f"{launches / STEPS:.0f} launches/step", flush=True)
    for key, us, count in rows[:12]:
        print(f"   {us / 1e3 / STEPS:7.3f} ms  x{count / STEPS:5.0f}  {key[:100]}", flush=True)


def bare_stage1(cfg, spec, dev):
    from vqldm.autoencoder.model import build_vqvae, vqvae_net_config

    m = build_vqvae(vqvae_net_config(cfg)).to(dev).to(memory_format=torch.channels_last_3d)
    x = torch.rand(spec["stage1_batch"], 1, *cfg.data.patch_size, device=dev).contiguous(
        memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            rec, ql = m(x)
            loss = F.l1_loss(rec.float(), x) + ql
        loss.backward()
        opt.step()
    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--compile", action="store_true")
    p.add_argument("--graphs", action="store_true")
    p.add_argument("--stage", default="both", choices=["1", "2", "both"])
    a = p.parse_args()
    spec = B.SPECS["full"]
    cfg = B._config(spec, "cuda")
    rt = dataclasses.replace(make_runtime(cfg), compile=a.compile, cuda_graphs=a.graphs)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; vqldm: {rt.describe()}", flush=True)
    if a.stage in ("1", "both"):
        profile_step("stage 1 bare bf16+channels_last (eager)", bare_stage1(cfg, spec, rt.device))
        profile_step("stage 1 vqldm engine step", B.vq_stage1(cfg, spec, rt))
    if a.stage in ("2", "both"):
        profile_step("stage 2 reference (eager fp16)", B.ref_stage2(cfg, spec, rt.device))
        profile_step("stage 2 vqldm engine step", B.vq_stage2(cfg, spec, rt))


if __name__ == "__main__":
    main()
