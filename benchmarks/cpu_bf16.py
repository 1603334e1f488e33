"""Training-step time of the demo preset's networks on this CPU, fp32 against bf16 autocast
(``device.cpu_bf16``): the VQ-VAE (batch 8 of 48 x 48 x 24 volumes) and the diffusion UNet (batch 16 of
8 x 12 x 12 x 6 latents), each through vqldm's own builders, an Adam step included.

usage: python benchmarks/cpu_bf16.py [--threads 2] [--steps 5]

Prints one JSON line per network: seconds per step in fp32 and in bf16, and their ratio. bf16 is only
fast where the CPU has native bf16 (AVX-512 BF16 or AMX; ``vqldm.runtime.cpu_has_bf16``); elsewhere it
is emulated and slower than fp32, and ``device.cpu_bf16`` falls back to fp32.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources

import torch
import yaml

from vqldm.autoencoder.model import build_vqvae, reconstruct, vqvae_net_config
from vqldm.config import config_from_dict
from vqldm.priors.diffusion.unet import build_unet, unet_net_config
from vqldm.runtime import cpu_has_bf16


def step_seconds(net: torch.nn.Module, loss_of, steps: int, bf16: bool) -> float:
    """Mean seconds of ``steps`` training steps after two warm-up steps."""
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(net)
        opt.zero_grad()
        loss.float().backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_from_dict(yaml.safe_load(resources.files("vqldm.configs").joinpath("demo.yaml").read_text()))
    x, z, t = torch.rand(8, 1, 48, 48, 24), torch.randn(16, 8, 12, 12, 6), torch.randint(0, 1000, (16,))

    def vq_loss(net):
        rec, q_loss, _, _ = reconstruct(net, x)
        return (rec.float() - x).abs().mean() + q_loss

    def unet_loss(net):
        return (net(x=z, timesteps=t).float() - z).pow(2).mean()

    nets = {"vqvae": (lambda: build_vqvae(vqvae_net_config(cfg)), vq_loss),
            "diffusion_unet": (lambda: build_unet(unet_net_config(cfg)), unet_loss)}
    for name, (build, loss_of) in nets.items():
        sec = {}
        for bf16 in (False, True):
            torch.manual_seed(0)
            sec["bf16" if bf16 else "fp32"] = step_seconds(build(), loss_of, args.steps, bf16)
        print(json.dumps({"network": name, "threads": args.threads, "native_bf16": cpu_has_bf16(),
                          "fp32_s_per_step": sec["fp32"], "bf16_s_per_step": sec["bf16"],
                          "speedup": sec["fp32"] / sec["bf16"]}))


if __name__ == "__main__":
    main()
