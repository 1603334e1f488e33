"""A cascade prototype (issue 13): a small diffusion UNet learns the coarse views (block means over the
VQ-VAE's stride) of the training volumes; a coarse-to-fine prior then draws a fine volume for each
sampled view. Writes OUT/samples/sample_*.nii.gz for `vqldm evaluate --samples OUT/samples`.

The coarse-view UNet has the demo prior's size (channels 32, 64; attention on the second level),
v-prediction on the linear beta schedule, AdamW 1e-3, batch 16, EMA 0.995, the views flipped in x and y.

usage: python benchmarks/cascade_prototype.py --config CFG --coarse-checkpoint C2F.pt --out DIR
       [--train-steps 2000] [--samples 32]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from tqdm import tqdm

import vqldm
from vqldm.data import pipeline
from vqldm.data.io import read_volume, write_volume
from vqldm.latents import block_means
from vqldm.sampling.samplers import sample_latents

SCHEDULE = {"type": "ddpm", "num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 0.0015,
            "beta_end": 0.0195, "prediction_type": "v_prediction"}


def coarse_views(cfg, pipe) -> torch.Tensor:
    norm = pipeline.Normalization.from_dict(pipe.vq_ckpt["normalization"])
    views = [block_means(torch.from_numpy(np.clip(norm.unit(read_volume(f).array), 0, 1))[None, None].float(),
                         pipe.coarse_stride) for f in pipeline.scan_data_dir(cfg, "train_data_dir").files]
    return torch.cat(views)


def train_view_prior(x0: torch.Tensor, steps: int) -> DiffusionModelUNet:
    sched = DDPMScheduler(**{k: SCHEDULE[k] for k in ("num_train_timesteps", "schedule", "beta_start", "beta_end",
                                                       "prediction_type")})
    net = DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(32, 64),
                             attention_levels=(False, True), num_head_channels=(0, 32), num_res_blocks=1,
                             norm_num_groups=16)
    ema = copy.deepcopy(net).eval()
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    for _ in tqdm(range(steps), desc="coarse-view prior", unit="step"):
        z = x0[torch.randint(0, len(x0), (16,))]
        n, t = torch.randn_like(z), torch.randint(0, 1000, (16,))
        loss = torch.nn.functional.mse_loss(net(x=sched.add_noise(z, n, t), timesteps=t), sched.get_velocity(z, n, t))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), net.parameters()):
                e.lerp_(p, 0.005)
    return ema


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--coarse-checkpoint", required=True, help="a prior trained with diffusion.coarse_condition")
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = vqldm.load_config(args.config)
    pipe = vqldm.load_model(cfg, checkpoint=args.coarse_checkpoint).pipeline
    views = coarse_views(cfg, pipe)
    mu, sd = float(views.mean()), float(views.std())
    x0 = (views - mu) / sd
    x0 = torch.cat([x0, x0.flip(2), x0.flip(3), x0.flip(2).flip(3)])
    prior = train_view_prior(x0, args.train_steps)
    with torch.no_grad():
        noise = torch.randn((args.samples, *x0.shape[1:]), generator=torch.Generator().manual_seed(0))
        drawn = sample_latents("ddpm", lambda x, t, c=None: prior(x=x, timesteps=t), noise, 100, SCHEDULE,
                               generator=torch.Generator().manual_seed(1))
    drawn = (drawn * sd + mu).clamp(0, 1)
    print(f"coarse views: sampled mean {float(drawn.mean()):.4f}, real {mu:.4f}")
    out = Path(args.out) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    pipe.set_autoguidance(1.0)
    grid = pipe.voxel_grid
    for i in tqdm(range(args.samples), desc="coarse-to-fine", unit="vol"):
        pipe.set_coarse_view(drawn[i:i + 1])
        v = pipe.generate([i], seed=0, steps=100, sampler="ddpm", batch_size=1, snap=False)
        write_volume(out / f"sample_{i:04d}.nii.gz", v[0, 0].numpy(), grid.spacing, grid.unit, grid.affine)


if __name__ == "__main__":
    main()
