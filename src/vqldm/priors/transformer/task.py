"""The token prior as an engine task: a transformer learns the frozen VQ-VAE's code sequences (after a
class's start token, for a class-conditional prior)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vqldm.config import Config
from vqldm.engine.tensorboard import Board
from vqldm.engine.trainer import OptimizerSpec, StepContext, Task, make_optimizer
from vqldm.errors import VqldmError
from vqldm.latents import check_same_stage1, encode_indices
from vqldm.priors.transformer.model import build_transformer, start_tokens, to_grid, to_sequence, with_bos
from vqldm.priors.transformer.sampler import gumbel_noise, sample_tokens
from vqldm.runtime import Runtime
from vqldm.sampling.decode import decode_codes


def token_nll(model: nn.Module, seq: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (nats) of every code of (B, N) sequences under the prior, after ``start``
    (the begin-of-sequence token, or each row's class start token): (B, N)."""
    logits = model(with_bos(seq, start))
    return F.cross_entropy(logits.float().transpose(1, 2), seq, reduction="none")


class TransformerTask(Task):
    name = "prior"
    graph_safe = True  # embedding dropout draws on the device; no host decision in the step

    def __init__(self, cfg: Config, rt: Runtime, vqvae: nn.Module, net_config: dict, order: list[int],
                 grid: list[int], meta: dict, vis_real: torch.Tensor | None):
        self.cfg, self.rt, self.vqvae = cfg, rt, vqvae
        self.net_config, self.grid, self.meta, self.vis_real = net_config, list(grid), meta, vis_real
        self.order_list = list(order)
        self.order = torch.tensor(order, dtype=torch.long, device=rt.device)
        # the begin-of-sequence token, one past the codes: a class-conditional prior's null class
        self.bos = net_config["num_tokens"] - 1 - len(self.classes or [])
        self.model = rt.prepare_module(build_transformer(net_config))
        self.train_forward = self.model

    def optimizers(self) -> list[OptimizerSpec]:
        params = list(self.model.parameters())
        opt = make_optimizer(params, self.cfg.learning_rate("prior"), self.cfg.prior.training.weight_decay, self.rt)
        return [OptimizerSpec("transformer", opt, "loss", params)]

    def tokens_of(self, batch: dict) -> torch.Tensor:
        """(B, N) code sequences of a batch: cached (``tokens``) or encoded on the fly (``image``)."""
        grid = self.rt.to_device(batch["tokens"]) if "tokens" in batch else encode_indices(self.vqvae, batch["image"],
                                                                                           self.rt)
        return to_sequence(grid.long(), self.order)

    @property
    def classes(self) -> list[str] | None:
        """The class names of a class-conditional prior (``data.labels_file``), else None."""
        return self.meta.get("classes")

    def start_of(self, batch: dict, drop: bool) -> int | torch.Tensor:
        """The start token of each sequence of a batch: a conditional prior's class start tokens, in
        training each replaced by the null (begin-of-sequence) token with probability
        ``prior.condition_drop_prob`` (drawn on the device: graph-safe, resumed exactly)."""
        if not self.classes:
            return self.bos
        starts = start_tokens(self.rt.to_device(batch["label"]), self.bos)
        p = self.cfg.prior.condition_drop_prob if drop else 0.0
        if p > 0:
            null = torch.full_like(starts, self.bos)
            starts = torch.where(torch.rand(starts.shape, device=starts.device) < p, null, starts)
        return starts

    def _losses(self, net, batch: dict, drop: bool) -> dict[str, torch.Tensor]:
        loss = token_nll(net, self.tokens_of(batch), self.start_of(batch, drop)).mean()
        return {"loss": loss, "bits_per_token": loss.detach() / math.log(2.0)}

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        return self._losses(self.train_forward, batch, drop=True)

    def validation_step(self, batch: dict, model: nn.Module) -> dict[str, torch.Tensor]:
        return self._losses(model, batch, drop=False)

    @torch.no_grad()
    def generate(self, model: nn.Module, n: int, seed: int) -> torch.Tensor:
        """Decoded volumes in [0,1] units (B,1,X,Y,Z) on CPU, sample ``i`` seeded by ``(seed, i)``; a
        conditional prior draws the classes in turn (sample ``i``: class ``i mod C``, W = 1)."""
        p = self.cfg.prior
        noise = gumbel_noise(list(range(n)), seed, len(self.order_list), self.bos)
        start = start_tokens(torch.arange(n, device=self.rt.device) % len(self.classes), self.bos) \
            if self.classes else self.bos
        seq = sample_tokens(model, noise, start, p.temperature, p.top_k, p.top_p, autocast=self.rt.autocast)
        return decode_codes(self.vqvae, to_grid(seq, self.order, self.grid),
                            self.meta["normalization"]["intensity_range"], self.rt.autocast,
                            self.meta.get("intensity_calibration"))

    def visualize(self, board: Board, model: nn.Module, batch: dict, epoch: int, png_dir: Path) -> None:
        n = self.cfg.prior.logging.num_visualize_samples
        gen = self.generate(model, n, seed=self.cfg.seed).numpy()
        real = self.vis_real[:n].numpy() if self.vis_real is not None else gen[:0]
        rows = [list(real), list(gen)]
        board.mips("prior/real_vs_generated", [r for r in rows if r], epoch,
                   png_path=png_dir / f"generated_epoch{epoch:04d}.png")

    def checkpoint_meta(self) -> dict:
        return {"network": self.net_config, "ordering": {"type": self.cfg.prior.ordering, "order": self.order_list},
                "latent_grid": self.grid, **self.meta}

    def check_resume(self, ckpt: dict, path: Path, key: str) -> None:
        check_same_stage1(ckpt, self.meta, path, key, "prior")
        theirs = ckpt.get("ordering", {})
        if theirs.get("order") is not None and theirs["order"] != self.order_list:
            raise VqldmError(f"{key}: {path} reads the code grid in another order ({theirs.get('type')}) than "
                             f"prior.ordering ({self.cfg.prior.ordering}) gives here; resume with the same ordering "
                             f"and patch size, or start afresh")
        if ckpt.get("classes") != self.classes:
            raise VqldmError(f"{key}: {path} was trained with classes {ckpt.get('classes')}, this run has "
                             f"{self.classes} (data.labels_file); resume with the same labels")
