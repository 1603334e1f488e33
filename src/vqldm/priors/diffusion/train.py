"""``vqldm train-diffusion``: the frozen stage 1, latents (cached or on the fly), the diffusion task."""

from __future__ import annotations

import logging
import math

import torch

from vqldm import distributed as dist
from vqldm import latents as L
from vqldm.checkpoint import file_sha256, load_checkpoint
from vqldm.config import Config, check_latent_for_unet, latent_spatial, vqvae_from_network
from vqldm.data import pipeline
from vqldm.engine import setup
from vqldm.engine.trainer import FitResult, Trainer
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
    """The frozen VQ-VAE, its checkpoint, and the latent's spatial size for the patch."""
    u = cfg.diffusion
    vq_path = u.checkpoints.vqvae_path
    if not vq_path:
        raise VqldmError("diffusion.checkpoints.vqvae_path: no stage-1 checkpoint given")
    vqvae, vq_ckpt = L.load_vqvae(vq_path, rt, what="diffusion.checkpoints.vqvae_path")
    net = vq_ckpt["network"]
    L.warn_config_differs(cfg, net, vq_path)
    if net["embedding_dim"] != u.in_channels or net["embedding_dim"] != u.out_channels:
        raise VqldmError(f"diffusion.in_channels/out_channels ({u.in_channels}/{u.out_channels}) must equal the "
                         f"stage-1 checkpoint's embedding_dim ({net['embedding_dim']}) from {vq_path}")
    lat_spatial = latent_spatial(vqvae_from_network(net), cfg.data.patch_size)
    check_latent_for_unet(len(u.num_channels), lat_spatial, "diffusion.num_channels / data.patch_size")
    return vqvae, vq_ckpt, lat_spatial


def _val_set(cfg: Config, files, norm, vqvae, rt: Runtime, lat_shape: list[int], sc: dict):
    """Validation latents of deterministic tiles with fixed noise and timesteps; the real MIP rows."""
    val_tiles = pipeline.val_dataset(cfg, files, norm)
    vloader = pipeline.make_loader(val_tiles, cfg.batch_size("diffusion"), False, 0, rt.is_cuda)
    val_z = torch.cat([L.encode(vqvae, b["image"], rt).cpu() for b in vloader])
    noise, t = _fixed_noise(len(val_z), lat_shape, sc["num_train_timesteps"], cfg.seed + 1)
    n_vis = cfg.diffusion.logging.num_visualize_samples
    vis_real = None
    if n_vis:
        vis_real = norm.to_unit(torch.stack([val_tiles[i]["image"] for i in range(min(n_vis, len(val_tiles)))]))
        vis_real = vis_real.clamp(0, 1)
    return L.TensorDictDataset(latent=val_z, noise=noise, t=t), vis_real


def _train_set(cfg: Config, files, norm, vqvae, rt: Runtime, lat_spatial: list[int], stride: int, progress: bool):
    """Training items: cached whole-volume latents where an item's encoding cannot change between
    epochs, else image patches encoded on the fly. Returns (dataset, whether it is the cache)."""
    use_cache = cfg.diffusion.latent_cache and not cfg.data.augmentation
    if use_cache:
        vols = pipeline.val_dataset(cfg, files, norm).volumes  # deterministic load/normalise/pad
        if any(math.prod(vols[i]["image"].shape[1:]) > L.MAX_CACHE_VOXELS for i in range(len(vols))):
            use_cache = False
            log.info("latent cache: volumes above %d voxels; encoding on the fly instead", L.MAX_CACHE_VOXELS)
    if not use_cache:
        why = "data.augmentation is on" if cfg.data.augmentation else "diffusion.latent_cache is off"
        log.info("latents encoded on the fly each batch (%s)", why)
        return pipeline.train_dataset(cfg, files, norm=norm), False
    cached = L.encode_volumes(vqvae, vols, rt, stride, progress and dist.is_main())
    masks = L.foreground_masks(vols, cached, norm.intensity_range, cfg.data.foreground_threshold, stride)
    log.info("latent cache: encoded %d training volumes once; training on cached latents", len(cached))
    return L.LatentCropDataset(cached, lat_spatial, cfg.data.patches_per_volume, masks,
                               cfg.data.foreground_crop_ratio), True


def _scale_factor(cfg: Config, train_ds, train_loader, sampler, use_cache: bool, vqvae, rt: Runtime) -> float:
    """The config's scale factor, the resumed run's, or 1/std measured (on rank 0, then broadcast)."""
    u = cfg.diffusion
    resume = u.checkpoints.resume_from
    if u.scale_factor is not None:
        scale = float(u.scale_factor)
        log.info("scale_factor %.5g (from diffusion.scale_factor)", scale)
    elif resume:
        # the UNet being resumed learned latents at this scale: keep it, whatever the data or ranks now
        scale = float(load_checkpoint(resume, kind="diffusion", what="diffusion.checkpoints.resume_from")
                      ["scale_factor"])
        log.info("scale_factor %.5g (from the resumed checkpoint %s)", scale, resume)
    else:
        getter = (lambda b: b["latent"].float()) if use_cache else (lambda b: L.encode(vqvae, b["image"], rt))
        # rank 0 reads the whole training set, not its shard: the same batches, hence the same value, as
        # one process with this seed, for any number of ranks
        measure = train_loader if sampler is None else pipeline.make_loader(
            train_ds, cfg.batch_size("diffusion"), True, cfg.data.num_workers, rt.is_cuda)
        scale = L.measure_scale_factor(measure, getter, u.scale_factor_batches)
        log.info("scale_factor %.5g = 1/std of latents over up to %d training batches", scale, u.scale_factor_batches)
    if not (math.isfinite(scale) and scale > 0):
        raise VqldmError(f"the latents of {u.checkpoints.vqvae_path} have zero or non-finite spread (scale_factor "
                         f"{scale}); is the stage-1 model trained?")
    return scale


def build_diffusion_trainer(cfg: Config, overwrite: bool = False, progress: bool = True) -> Trainer:
    """Everything ``train_diffusion`` runs, ready to ``fit()`` (under torchrun: this rank's share)."""
    setup.start(cfg)
    rt = make_runtime(cfg)
    vqvae, vq_ckpt, lat_spatial = _stage1(cfg, rt)
    net, vq_path = vq_ckpt["network"], cfg.diffusion.checkpoints.vqvae_path
    lat_shape = [net["embedding_dim"]] + lat_spatial
    train_info, val_info = setup.scan_data(cfg, progress)
    norm_d = vq_ckpt["normalization"]
    if list(norm_d["intensity_range"]) != list(cfg.data.intensity_range):
        log.warning("data.intensity_range %s differs from the stage-1 checkpoint's %s; using the checkpoint's",
                    cfg.data.intensity_range, norm_d["intensity_range"])
    norm = pipeline.normalization_of(cfg, norm_d["intensity_range"])
    sc = scheduler_config(cfg)
    val_ds, vis_real = _val_set(cfg, val_info.files, norm, vqvae, rt, lat_shape, sc)
    train_ds, use_cache = _train_set(cfg, train_info.files, norm, vqvae, rt, lat_spatial, L.total_stride(net),
                                     progress)
    train_loader, sampler = setup.train_loader(cfg, "diffusion", train_ds, rt)
    val_loader = setup.val_loader(cfg, "diffusion", val_ds, rt)
    scale = _scale_factor(cfg, train_ds, train_loader, sampler, use_cache, vqvae, rt)
    vq_sha = file_sha256(vq_path) if dist.is_main() else ""
    meta = {
        "latent_shape": lat_shape,
        "vqvae_sha256": dist.broadcast_object(vq_sha),
        "vqvae_path": str(vq_path),
        "vqvae_network": net,
        "normalization": norm_d,
        "data": {"patch_size": list(cfg.data.patch_size), "spacing": list(train_info.spacing)},
        "latent_source": "cache" if use_cache else "on_the_fly",
    }
    task = DiffusionTask(cfg, rt, vqvae, unet_net_config(cfg), sc, scale, meta, vis_real)
    task.train_forward = setup.wrap_for_training(task.model, rt)
    bs, world = cfg.batch_size("diffusion"), dist.world_size()
    log.info("stage 2: latent %s, batch %d per rank x %d rank(s) = effective batch %d, lr %g%s, %s scheduler",
             lat_shape, bs, world, bs * world, cfg.learning_rate("diffusion"),
             " (not scaled with the number of ranks)" if world > 1 else "", sc["type"])
    return Trainer(cfg, task, train_loader, val_loader, rt, overwrite=overwrite, progress=progress,
                   train_sampler=sampler)


def train_diffusion(cfg: Config, overwrite: bool = False, progress: bool = True) -> FitResult:
    return build_diffusion_trainer(cfg, overwrite, progress).fit()
