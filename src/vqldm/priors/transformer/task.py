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
from vqldm.priors.diffusion.conditions import condition_keeps
from vqldm.priors.transformer.model import Vocabulary, build_transformer, start_tokens, to_grid, to_sequence, with_bos
from vqldm.priors.transformer.sampler import gumbel_noise, sample_tokens
from vqldm.runtime import Runtime
from vqldm.sampling.decode import decode_codes


def token_nll(model: nn.Module, seq: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (nats) of every code of (B, N) sequences under the prior, after ``start``
    (the begin-of-sequence token, or each row's class start token, or a prefix (B, 1 + K) of the start and
    covariate tokens): (B, N). The prefix's own predictions carry no loss."""
    logits = model(with_bos(seq, start))[:, -seq.shape[1]:]
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
        # the codes, the begin-of-sequence token (a class-conditional prior's null class), classes, covariates
        self.vocab = Vocabulary.of({**meta, "network": net_config})
        self.bos = self.vocab.bos
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
        """What precedes each sequence of a batch: a class-conditional prior's class start tokens (B,), a prior
        with covariates the start token and the covariate tokens (B, 1 + K). In training each condition is
        replaced by its null token with probability ``prior.condition_drop_prob``, and with more than one
        condition all of them together with it too (:func:`condition_keeps`; drawn on the device: graph-safe,
        resumed exactly)."""
        v = self.vocab
        given = ([self.rt.to_device(batch["label"])] if v.classes else []) + \
            ([self.rt.to_device(batch["covariates"])] if v.covariates else [])
        if not given:
            return self.bos
        shapes = [tuple(g.shape[:2]) for g in given]
        keeps = condition_keeps(shapes, self.cfg.prior.condition_drop_prob if drop else 0.0, given[0].device)
        starts = torch.full(shapes[0][:1], self.bos, dtype=torch.long, device=given[0].device)
        if v.classes:
            starts = torch.where(keeps[0], start_tokens(given[0], self.bos), starts)
        return v.prefix(starts, given[-1], keeps[-1]) if v.covariates else starts

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
        conditional prior draws the classes in turn (sample ``i``: class ``i mod C``, W = 1), covariates null."""
        p = self.cfg.prior
        noise = gumbel_noise(list(range(n)), seed, len(self.order_list), self.bos)
        start = start_tokens(torch.arange(n, device=self.rt.device) % len(self.classes), self.bos) \
            if self.classes else torch.tensor(self.bos, device=self.rt.device)
        seq = sample_tokens(model, noise, self.vocab.prefix(start), p.temperature, p.top_k, p.top_p,
                            autocast=self.rt.autocast, null_start=self.vocab.prefix(self.bos))
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
        mine, theirs = [[list((m.get("covariates") or {}).items()), m.get("covariate_bins")] for m in (self.meta, ckpt)]
        if mine != theirs:
            raise VqldmError(f"{key}: {path} was trained with covariates {dict(theirs[0])} in {theirs[1]} bins, this "
                             f"run has {dict(mine[0])} in {mine[1]} bins (prior.covariates, prior.covariate_bins, "
                             f"data.labels_file); resume with the same covariates")
