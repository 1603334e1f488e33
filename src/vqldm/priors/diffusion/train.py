"""``vqldm train-diffusion``: the frozen stage 1, latents (cached or on the fly), the diffusion task."""

from __future__ import annotations

import logging
import math

import torch

from vqldm import distributed as dist
from vqldm import latents as L
from vqldm.autoencoder.model import total_stride
from vqldm.checkpoint import load_checkpoint
from vqldm.config import Config, check_latent_for_unet
from vqldm.data import pipeline
from vqldm.data.labels import ClassLabels, LabelledDataset, dataset_labels
from vqldm.engine import setup
from vqldm.engine.trainer import FitResult, Trainer, resume_path
from vqldm.errors import VqldmError
from vqldm.priors.diffusion.objective import scheduler_config
from vqldm.priors.diffusion.task import DiffusionTask
from vqldm.priors.diffusion.unet import unet_net_config
from vqldm.runtime import Runtime, make_runtime

log = logging.getLogger("vqldm")


def _fixed_noise(n: int, shape: list[int], T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn([n] + shape, generator=g), torch.randint(0, T, (n,), generator=g)


def _stage1(cfg: Config, rt: Runtime):
    """The frozen VQ-VAE, its checkpoint, and the latent's spatial size, checked against the UNet."""
    u = cfg.diffusion
    vqvae, vq_ckpt, lat_spatial = L.frozen_stage1(cfg, "diffusion", rt)
    net = vq_ckpt["network"]
    if net["embedding_dim"] != u.in_channels or net["embedding_dim"] != u.out_channels:
        raise VqldmError(f"diffusion.in_channels/out_channels ({u.in_channels}/{u.out_channels}) must equal the "
                         f"stage-1 checkpoint's embedding_dim ({net['embedding_dim']}) from "
                         f"{u.checkpoints.vqvae_path}")
    check_latent_for_unet(len(u.num_channels), lat_spatial, "diffusion.num_channels / data.patch_size")
    return vqvae, vq_ckpt, lat_spatial


def _latent_norm(cfg: Config, train_ds, train_loader, sampler, use_cache: bool, vqvae, rt: Runtime) -> L.LatentNorm:
    """The config's scale factor, the resumed run's normalisation, or measured from the training
    latents (on rank 0, then broadcast): one 1/std, or per channel with ``diffusion.latent_norm: channel``."""
    u = cfg.diffusion
    resume = resume_path(u, "diffusion")
    if u.scale_factor is not None:
        log.info("scale_factor %.5g (from diffusion.scale_factor)", u.scale_factor)
        return L.LatentNorm(float(u.scale_factor))
    if resume:
        # the UNet being resumed learned latents normalised this way: keep it, whatever the data or ranks now
        norm = L.LatentNorm.from_checkpoint(load_checkpoint(resume, kind="diffusion",
                                                            what="diffusion.checkpoints.resume_from"))
        log.info("latent normalisation from the resumed checkpoint %s: %s", resume, norm)
        return norm
    getter = (lambda b: b["latent"].float()) if use_cache else (lambda b: L.encode(vqvae, b["image"], rt))
    # rank 0 reads the whole training set, not its shard: the same batches, hence the same value, as
    # one process with this seed, for any number of ranks
    measure = train_loader if sampler is None else pipeline.make_loader(
        train_ds, cfg.batch_size("diffusion"), True, cfg.data.num_workers, rt.is_cuda)
    if u.latent_norm == "channel":
        norm = L.measure_channel_norm(measure, getter, u.scale_factor_batches)
        log.info("latent normalisation per channel over up to %d training batches: 1/std %s", u.scale_factor_batches,
                 ", ".join(f"{s:.3g}" for s in norm.scale))
        scales = norm.scale
    else:
        norm = L.LatentNorm(L.measure_scale_factor(measure, getter, u.scale_factor_batches))
        log.info("scale_factor %.5g = 1/std of latents over up to %d training batches", norm.scale,
                 u.scale_factor_batches)
        scales = [norm.scale]
    if not all(math.isfinite(s) and 0 < s < 1e6 for s in scales):
        raise VqldmError(f"the latents of {u.checkpoints.vqvae_path} have zero or non-finite spread (scale "
                         f"{scales}); is the stage-1 model trained?")
    return norm


def _val_labels(labels: ClassLabels | None, tiles) -> dict:
    """The validation tiles' classes and covariates (each tile's volume's), as TensorDictDataset columns."""
    return {} if labels is None else labels.val_columns([tile[0] for tile in tiles.tiles])


def _val_coarse(cfg: Config, tiles, norm, stride: int) -> dict:
    """Coarse-to-fine: the validation tiles' coarse views (block means), as a TensorDictDataset column."""
    if not cfg.diffusion.coarse_condition:
        return {}
    return {"coarse": L.block_means(L.real_tiles(tiles, norm, len(tiles)), stride)}


def _conditions(cfg: Config, train_info, val_info) -> ClassLabels | None:
    """Every file's class and covariates, checked before any compute; None: no labels."""
    u = cfg.diffusion
    labels = dataset_labels(cfg, train_info.files, val_info.files, list(u.covariates))
    if labels is not None and labels.classes:
        log.info("class-conditional UNet: %d classes (%s), condition_drop_prob %g", len(labels.classes),
                 ", ".join(labels.classes), u.condition_drop_prob)
    if labels is not None and labels.covariates:
        log.info("covariates as cross-attention context: %s", ", ".join(
            f"{k} in [{lo:g}, {hi:g}]" for k, (lo, hi) in labels.covariates.items()))
    return labels


def _condition_meta(cfg: Config, labels: ClassLabels | None, stride: int) -> dict:
    """What the checkpoint records of the conditions: class names, covariate ranges, the coarse view."""
    meta = {} if labels is None else labels.record()
    if cfg.diffusion.coarse_condition:
        meta["coarse_condition"] = {"stride": stride, "view": cfg.diffusion.coarse_view}
        log.info("coarse-to-fine UNet: conditioned on the %s view of block means over %d^3 voxels, "
                 "condition_drop_prob %g", cfg.diffusion.coarse_view, stride, cfg.diffusion.condition_drop_prob)
    return meta


def build_diffusion_trainer(cfg: Config, overwrite: bool = False, progress: bool = True) -> Trainer:
    """Everything ``train_diffusion`` runs, ready to ``fit()`` (under torchrun: this rank's share)."""
    setup.start(cfg)
    rt = make_runtime(cfg)
    vqvae, vq_ckpt, lat_spatial = _stage1(cfg, rt)
    net = vq_ckpt["network"]
    lat_shape = [net["embedding_dim"]] + lat_spatial
    train_info, val_info = setup.scan_data(cfg, progress)
    labels = _conditions(cfg, train_info, val_info)
    norm = L.stage1_normalization(cfg, vq_ckpt)
    sc = scheduler_config(cfg)
    val_z, tiles = L.encoded_tiles(cfg, "diffusion", val_info.files, norm, vqvae, rt)
    noise, t = _fixed_noise(len(val_z), lat_shape, sc["num_train_timesteps"], cfg.seed + 1)
    stride = total_stride(net)
    val_ds = L.TensorDictDataset(latent=val_z, noise=noise, t=t, **_val_labels(labels, tiles),
                                 **_val_coarse(cfg, tiles, norm, stride))
    vis_real = L.real_tiles(tiles, norm, cfg.diffusion.logging.num_visualize_samples)
    train_ds, use_cache = L.train_items(cfg, "diffusion", train_info.files, norm, vqvae, rt, lat_spatial,
                                        stride, progress, latent_cache=cfg.diffusion.latent_cache,
                                        coarse=cfg.diffusion.coarse_condition)
    if labels is not None:
        train_ds = LabelledDataset(train_ds, labels.train, labels.train_values)
    train_loader, sampler = setup.train_loader(cfg, "diffusion", train_ds, rt)
    val_loader = setup.val_loader(cfg, "diffusion", val_ds, rt)
    norm = _latent_norm(cfg, train_ds, train_loader, sampler, use_cache, vqvae, rt)
    meta = {**L.stage1_meta(cfg, "diffusion", vq_ckpt, train_info.grid, lat_shape, use_cache),
            **_condition_meta(cfg, labels, stride)}
    net_config = unet_net_config(cfg, len(labels.classes) if labels else 0, len(labels.covariates) if labels else 0)
    task = DiffusionTask(cfg, rt, vqvae, net_config, sc, norm, meta, vis_real)
    task.train_forward = setup.wrap_for_training(task.model, rt)
    bs, world = cfg.batch_size("diffusion"), dist.world_size()
    log.info("stage 2: latent %s, batch %d per rank x %d rank(s) = effective batch %d, lr %g%s, %s scheduler",
             lat_shape, bs, world, bs * world, cfg.learning_rate("diffusion"),
             " (not scaled with the number of ranks)" if world > 1 else "", sc["type"])
    return Trainer(cfg, task, train_loader, val_loader, rt, overwrite=overwrite, progress=progress,
                   train_sampler=sampler)


def train_diffusion(cfg: Config, overwrite: bool = False, progress: bool = True) -> FitResult:
    return build_diffusion_trainer(cfg, overwrite, progress).fit()
