"""``vqldm sample``: checkpoints -> noise -> latents -> volumes -> files.

Sample ``i``'s noise is drawn from its own generator seeded by ``(seed, i)``, so which samples a
run makes does not depend on the batch size or on the number of ranks. Under torchrun whole batches
are dealt out to the ranks (:func:`shard_indices`), so the files are the same as one process
writes with the same ``--batch-size``; rank 0 alone writes ``preview.png`` and ``samples.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vqldm import __version__
from vqldm import distributed as dist
from vqldm.checkpoint import file_sha256, load_checkpoint
from vqldm.config import Config, check_latent_for_unet, decoded_spatial, latent_spatial, vqvae_from_network
from vqldm.data.io import archive_previous, list_volumes, write_volume
from vqldm.data.pipeline import to_unit
from vqldm.errors import VqldmError
from vqldm.generate.samplers import sample_latents
from vqldm.runtime import Runtime, make_runtime
from vqldm.stage1.model import codebook_range, load_vqvae, snap_to_codebook
from vqldm.stage2.model import build_unet, default_sampler
from vqldm.visuals import mip_grid, save_png

log = logging.getLogger("vqldm")


@dataclass
class SampleOptions:
    num_samples: int
    out_dir: Path
    scheduler: str | None = None  # ddpm | ddim | rflow (default: by training objective)
    steps: int | None = None  # default: diffusion.logging.num_inference_steps
    seed: int = 0
    batch_size: int = 8
    fmt: str = "nifti"  # nifti | tiff
    diffusion_checkpoint: str | None = None
    vqvae_checkpoint: str | None = None
    shape: list[int] | None = None  # output volume size (voxels); default: the training patch
    snap: str | None = None  # "on" | "off" | None (config)
    use_ema: bool = True
    progress: bool = True
    overwrite: bool = False


@dataclass
class Generator:
    """Both networks, rebuilt from their checkpoints alone, ready to turn noise into volumes."""

    unet: torch.nn.Module
    vqvae: torch.nn.Module
    diff_ckpt: dict
    vq_ckpt: dict
    rt: Runtime
    diff_path: Path
    vq_path: Path
    vq_sha256: str | None = None  # of the stage-1 file actually loaded
    _denoise: object = None  # the (possibly CUDA-graph-compiled) UNet call, built once

    @property
    def scale_factor(self) -> float:
        return float(self.diff_ckpt["scale_factor"])

    @property
    def scheduler_cfg(self) -> dict:
        return self.diff_ckpt["scheduler"]

    def latent_shape(self, shape: list[int] | None) -> list[int]:
        net = self.vq_ckpt["network"]
        if shape is None:
            return list(self.diff_ckpt["latent_shape"])
        vq = vqvae_from_network(net)
        lat = latent_spatial(vq, shape)
        if decoded_spatial(vq, lat) != list(shape):
            raise VqldmError(f"--shape {shape}: the VQ-VAE cannot decode to that size (latent {lat}); use sizes "
                             f"divisible by its total stride")
        check_latent_for_unet(len(self.diff_ckpt["network"]["channels"]), lat, f"--shape {shape}")
        return [net["embedding_dim"]] + lat

    def noise(self, indices: list[int], seed: int, latent_shape: list[int]) -> torch.Tensor:
        out = []
        for i in indices:
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i))
            out.append(torch.randn(latent_shape, generator=g))
        return torch.stack(out).to(self.rt.device)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, snap: bool) -> torch.Tensor:
        """Scaled latent -> volumes in [0, 1], (B, 1, X, Y, Z) float32 on CPU."""
        z = z / self.scale_factor
        if snap:
            z = snap_to_codebook(self.vqvae, z)
        with self.rt.autocast():
            img = self.vqvae.decode(z)
        return to_unit(img.float(), self.vq_ckpt["normalization"]["intensity_range"]).clamp(0, 1).cpu()


def load_generator(cfg: Config, diffusion_checkpoint: str | None = None, vqvae_checkpoint: str | None = None,
                   use_ema: bool = True, rt: Runtime | None = None) -> Generator:
    rt = rt or make_runtime(cfg)
    if diffusion_checkpoint:
        diff_path, what = Path(diffusion_checkpoint), "--diffusion-checkpoint"
    else:
        diff_path, what = Path(cfg.diffusion.checkpoints.output_dir) / "best_model.pt", "diffusion.checkpoints.output_dir"
    ckpt = load_checkpoint(diff_path, kind="stage2", what=what)
    state = ckpt["state_dict"]
    if not use_ema and ckpt.get("ema"):
        ts = ckpt.get("training_state")
        if ts is None:
            raise VqldmError(f"--no-ema: {diff_path} holds only the EMA weights; the raw weights are in "
                             f"latest_checkpoint.pt (pass it with --diffusion-checkpoint)")
        state = ts["model"]
    try:
        unet = build_unet(ckpt["network"], flash_attention=rt.is_cuda)
        unet.load_state_dict(state)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise VqldmError(f"{what}: {diff_path} does not hold a loadable diffusion UNet "
                         f"({str(e).splitlines()[0][:200]})") from None
    unet = rt.prepare_module(unet).eval()
    for p in unet.parameters():
        p.requires_grad_(False)

    if vqvae_checkpoint:
        vq_path, vq_what = Path(vqvae_checkpoint), "--vqvae-checkpoint"
    else:
        vq_path, vq_what = Path(ckpt["vqvae_path"]), f"the stage-1 checkpoint recorded in {diff_path}"
    vqvae, vq_ckpt = load_vqvae(vq_path, rt, what=vq_what)
    sha = file_sha256(vq_path)
    if sha != ckpt.get("vqvae_sha256"):
        msg = (f"{vq_path} is not the stage-1 checkpoint that {diff_path} was trained on "
               f"(sha256 {sha[:12]} vs {str(ckpt.get('vqvae_sha256'))[:12]})")
        if not vqvae_checkpoint:
            raise VqldmError(msg + "; pass the right one with --vqvae-checkpoint")
        log.warning("%s; decoding with it anyway as --vqvae-checkpoint asks", msg)
    if vq_ckpt["network"]["embedding_dim"] != ckpt["network"]["in_channels"]:
        raise VqldmError(f"{vq_what}: {vq_path} has embedding_dim {vq_ckpt['network']['embedding_dim']} but the "
                         f"diffusion UNet expects {ckpt['network']['in_channels']} channels")
    return Generator(unet, vqvae, ckpt, vq_ckpt, rt, diff_path, vq_path, vq_sha256=sha)


def _denoiser(gen: Generator):
    """The UNet call, built once: compiled where ``device.compile`` is on, replayed from a CUDA graph
    (one per batch shape) where ``device.cuda_graphs`` is on."""
    if gen._denoise is None:
        net = gen.unet
        if gen.rt.compile:
            net = torch.compile(net, dynamic=False)

        def call(x, t):
            return net(x=x, timesteps=t)

        if gen.rt.cuda_graphs:
            from vqldm.engine.graphs import CudaGraphed

            graphed = CudaGraphed(lambda b: call(b["x"], b["t"]), gen.rt.device, warmup=2, name="UNet sampling call")
            gen._denoise = lambda x, t: graphed({"x": x, "t": t})
        else:
            gen._denoise = call
    return gen._denoise


def shard_indices(num_samples: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The sample indices one rank generates under torchrun.

    Samples are cut into the batches one process would run (``[0, batch_size)``, ``[batch_size,
    2 batch_size)``, ...) and whole batches are dealt out round-robin: batch ``b`` goes to rank
    ``b % world``. Every batch therefore holds the same samples as in a single process with the
    same ``batch_size``, so the files are bit-identical to that run on the same hardware, even for
    DDPM (its step noise is seeded per batch) and although a convolution's rounding depends on the
    batch it runs in.
    """
    starts = range(0, num_samples, batch_size)
    return [i for b, s in enumerate(starts) if b % world == rank for i in range(s, min(s + batch_size, num_samples))]


def generate(gen: Generator, indices: list[int], seed: int, steps: int, kind: str, batch_size: int,
             snap: bool, shape: list[int] | None = None, progress: bool = False, clip: bool = True) -> torch.Tensor:
    """Volumes (N, 1, X, Y, Z) in [0, 1] for sample ``indices``; batches the UNet."""
    lat = gen.latent_shape(shape)
    clip_range = codebook_range(gen.vqvae, gen.scale_factor) if clip else None
    denoise = _denoiser(gen)
    outs = []
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    for b, idx in enumerate(batches):
        noise = gen.noise(idx, seed, lat)
        # DDPM steps draw fresh noise from the global RNG: seed it per batch for repeatability
        torch.manual_seed(int(seed) * 7919 + idx[0])
        z = sample_latents(denoise, gen.scheduler_cfg, noise, steps, kind=kind,
                           progress=progress and dist.is_main(), autocast=gen.rt.autocast, clip_range=clip_range)
        outs.append(gen.decode(z, snap))
    return torch.cat(outs) if outs else torch.zeros([0, 1] + (shape or []))


def sample_to_files(cfg: Config, opts: SampleOptions) -> dict:
    if opts.num_samples < 1:
        raise VqldmError("--num-samples must be >= 1")
    if opts.batch_size < 1:
        raise VqldmError("--batch-size must be >= 1")
    dist.init(cfg.device.use_cuda)
    gen = load_generator(cfg, opts.diffusion_checkpoint, opts.vqvae_checkpoint, opts.use_ema)
    kind = opts.scheduler or default_sampler(gen.scheduler_cfg)
    steps = cfg.diffusion.logging.num_inference_steps if opts.steps is None else opts.steps
    if not 1 <= steps <= gen.scheduler_cfg["num_train_timesteps"]:
        raise VqldmError(f"--steps {steps}: must lie in [1, {gen.scheduler_cfg['num_train_timesteps']}]")
    if (kind == "rflow") != (gen.scheduler_cfg["type"] == "rflow"):
        raise VqldmError(f"--scheduler {kind}: the model was trained with the {gen.scheduler_cfg['type']} objective; "
                         f"use {'rflow' if gen.scheduler_cfg['type'] == 'rflow' else 'ddpm or ddim'}")
    snap = cfg.diffusion.snap_to_codebook if opts.snap is None else opts.snap == "on"
    suffix = "nii.gz" if opts.fmt == "nifti" else "tif"
    out = Path(opts.out_dir)
    problem = None
    if dist.is_main():
        existing = [p for p in list_volumes(out) if p.name.startswith("sample_")]
        if existing and not opts.overwrite:
            problem = (f"--out {out}: already holds {len(existing)} sample file(s); choose another folder "
                       f"or pass --overwrite")
        else:
            if existing:  # --overwrite: the earlier samples move aside whole, never mixed with new ones
                moved = archive_previous(out, ("sample_*", "preview.png", "samples.json"))
                log.info("moved the earlier samples to %s", moved)
            out.mkdir(parents=True, exist_ok=True)
    # every rank stops on rank 0's verdict (none waits for a rank that gave up), and no rank writes
    # before rank 0 has made the folder
    problem = dist.broadcast_object(problem)
    if problem:
        raise VqldmError(problem)
    mine = shard_indices(opts.num_samples, opts.batch_size, dist.rank(), dist.world_size())
    if dist.world_size() > 1:
        log.info("%d samples in batches of %d over %d ranks (rank 0: %d)", opts.num_samples, opts.batch_size,
                 dist.world_size(), len(mine))
        n_batches = -(-opts.num_samples // opts.batch_size)
        if n_batches < dist.world_size():
            log.warning("%d batch(es) of %d for %d ranks: %d rank(s) have nothing to do; a smaller --batch-size "
                        "spreads the work", n_batches, opts.batch_size, dist.world_size(),
                        dist.world_size() - n_batches)
    t0 = time.perf_counter()
    clip = cfg.diffusion.clip_to_codebook_range
    vols = generate(gen, mine, opts.seed, steps, kind, opts.batch_size, snap, opts.shape, opts.progress, clip)
    if gen.rt.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    spacing = gen.diff_ckpt.get("data", {}).get("spacing") or gen.vq_ckpt["data"]["spacing"]
    for i, v in zip(mine, vols):
        write_volume(out / f"sample_{i:04d}.{suffix}", v[0].numpy(), spacing)
    # the slowest rank's time; the barrier inside also means every file is written before rank 0 reads
    elapsed = float(dist.all_reduce_max(torch.tensor([elapsed], dtype=torch.float64)).item())
    record = {
        "vqldm_version": __version__, "num_samples": opts.num_samples, "seed": opts.seed, "scheduler": kind,
        "steps": steps, "snap_to_codebook": snap, "clip_to_codebook_range": clip and kind != "rflow", "ema": opts.use_ema and bool(gen.diff_ckpt.get("ema")),
        "shape": list(vols.shape[2:]) if len(vols) else opts.shape, "spacing": list(spacing), "format": opts.fmt,
        "diffusion_checkpoint": str(gen.diff_path), "diffusion_sha256": file_sha256(gen.diff_path),
        "vqvae_checkpoint": str(gen.vq_path), "vqvae_sha256": gen.vq_sha256,
        "scale_factor": gen.scale_factor, "device": gen.rt.describe(), "world_size": dist.world_size(),
        "seconds": elapsed,
    }
    preview = out / "preview.png"
    record_path = out / "samples.json"
    if dist.is_main():
        from vqldm.data.io import read_volume

        shown = [read_volume(out / f"sample_{i:04d}.{suffix}").array for i in range(min(opts.num_samples, 16))]
        rows = [shown[i:i + 4] for i in range(0, len(shown), 4)]
        save_png(mip_grid(rows), preview)
        record_path.write_text(json.dumps(record, indent=2))
    return {"num_samples": opts.num_samples, "suffix": suffix, "preview": preview, "record": record_path,
            "seconds": elapsed}


def read_samples(folder: Path) -> list[np.ndarray]:
    from vqldm.data.io import read_volume

    files = list_volumes(folder)
    if not files:
        raise VqldmError(f"--samples: no volumes in {folder}")
    return [read_volume(f).array for f in files]
