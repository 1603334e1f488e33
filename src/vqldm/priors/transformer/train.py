"""``vqldm train-prior``: the frozen stage 1, its code indices (cached or on the fly), the class labels
(``data.labels_file``: a class-conditional prior), the token prior task."""

from __future__ import annotations

import logging
import math

from vqldm import distributed as dist
from vqldm import latents as L
from vqldm.autoencoder.model import total_stride
from vqldm.config import Config
from vqldm.data.labels import ClassLabels, LabelledDataset, dataset_labels
from vqldm.engine import setup
from vqldm.engine.trainer import FitResult, Trainer
from vqldm.priors.transformer.model import token_order, transformer_net_config
from vqldm.priors.transformer.task import TransformerTask
from vqldm.runtime import make_runtime

log = logging.getLogger("vqldm")


def build_prior_trainer(cfg: Config, overwrite: bool = False, progress: bool = True) -> Trainer:
    """Everything ``train_prior`` runs, ready to ``fit()`` (under torchrun: this rank's share)."""
    setup.start(cfg)
    rt = make_runtime(cfg)
    vqvae, vq_ckpt, grid = L.frozen_stage1(cfg, "prior", rt)
    net = vq_ckpt["network"]
    train_info, val_info = setup.scan_data(cfg, progress)
    labels = dataset_labels(cfg, train_info.files, val_info.files, list(cfg.prior.covariates), "prior.covariates")
    norm = L.stage1_normalization(cfg, vq_ckpt)
    val_tokens, tiles = L.encoded_tiles(cfg, "prior", val_info.files, norm, vqvae, rt, L.encode_indices)
    # a conditional prior validates on each tile's true class and covariates (its volume's), never dropped
    val_ds = L.TensorDictDataset(tokens=val_tokens, **({} if labels is None else labels.val_columns(
        [tile[0] for tile in tiles.tiles])))
    vis_real = L.real_tiles(tiles, norm, cfg.prior.logging.num_visualize_samples)
    train_ds, cached = L.train_items(cfg, "prior", train_info.files, norm, vqvae, rt, grid, total_stride(net),
                                     progress, encoder=L.encode_indices, key="tokens")
    if labels is not None:
        train_ds = LabelledDataset(train_ds, labels.train, labels.train_values)
    train_loader, sampler = setup.train_loader(cfg, "prior", train_ds, rt)
    val_loader = setup.val_loader(cfg, "prior", val_ds, rt)
    seq_len = math.prod(grid)
    net_cfg = transformer_net_config(cfg, net["num_embeddings"], seq_len, len(labels.classes) if labels else 0,
                                     len(labels.covariates) if labels else 0)
    meta = {**L.stage1_meta(cfg, "prior", vq_ckpt, train_info.grid, [net["embedding_dim"]] + grid, cached),
            **_condition_meta(cfg, labels)}
    task = TransformerTask(cfg, rt, vqvae, net_cfg, token_order(cfg.prior.ordering, grid, cfg.seed), grid, meta,
                           vis_real)
    task.train_forward = setup.wrap_for_training(task.model, rt)
    bs, world = cfg.batch_size("prior"), dist.world_size()
    log.info("token prior: %d tokens (%s grid, %s order) over %d codes, batch %d per rank x %d rank(s), lr %g",
             seq_len, "x".join(map(str, grid)), cfg.prior.ordering, net["num_embeddings"], bs, world,
             cfg.learning_rate("prior"))
    return Trainer(cfg, task, train_loader, val_loader, rt, overwrite=overwrite, progress=progress,
                   train_sampler=sampler)


def _condition_meta(cfg: Config, labels: ClassLabels | None) -> dict:
    """What the checkpoint records of the conditions (classes; covariates' ranges and bins), logged."""
    if labels is None:
        return {}
    p = cfg.prior
    if labels.classes:
        log.info("class-conditional token prior: %d classes (%s), one start token each, condition_drop_prob %g",
                 len(labels.classes), ", ".join(labels.classes), p.condition_drop_prob)
    if not labels.covariates:
        return labels.record()
    log.info("covariates as prepended tokens (%d bins each): %s, condition_drop_prob %g", p.covariate_bins,
             ", ".join(f"{k} in [{lo:g}, {hi:g}]" for k, (lo, hi) in labels.covariates.items()), p.condition_drop_prob)
    return {**labels.record(), "covariate_bins": p.covariate_bins}


def train_prior(cfg: Config, overwrite: bool = False, progress: bool = True) -> FitResult:
    return build_prior_trainer(cfg, overwrite, progress).fit()
