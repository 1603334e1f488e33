"""Stage 1 as an engine task: the VQ-VAE, its losses, codebook health and pictures."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vqldm.config import Config, latent_shape
from vqldm.data.pipeline import Normalization
from vqldm.data.units import VoxelGrid, grid_of
from vqldm.runtime import Runtime
from vqldm.engine.tensorboard import Board
from vqldm.engine.trainer import OptimizerSpec, StepContext, Task, make_optimizer
from vqldm.metrics.reconstruction import reconstruction_metrics
from vqldm.smlm.dataset import info_for_volumes
from vqldm.autoencoder.codebook import CodebookTracker, code_counts, init_from_data, restart_codes, usage_and_perplexity
from vqldm.autoencoder.losses import reconstruction_loss
from vqldm.autoencoder.model import build_vqvae, reconstruct, vqvae_net_config


class VQVAEForward(nn.Module):
    """One ``forward`` that returns what training needs, so DDP and torch.compile see one call."""

    def __init__(self, vqvae: nn.Module):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, x: torch.Tensor):
        return reconstruct(self.vqvae, x)


class VQVAETask(Task):
    name = "vqvae"
    graph_safe = True  # the codebook's data initialisation runs in the eager warm-up steps

    def __init__(self, cfg: Config, rt: Runtime, norm: Normalization, grid: VoxelGrid | tuple[float, float, float]):
        """``grid``: the training data's voxel grid (or a bare spacing, unit unknown), recorded in the checkpoints."""
        self.grid = grid if isinstance(grid, VoxelGrid) else grid_of(grid)
        self.cfg, self.rt, self.norm, self.spacing = cfg, rt, norm, self.grid.spacing
        v, train_cfg = cfg.vqvae, cfg.vqvae.training
        self.net_config = vqvae_net_config(cfg)
        self.model = rt.prepare_module(build_vqvae(self.net_config))
        self.quantizer = self.model.quantizer.quantizer
        self.train_forward = VQVAEForward(self.model)
        self.loss_fn = reconstruction_loss(train_cfg.loss, norm.intensity_range)
        self.q_weight = train_cfg.loss.quantization_weight
        cb = v.codebook
        self.tracker = CodebookTracker(v.num_embeddings, cb.restart_window_steps, cb.restart_threshold, rt.device)
        self.restarted_epoch = 0
        self.restarted_total = 0
        self.codebook_ready = cb.init != "data"
        if cb.init == "kaiming_uniform":
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.quantizer.embedding.weight, mode="fan_in", nonlinearity="linear")
                self.quantizer.ema_w.copy_(self.quantizer.embedding.weight)
        self.adv = train_cfg.adversarial
        self.disc = None
        if self.adv.enabled:
            from monai.losses import PatchAdversarialLoss
            from monai.networks.nets import PatchDiscriminator

            self.disc = rt.prepare_module(PatchDiscriminator(
                spatial_dims=3, channels=self.adv.num_channels, in_channels=1, out_channels=1,
                num_layers_d=self.adv.num_layers))
            self.adv_loss = PatchAdversarialLoss(criterion="least_squares")

    # -------------------------------------------------------------- engine hooks
    def optimizers(self) -> list[OptimizerSpec]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = self.cfg.vqvae.training.weight_decay
        specs = [OptimizerSpec("vqvae", make_optimizer(params, self.cfg.learning_rate("vqvae"), decay, self.rt),
                               "total_loss", params)]
        if self.disc is not None:
            dp = list(self.disc.parameters())
            specs.append(OptimizerSpec("discriminator", make_optimizer(dp, self.adv.learning_rate, 0.0, self.rt),
                                       "disc_loss", dp, active_from_epoch=self.adv.warmup_epochs))
        return specs

    def train_mode(self) -> None:
        self.model.train()
        if self.disc is not None:
            self.disc.train()

    def eval_mode(self) -> None:
        self.model.eval()
        if self.disc is not None:
            self.disc.eval()

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        x = self.rt.to_device(batch["image"])
        if not self.codebook_ready:  # seed the codebook from real encoder outputs, once
            with torch.no_grad():
                init_from_data(self.quantizer, self.model.encode(x).float())
        rec, q_loss, indices, z = self.train_forward(x)
        recon = self.loss_fn(rec, x)
        total = recon + self.q_weight * q_loss.float()
        out = {"recon_loss": recon, "quant_loss": q_loss.float()}
        if self.disc is not None and ctx.epoch >= self.adv.warmup_epochs:
            gen_adv = self.adv_loss(self.disc(rec.contiguous())[-1], target_is_real=True, for_discriminator=False)
            total = total + self.adv.weight * gen_adv
            fake = self.adv_loss(self.disc(rec.detach().contiguous())[-1], target_is_real=False, for_discriminator=True)
            real = self.adv_loss(self.disc(x)[-1], target_is_real=True, for_discriminator=True)
            out["gen_adv_loss"] = gen_adv
            out["disc_loss"] = 0.5 * (fake + real)
        out["total_loss"] = total
        out["indices"], out["z"] = indices, z  # for codebook tracking after the optimizer step
        return out

    def after_optimizer_step(self, out, ctx: StepContext) -> None:
        indices, z = out["indices"], out["z"]
        self.codebook_ready = True  # only now: a skipped first batch restores the codebook, so init again
        self.tracker.update(indices)
        cb = self.cfg.vqvae.codebook
        if cb.dead_code_restart and self.tracker.window_full():
            dead = self.tracker.dead_codes()
            n = restart_codes(self.quantizer, dead, z)
            self.restarted_epoch += n
            self.restarted_total += n

    def on_train_epoch_end(self, epoch: int) -> dict[str, float]:
        s = self.tracker.epoch_stats()
        out = {"codebook_usage": s["usage"], "codebook_perplexity": s["perplexity"],
               "codebook_restarted": float(self.restarted_epoch)}
        self.restarted_epoch = 0
        return out

    def validation_step(self, batch: dict, model: nn.Module) -> dict[str, torch.Tensor]:
        x = self.rt.to_device(batch["image"])
        rec, q_loss, indices, _ = reconstruct(model, x)
        recon = self.loss_fn(rec, x)
        m = reconstruction_metrics(self.norm.to_unit(rec.float()), self.norm.to_unit(x.float()),
                                   self.cfg.data.foreground_threshold)
        _, perplexity = usage_and_perplexity(code_counts(indices, self.cfg.vqvae.num_embeddings))
        return {"loss": recon + self.q_weight * q_loss.float(), "recon_loss": recon, "quant_loss": q_loss.float(),
                **m, "perplexity": torch.tensor(perplexity)}

    @torch.no_grad()
    def visualize(self, board: Board, model: nn.Module, batch: dict, epoch: int, png_dir: Path) -> None:
        n = self.cfg.vqvae.logging.num_visualize_samples
        x = self.rt.to_device(batch["image"][:n])
        with self.rt.autocast():
            rec = reconstruct(model, x)[0]
        x_u = self.norm.to_unit(x.float()).clamp(0, 1).cpu().numpy()
        r_u = self.norm.to_unit(rec.float()).clamp(0, 1).cpu().numpy()
        rows = [[x_u[i], r_u[i], abs(r_u[i] - x_u[i])] for i in range(x_u.shape[0])]
        board.mips("vqvae/input_reconstruction_error", rows, epoch, png_path=png_dir / f"recon_epoch{epoch:04d}.png")

    def _density(self) -> dict | None:
        """The voxelize data set's grid and density scale, where training kept the density (``fixed``)."""
        if self.norm.method != "fixed":
            return None
        return info_for_volumes(self.cfg.data.train_data_dir, self.cfg.data.voxel_resize)

    def checkpoint_meta(self) -> dict:
        return {
            "network": self.net_config,
            "normalization": self.norm.to_dict(),
            "data": {"patch_size": list(self.cfg.data.patch_size), **self.grid.to_meta(),
                     "foreground_threshold": self.cfg.data.foreground_threshold,
                     "smlm": self._density()},
            "latent_shape": latent_shape(self.cfg),
            "codebook": {"restarted_total": self.restarted_total},
        }

    def extra_state(self) -> dict:
        s = {"tracker": self.tracker.state_dict(), "codebook_ready": self.codebook_ready,
             "restarted_total": self.restarted_total}
        if self.disc is not None:
            s["discriminator"] = self.disc.state_dict()
        return s

    def load_extra_state(self, state: dict) -> None:
        if "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])
        self.codebook_ready = bool(state.get("codebook_ready", True))
        self.restarted_total = int(state.get("restarted_total", 0))
        if self.disc is not None and "discriminator" in state:
            self.disc.load_state_dict(state["discriminator"])
