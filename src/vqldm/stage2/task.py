"""Stage 2 as an engine task: a diffusion UNet on the frozen VQ-VAE's scaled latent."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vqldm.config import Config
from vqldm.runtime import Runtime
from vqldm.engine.tensorboard import Board
from vqldm.engine.trainer import OptimizerSpec, StepContext, Task
from vqldm.generate.samplers import sample_latents
from vqldm.stage1.task import make_optimizer
from vqldm.stage1.model import codebook_range, snap_to_codebook
from vqldm.stage2.latents import encode
from vqldm.stage2.model import build_train_scheduler, build_unet, default_sampler, training_target


class Stage2Task(Task):
    kind = "stage2"
    stage_key = "diffusion"
    val_loss_key = "loss"
    graph_safe = True  # noise and timesteps are drawn on the device: each replay draws fresh ones

    def __init__(self, cfg: Config, rt: Runtime, vqvae: nn.Module, net_config: dict, scheduler_cfg: dict,
                 scale_factor: float, meta: dict, vis_real: torch.Tensor | None, to_unit):
        self.cfg, self.rt, self.vqvae = cfg, rt, vqvae
        self.net_config, self.sc, self.scale_factor = net_config, scheduler_cfg, float(scale_factor)
        self.meta, self.vis_real, self.to_unit = meta, vis_real, to_unit
        self.model = rt.prepare_module(build_unet(net_config, flash_attention=rt.is_cuda))
        self.train_forward = self.model
        self.scheduler = build_train_scheduler(scheduler_cfg)
        self.T = scheduler_cfg["num_train_timesteps"]

    def optimizers(self) -> list[OptimizerSpec]:
        params = list(self.model.parameters())
        opt = make_optimizer(params, self.cfg.learning_rate("diffusion"), self.cfg.diffusion.training.weight_decay,
                             self.rt)
        return [OptimizerSpec("unet", opt, "loss", params)]

    def latent_of(self, batch: dict) -> torch.Tensor:
        """Scaled latent of a batch: cached (``latent``) or encoded on the fly (``image``)."""
        if "latent" in batch:
            z = self.rt.to_device(batch["latent"]).float()
        else:
            z = encode(self.vqvae, batch["image"], self.rt)
            if self.rt.channels_last:
                z = z.contiguous(memory_format=torch.channels_last_3d)
        return z * self.scale_factor

    def _sample_t(self, z0: torch.Tensor) -> torch.Tensor:
        if self.sc["type"] == "rflow":
            return self.scheduler.sample_timesteps(z0).long()
        return torch.randint(0, self.T, (z0.shape[0],), device=z0.device)

    def _loss(self, net, z0, noise, t) -> torch.Tensor:
        x_t = self.scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
        pred = net(x=x_t, timesteps=t)
        return F.mse_loss(pred.float(), training_target(self.scheduler, self.sc, z0, noise, t).float())

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        z0 = self.latent_of(batch)
        noise = torch.randn_like(z0)
        return {"loss": self._loss(self.train_forward, z0, noise, self._sample_t(z0))}

    def validation_step(self, batch: dict, model: nn.Module) -> dict[str, torch.Tensor]:
        # fixed noise and timesteps per validation item: losses compare across epochs and runs
        z0 = self.latent_of(batch)
        noise = self.rt.to_device(batch["noise"]).float()
        t = self.rt.to_device(batch["t"]).long()
        return {"loss": self._loss(model, z0, noise, t)}

    @torch.no_grad()
    def generate(self, model: nn.Module, n: int, steps: int, seed: int, kind: str) -> torch.Tensor:
        """Decoded volumes in [0,1] units (B,1,X,Y,Z) on CPU."""
        shape = [n] + self.meta["latent_shape"]
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(shape, generator=g).to(self.rt.device)
        clip = codebook_range(self.vqvae, self.scale_factor) if self.cfg.diffusion.clip_to_codebook_range else None
        z = sample_latents(lambda x, t: model(x=x, timesteps=t), self.sc, noise, steps, kind=kind,
                           autocast=self.rt.autocast, clip_range=clip)
        z = z / self.scale_factor
        if self.cfg.diffusion.snap_to_codebook:  # the same decode as vqldm sample
            z = snap_to_codebook(self.vqvae, z)
        with self.rt.autocast():
            img = self.vqvae.decode(z)
        return self.to_unit(img.float()).clamp(0, 1).cpu()

    def visualize(self, board: Board, model: nn.Module, batch: dict, epoch: int, png_dir: Path) -> None:
        lg = self.cfg.diffusion.logging
        n = lg.num_visualize_samples
        kind = default_sampler(self.sc)
        gen = self.generate(model, n, lg.num_inference_steps, seed=self.cfg.seed, kind=kind).numpy()
        real = self.vis_real[:n].numpy() if self.vis_real is not None else gen[:0]
        rows = [list(real), list(gen)]
        board.mips("diffusion/real_vs_generated", [r for r in rows if r], epoch,
                   png_path=png_dir / f"generated_epoch{epoch:04d}.png")

    def checkpoint_meta(self) -> dict:
        return {"network": self.net_config, "scheduler": dict(self.sc), "scale_factor": self.scale_factor, **self.meta}
