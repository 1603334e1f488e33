"""``vqldm sample``: checkpoints -> noise -> latents -> volumes -> files.

Sample ``i``'s noise is drawn from its own generator seeded by ``(seed, i)``
(:class:`~vqldm.priors.diffusion.pipeline.DiffusionPipeline`), so which samples a run makes does
not depend on the batch size or on the number of ranks. Under torchrun whole batches
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
from vqldm.checkpoint import file_sha256
from vqldm.config import Config
from vqldm.data.io import list_volumes, read_volume, write_volume
from vqldm.errors import VqldmError
from vqldm.files import archive_previous, atomic_write_bytes
from vqldm.priors.diffusion.pipeline import DiffusionPipeline, load_pipeline
from vqldm.priors.transformer.pipeline import TokenPipeline, load_token_pipeline
from vqldm.sampling.samplers import check_sampler, default_sampler
from vqldm.smlm.grid import Grid
from vqldm.smlm.points import point_count, volume_to_points
from vqldm.smlm.tables import write_table
from vqldm.visuals import mip_grid, save_png

log = logging.getLogger("vqldm")


@dataclass
class SampleOptions:
    num_samples: int
    out_dir: Path
    scheduler: str | None = None  # a sampler of vqldm.sampling.samplers.SAMPLERS (default: by training objective)
    steps: int | None = None  # default: diffusion.logging.num_inference_steps
    seed: int = 0
    batch_size: int = 8
    fmt: str = "nifti"  # nifti | tiff | ome-tiff | points (FORMATS)
    diffusion_checkpoint: str | None = None
    vqvae_checkpoint: str | None = None
    shape: list[int] | None = None  # output volume size (voxels); default: the training patch
    snap: str | None = None  # "on" | "off" | None (config)
    use_ema: bool = True
    progress: bool = True
    overwrite: bool = False
    prior: str = "diffusion"  # diffusion | transformer
    prior_checkpoint: str | None = None  # transformer: default prior.checkpoints.output_dir/best_model.pt
    temperature: float | None = None  # transformer: default prior.temperature
    top_k: int | None = None  # transformer: default prior.top_k
    top_p: float | None = None  # transformer: default prior.top_p
    class_name: str | None = None  # class-conditional prior (either): the class to sample (None: unconditional)
    guidance: float = 1.0  # classifier-free guidance weight W (0: unconditional, 1: conditional)
    autoguidance: float | None = None  # diffusion: autoguidance weight (default: diffusion.autoguidance.weight)
    guide_checkpoint: str | None = None  # diffusion: the guide (default: the one the checkpoint's run kept)
    cond_volume: str | None = None  # diffusion, coarse-to-fine UNet: the volume whose coarse view samples match
    cond: dict | None = None  # a prior (either) with covariates: {name: value} (--cond KEY=VALUE)


# --format -> file suffix; "points" writes NIfTI volumes and a localisation table (CSV, nm) beside each
FORMATS = {"nifti": "nii.gz", "tiff": "tif", "ome-tiff": "ome.tif", "points": "nii.gz"}


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


def sampling_settings(cfg: Config, opts: SampleOptions, pipe: DiffusionPipeline) -> tuple[str, int, bool]:
    """The sampler, step count and snap of this run, each checked against the model."""
    sampler = opts.scheduler or default_sampler(pipe.schedule, cfg.diffusion.sampler)
    steps = cfg.diffusion.logging.num_inference_steps if opts.steps is None else opts.steps
    if not 1 <= steps <= pipe.schedule["num_train_timesteps"]:
        raise VqldmError(f"--steps {steps}: must lie in [1, {pipe.schedule['num_train_timesteps']}]")
    check_sampler(sampler, pipe.schedule)
    snap = cfg.diffusion.snap_to_codebook if opts.snap is None else opts.snap == "on"
    return sampler, steps, snap


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Rank 0 decides about the folder; every rank stops on its verdict (none waits for a rank that
    gave up), and no rank writes before rank 0 has made the folder."""
    problem = None
    if dist.is_main():
        existing = [p for p in list_volumes(out) if p.name.startswith("sample_")]
        if existing and not overwrite:
            problem = (f"--out {out}: already holds {len(existing)} sample file(s); choose another folder "
                       f"or pass --overwrite")
        else:
            if existing:  # --overwrite: the earlier samples move aside whole, never mixed with new ones
                moved = archive_previous(out, ("sample_*", "preview.png", "samples.json"))
                log.info("moved the earlier samples to %s", moved)
            out.mkdir(parents=True, exist_ok=True)
    problem = dist.broadcast_object(problem)
    if problem:
        raise VqldmError(problem)


def _my_share(opts: SampleOptions) -> list[int]:
    mine = shard_indices(opts.num_samples, opts.batch_size, dist.rank(), dist.world_size())
    if dist.world_size() > 1:
        log.info("%d samples in batches of %d over %d ranks (rank 0: %d)", opts.num_samples, opts.batch_size,
                 dist.world_size(), len(mine))
        n_batches = -(-opts.num_samples // opts.batch_size)
        if n_batches < dist.world_size():
            log.warning("%d batch(es) of %d for %d ranks: %d rank(s) have nothing to do; a smaller --batch-size "
                        "spreads the work", n_batches, opts.batch_size, dist.world_size(),
                        dist.world_size() - n_batches)
    return mine


def _diffusion_run(cfg: Config, opts: SampleOptions):
    """The diffusion prior: its pipeline, a function of the sample indices, and what samples.json records."""
    pipe = load_pipeline(cfg, opts.diffusion_checkpoint, opts.vqvae_checkpoint, opts.use_ema)
    pipe.set_conditions(opts.class_name, opts.guidance, opts.cond, opts.cond_volume)
    ag = cfg.diffusion.autoguidance
    pipe.set_autoguidance(ag.weight if opts.autoguidance is None else opts.autoguidance, ag.min_timestep,
                          opts.guide_checkpoint, ag.rescale)
    sampler, steps, snap = sampling_settings(cfg, opts, pipe)
    clip = cfg.diffusion.clip_to_codebook_range

    def run(mine: list[int]) -> torch.Tensor:
        return pipe.generate(mine, opts.seed, steps, sampler, opts.batch_size, snap, opts.shape,
                             opts.progress and dist.is_main(), clip, cfg.diffusion.sampling_margin)

    record = {"prior": "diffusion", "scheduler": sampler, "steps": steps, "snap_to_codebook": snap,
              "clip_to_codebook_range": clip and sampler != "rflow", "ema": opts.use_ema and bool(pipe.diff_ckpt.get("ema")),
              "diffusion_checkpoint": str(pipe.diff_path), "diffusion_sha256": file_sha256(pipe.diff_path),
              "scale_factor": pipe.scale_factor, "latent_norm": "global" if pipe.norm.shift is None else "channel",
              "intensity_calibration": bool(pipe.vq_ckpt.get("intensity_calibration")),
              "autoguidance": pipe.autoguidance_record(),
              "self_condition": None if pipe.self_condition is None else pipe.self_condition.to_meta(),
              "sampling_margin": pipe.margin(cfg.diffusion.sampling_margin),
              **_class_record(pipe, opts), **_coarse_record(pipe, opts)}
    return pipe, run, record


def _coarse_record(pipe: DiffusionPipeline, opts: SampleOptions) -> dict:
    """samples.json's coarse condition: the volume every sample matches when downsampled (coarse-to-fine)."""
    if not pipe.coarse_stride:
        return {}
    path = pipe.coarse_path
    return {"coarse_condition": None if path is None else {
        "volume": str(path), "sha256": file_sha256(path), "stride": pipe.coarse_stride, "view": pipe.coarse_view,
        "guidance": opts.guidance}}


def _class_record(pipe: DiffusionPipeline | TokenPipeline, opts: SampleOptions) -> dict:
    """samples.json's conditions: every sample's class, covariates and guidance weight (a conditional model of
    either prior only), and the model's classes and covariates' training ranges."""
    ranges = getattr(pipe, "covariates", None)
    if not pipe.classes and not ranges:
        return {}
    rec = {"classes": list(pipe.classes), "class": opts.class_name} if pipe.classes else {}
    each = {"class": opts.class_name} if pipe.classes else {}
    if ranges:
        rec["covariates"] = {"asked": dict(opts.cond or {}), "training_range": ranges}
        each["covariates"] = dict(opts.cond or {})
    return {**rec, "guidance": opts.guidance,
            "conditions": {f"sample_{i:04d}": {**each, "guidance": opts.guidance} for i in range(opts.num_samples)}}


def token_settings(cfg: Config, opts: SampleOptions) -> dict:
    """The token prior's temperature, top_k and top_p for this run (the options, else the config), checked."""
    p = cfg.prior
    knobs = {"temperature": p.temperature if opts.temperature is None else opts.temperature,
             "top_k": p.top_k if opts.top_k is None else opts.top_k,
             "top_p": p.top_p if opts.top_p is None else opts.top_p}
    if not knobs["temperature"] > 0:
        raise VqldmError(f"--temperature {knobs['temperature']}: must be > 0")
    if knobs["top_k"] is not None and knobs["top_k"] < 1:
        raise VqldmError(f"--top-k {knobs['top_k']}: must be >= 1")
    if knobs["top_p"] is not None and not 0 < knobs["top_p"] <= 1:
        raise VqldmError(f"--top-p {knobs['top_p']}: must lie in (0, 1]")
    return knobs


def _token_run(cfg: Config, opts: SampleOptions):
    """The token prior: its pipeline, a function of the sample indices, and what samples.json records."""
    if opts.shape is not None:
        raise VqldmError("--shape: the token prior samples the code grid it was trained on; omit --shape")
    if opts.scheduler is not None or opts.steps is not None or opts.snap is not None:
        raise VqldmError("--scheduler, --steps and --snap are diffusion sampling options; the token prior takes "
                         "--temperature, --top-k and --top-p")
    if opts.cond_volume is not None:
        raise VqldmError("--cond-volume: coarse-to-fine is the diffusion prior's (diffusion.coarse_condition)")
    if opts.autoguidance is not None or opts.guide_checkpoint is not None:
        raise VqldmError("--autoguidance and --guide-checkpoint: autoguidance steers the diffusion prior; the token "
                         "prior takes --temperature, --top-k and --top-p")
    knobs = token_settings(cfg, opts)
    pipe = load_token_pipeline(cfg, opts.prior_checkpoint, opts.vqvae_checkpoint, opts.use_ema)
    pipe.set_conditions(opts.class_name, opts.guidance, opts.cond)

    def run(mine: list[int]) -> torch.Tensor:
        return pipe.generate(mine, opts.seed, opts.batch_size, progress=opts.progress and dist.is_main(), **knobs)

    record = {"prior": "transformer", **knobs, "ordering": pipe.ckpt["ordering"]["type"],
              "intensity_calibration": bool(pipe.vq_ckpt.get("intensity_calibration")),
              "ema": opts.use_ema and bool(pipe.ckpt.get("ema")), "prior_checkpoint": str(pipe.path),
              "prior_sha256": file_sha256(pipe.path), **_class_record(pipe, opts),
              **({"covariate_bins": pipe.vocab.bins} if pipe.covariates else {})}
    return pipe, run, record


def sample_to_files(cfg: Config, opts: SampleOptions) -> dict:
    if opts.num_samples < 1:
        raise VqldmError("--num-samples must be >= 1")
    if opts.batch_size < 1:
        raise VqldmError("--batch-size must be >= 1")
    if opts.prior not in ("diffusion", "transformer"):
        raise VqldmError(f"--prior {opts.prior}: choose diffusion or transformer")
    if opts.fmt not in FORMATS:
        raise VqldmError(f"--format {opts.fmt}: choose {', '.join(FORMATS)}")
    dist.init(cfg.device.use_cuda)
    pipe, run, prior_record = (_token_run if opts.prior == "transformer" else _diffusion_run)(cfg, opts)
    if opts.fmt == "points" and not pipe.vq_ckpt.get("data", {}).get("smlm"):
        raise VqldmError(f"--format points: the stage-1 checkpoint {pipe.vq_path} records no localisation grid or "
                         f"density (it was not trained on a `vqldm voxelize` data set with data.normalize fixed, "
                         f"which keeps the density); write volumes and use "
                         f"`vqldm points --info DATASET_INFO.json`")
    suffix = FORMATS[opts.fmt]
    out = Path(opts.out_dir)
    _prepare_out(out, opts.overwrite)
    mine = _my_share(opts)
    t0 = time.perf_counter()
    vols = run(mine)
    if pipe.rt.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    grid = pipe.voxel_grid  # the training data's voxel size and unit (and NIfTI affine), from the checkpoints
    for i, v in zip(mine, vols):
        write_volume(out / f"sample_{i:04d}.{suffix}", v[0].numpy(), grid.spacing, grid.unit, grid.affine)
    smlm = _write_points(out, mine, vols, pipe.vq_ckpt, opts.seed) if opts.fmt == "points" else None
    # the slowest rank's time; the barrier inside also means every file is written before rank 0 reads
    elapsed = float(dist.all_reduce_max(torch.tensor([elapsed], dtype=torch.float64)).item())
    record = {
        "vqldm_version": __version__, "num_samples": opts.num_samples, "seed": opts.seed, **prior_record,
        "shape": list(vols.shape[2:]) if len(vols) else opts.shape, "spacing": list(grid.spacing),
        "spacing_unit": grid.unit, "format": opts.fmt, **({"smlm": smlm} if smlm else {}),
        "vqvae_checkpoint": str(pipe.vq_path), "vqvae_sha256": pipe.vq_sha256,
        "device": pipe.rt.describe(), "world_size": dist.world_size(), "seconds": elapsed,
    }
    preview, record_path = out / "preview.png", out / "samples.json"
    if dist.is_main():
        shown = [read_volume(out / f"sample_{i:04d}.{suffix}").array for i in range(min(opts.num_samples, 16))]
        save_png(mip_grid([shown[i:i + 4] for i in range(0, len(shown), 4)]), preview)
        atomic_write_bytes(record_path, json.dumps(record, indent=2).encode("utf-8"))
    return {"num_samples": opts.num_samples, "suffix": suffix, "preview": preview, "record": record_path,
            "seconds": elapsed, "device": record["device"]}


def _write_points(out: Path, mine: list[int], vols: torch.Tensor, vq_ckpt: dict, seed: int) -> dict:
    """``sample_i.csv`` beside each volume: localisations at the training data's density (x [nm],y [nm],z [nm])."""
    smlm = vq_ckpt["data"]["smlm"]
    g = Grid.from_dict(smlm["grid"], "the stage-1 checkpoint's data.smlm")
    for i, v in zip(mine, vols):
        vol = v[0].numpy()
        rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(i),)))
        n = point_count(vol, smlm["counts_per_intensity"])
        pts = volume_to_points(vol, Grid(g.origin_nm, g.voxel_nm, vol.shape), n, rng)
        write_table(out / f"sample_{i:04d}.csv", pts)
    return smlm


def read_samples(folder: Path) -> list[np.ndarray]:
    files = list_volumes(folder)
    if not files:
        raise VqldmError(f"--samples: no volumes in {folder}")
    return [read_volume(f).array for f in files]
