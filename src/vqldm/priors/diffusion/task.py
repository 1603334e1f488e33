"""The diffusion prior as an engine task: a UNet learns the frozen VQ-VAE's scaled latent."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vqldm.config import Config
from vqldm.engine.tensorboard import Board
from vqldm.engine.trainer import OptimizerSpec, StepContext, Task, make_optimizer
from vqldm.errors import VqldmError
from vqldm.data.pipeline import to_unit
from vqldm.latents import LatentNorm, block_means, check_same_stage1, encode
from vqldm.priors.diffusion.autoguidance import GUIDE
from vqldm.priors.diffusion.coarse import as_view
from vqldm.priors.diffusion.conditions import Slots, training_args, unet_args
from vqldm.priors.diffusion.objective import Objective
from vqldm.priors.diffusion.unet import as_denoiser, build_unet, self_condition_channels
from vqldm.runtime import Runtime
from vqldm.sampling.decode import decode_latents
from vqldm.sampling.samplers import default_sampler, sample_latents
from vqldm.sampling.self_condition import SelfCondition, carried


class DiffusionTask(Task):
    name = "diffusion"
    graph_safe = True  # noise and timesteps are drawn on the device: each replay draws fresh ones

    def __init__(self, cfg: Config, rt: Runtime, vqvae: nn.Module, net_config: dict, scheduler_cfg: dict,
                 norm: LatentNorm, meta: dict, vis_real: torch.Tensor | None):
        self.cfg, self.rt, self.vqvae = cfg, rt, vqvae
        self.net_config, self.sc, self.norm = net_config, scheduler_cfg, norm
        self.meta, self.vis_real = meta, vis_real
        self.model = rt.prepare_module(build_unet(net_config, flash_attention=rt.is_cuda))
        self.slots = Slots.of(net_config)
        self.extra_channels = self.slots.extra_channels  # coarse-to-fine: 2
        self.sc_channels = self_condition_channels(net_config)
        self.self_condition = (SelfCondition(cfg.diffusion.self_condition_min_timestep) if self.sc_channels
                               else None)
        self.train_forward = self.model
        sched = cfg.diffusion.scheduler
        self.objective = Objective(scheduler_cfg, sched.timestep_bias, rt.device, self.self_condition)
        self.bias_epochs = sched.timestep_bias_epochs  # None: every epoch draws with the bias

    def optimizers(self) -> list[OptimizerSpec]:
        params = list(self.model.parameters())
        opt = make_optimizer(params, self.cfg.learning_rate("diffusion"), self.cfg.diffusion.training.weight_decay,
                             self.rt)
        return [OptimizerSpec("unet", opt, "loss", params)]

    def latent_of(self, batch: dict) -> torch.Tensor:
        """Normalised latent of a batch: cached (``latent``) or encoded on the fly (``image``)."""
        if "latent" in batch:
            z = self.rt.to_device(batch["latent"]).float()
        else:
            z = encode(self.vqvae, batch["image"], self.rt)
            if self.rt.channels_last:
                z = z.contiguous(memory_format=torch.channels_last_3d)
        return self.norm.normalize(z)

    @property
    def classes(self) -> list[str] | None:
        """The class names of a class-conditional UNet (``data.labels_file``), else None."""
        return self.meta.get("classes")

    def condition_of(self, batch: dict, drop: bool) -> dict | None:
        """The UNet's conditioning arguments for a batch (:mod:`.conditions`): its classes, coarse views and
        covariates, as the UNet takes them; in training each is dropped to its null with probability
        ``diffusion.condition_drop_prob`` (drawn on the device: graph-safe, resumed exactly)."""
        if not self.slots.count:
            return None
        labels = self.rt.to_device(batch["label"]).long() if self.slots.null_class is not None else None
        coarse = self.coarse_of(batch) if self.extra_channels else None
        values = self.rt.to_device(batch["covariates"]).float() if self.slots.covariates else None
        return training_args(self.slots, labels, coarse, values, self.cfg.diffusion.condition_drop_prob if drop else 0.0)

    def coarse_of(self, batch: dict) -> torch.Tensor:
        """A batch's coarse views (B, 1, x, y, z): cached with the latents, or from its image patches."""
        view = self.meta["coarse_condition"]
        if "coarse" in batch:
            return as_view(self.rt.to_device(batch["coarse"]).float(), view.get("view", "volume"))
        img = to_unit(self.rt.to_device(batch["image"]).float(), self.meta["normalization"]["intensity_range"])
        return as_view(block_means(img.clamp(0, 1), view["stride"]), view.get("view", "volume"))

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        z0 = self.latent_of(batch)
        noise = torch.randn_like(z0)
        t = self.objective.sample_timesteps(z0)
        cond = self.condition_of(batch, drop=True)
        return {"loss": self.objective.loss(self._denoiser(self.train_forward), z0, noise, t, cond)}

    def validation_step(self, batch: dict, model: nn.Module) -> dict[str, torch.Tensor]:
        # fixed noise and timesteps per validation item: losses compare across epochs and runs
        z0 = self.latent_of(batch)
        noise = self.rt.to_device(batch["noise"]).float()
        t = self.rt.to_device(batch["t"]).long()
        return {"loss": self.objective.loss(self._denoiser(model), z0, noise, t, self.condition_of(batch, drop=False))}

    def _denoiser(self, model: nn.Module):
        return as_denoiser(model, self.extra_channels, self.sc_channels)

    def _sampling_denoiser(self, model: nn.Module):
        """The previews' UNet call: unconditional (every condition its null), except that a class-conditional
        model draws the classes in turn (sample i: class i mod C)."""
        den, slots = self._denoiser(model), self.slots
        if not slots.count:
            return den

        def call(x, t, condition=None):
            args = {**unet_args(slots, x, None), **carried(condition)}
            if self.classes:
                args["class_labels"] = torch.arange(x.shape[0], device=x.device) % len(self.classes)
            return den(x, t, args)
        return call

    @torch.no_grad()
    def generate(self, model: nn.Module, n: int, steps: int, seed: int, sampler: str) -> torch.Tensor:
        """Decoded volumes in [0,1] units (B,1,X,Y,Z) on CPU, from one seeded batch of noise."""
        shape = [n] + self.meta["latent_shape"]
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(self.rt.device)
        clip = self.norm.codebook_range(self.vqvae) if self.cfg.diffusion.clip_to_codebook_range else None
        z = sample_latents(sampler, self._sampling_denoiser(model), noise, steps, self.sc, autocast=self.rt.autocast,
                           clip_range=clip, generator=torch.Generator(device=noise.device).manual_seed(seed),
                           self_condition=self.self_condition)
        return decode_latents(self.vqvae, z, self.norm, self.meta["normalization"]["intensity_range"],
                              self.cfg.diffusion.snap_to_codebook, self.rt.autocast,
                              self.meta.get("intensity_calibration"))

    def visualize(self, board: Board, model: nn.Module, batch: dict, epoch: int, png_dir: Path) -> None:
        lg = self.cfg.diffusion.logging
        n = lg.num_visualize_samples
        gen = self.generate(model, n, lg.num_inference_steps, seed=self.cfg.seed, sampler=default_sampler(self.sc, self.cfg.diffusion.sampler))
        gen = gen.numpy()
        real = self.vis_real[:n].numpy() if self.vis_real is not None else gen[:0]
        rows = [list(real), list(gen)]
        board.mips("diffusion/real_vs_generated", [r for r in rows if r], epoch,
                   png_path=png_dir / f"generated_epoch{epoch:04d}.png")

    def checkpoint_meta(self) -> dict:
        return {"network": self.net_config, "scheduler": dict(self.sc), **self.norm.to_meta(), **self.meta,
                "timestep_bias": self.objective.timestep_bias, "timestep_bias_epochs": self.bias_epochs,
                "self_condition": None if self.self_condition is None else self.self_condition.to_meta()}

    def on_train_epoch_end(self, epoch: int) -> dict[str, float]:
        """After epoch ``timestep_bias_epochs``, timesteps are drawn uniformly (the fine steps catch up)."""
        if self.bias_epochs is not None:
            self.objective.set_biased(epoch < self.bias_epochs)
        return {"timestep_biased": float(self.objective.biased)} if self.objective.timestep_bias else {}

    def extra_state(self) -> dict:
        return {"timestep_biased": self.objective.biased}

    def load_extra_state(self, state: dict) -> None:
        if "timestep_biased" in state:
            self.objective.set_biased(state["timestep_biased"])

    def snapshot_epochs(self) -> dict[int, str]:
        """The autoguidance guide: the EMA weights at ``diffusion.autoguidance.guide_epoch``."""
        e = self.cfg.diffusion.autoguidance.guide_epoch
        return {e: GUIDE} if e > 0 else {}

    def check_resume(self, ckpt: dict, path: Path, key: str) -> None:
        check_same_stage1(ckpt, self.meta, path, key, "diffusion")
        if ckpt.get("classes") != self.classes:
            raise VqldmError(f"{key}: {path} was trained with classes {ckpt.get('classes')}, this run has "
                             f"{self.classes} (data.labels_file); resume with the same labels")
        if ckpt.get("covariates") != self.meta.get("covariates"):
            raise VqldmError(f"{key}: {path} was trained with covariates {ckpt.get('covariates')}, this run has "
                             f"{self.meta.get('covariates')} (diffusion.covariates and their training range); "
                             f"resume with the same labels")
