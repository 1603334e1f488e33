"""``vqldm export-bundle``: a trained pair as a MONAI bundle that samples with MONAI alone.

The bundle holds ``configs/metadata.json``, ``configs/inference.json`` and ``models/vqvae.pt`` /
``models/diffusion_unet.pt`` (plain state dicts). ``python -m monai.bundle run --config_file
configs/inference.json --meta_file configs/metadata.json --bundle_root DIR`` builds MONAI's own
``VQVAE``, ``DiffusionModelUNet``, ``DDIMScheduler`` and ``LatentDiffusionInferer`` and writes the
volumes ``vqldm sample --scheduler ddim`` writes for the same seed and steps (docs/bundle.md).

What vqldm's sampler adds to MONAI's loop is expressed in the bundle or refused:

* the global latent scale: the inferer's ``scale_factor``;
* snapping to the codebook: MONAI's ``VQVAE.decode_stage_2_outputs`` quantises before decoding, so
  the bundle always snaps (``diffusion.snap_to_codebook: false`` is refused);
* the clip of each predicted clean latent to the codebook's range: the DDIM scheduler's
  ``clip_sample_min`` / ``clip_sample_max`` (off where ``clip_to_codebook_range`` is off);
* network range -> [0, 1] and the clamp: a post-processing expression;
* per-channel latent normalisation, intensity calibration, self-conditioning and rectified-flow models
  have no MONAI counterpart here: refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from vqldm import __version__
from vqldm.config import Config
from vqldm.errors import VqldmError
from vqldm.files import archive_previous, atomic_write, atomic_write_bytes
from vqldm.priors.diffusion.pipeline import DiffusionPipeline, load_pipeline
from vqldm.runtime import make_runtime
from vqldm.sampling.samplers import schedule_kwargs

log = logging.getLogger("vqldm")

MODELS = {"vqvae": "models/vqvae.pt", "unet": "models/diffusion_unet.pt"}


def _refuse_what_monai_lacks(cfg: Config, pipe: DiffusionPipeline) -> None:
    path = pipe.diff_path
    if pipe.schedule["type"] != "ddpm":
        raise VqldmError(f"export-bundle: {path} was trained with the {pipe.schedule['type']} objective; the "
                         f"bundle samples with MONAI's DDIM scheduler, which needs a ddpm-trained model")
    if pipe.norm.shift is not None:
        raise VqldmError(f"export-bundle: {path} normalises the latent per channel (diffusion.latent_norm: channel); "
                         f"MONAI's LatentDiffusionInferer has one scale_factor, so only global models export")
    if pipe.vq_ckpt.get("intensity_calibration"):
        raise VqldmError(f"export-bundle: {pipe.vq_path} carries an intensity calibration "
                         f"(vqvae.intensity_calibration), which MONAI's decoder has no step for")
    if pipe.coarse_stride:
        raise VqldmError(f"export-bundle: {path} is a coarse-to-fine model (diffusion.coarse_condition); MONAI's "
                         f"LatentDiffusionInferer has no input for the coarse view, so only unconditional models "
                         f"export")
    if pipe.classes:
        raise VqldmError(f"export-bundle: {path} is class-conditional (classes {', '.join(pipe.classes)}); MONAI's "
                         f"LatentDiffusionInferer drops class labels, so only unconditional models export")
    if pipe.self_condition:
        raise VqldmError(f"export-bundle: {path} is self-conditioned (diffusion.self_condition); MONAI's "
                         f"LatentDiffusionInferer feeds the UNet no estimate of its own, so only plain models export")
    if pipe.covariates:
        raise VqldmError(f"export-bundle: {path} is conditioned on covariates ({', '.join(pipe.covariates)}); the "
                         f"bundle's sampler passes no cross-attention context, so only unconditional models export")
    if cfg.diffusion.autoguidance.weight != 1.0:
        raise VqldmError(f"export-bundle: diffusion.autoguidance.weight is {cfg.diffusion.autoguidance.weight:g}, but "
                         f"MONAI's LatentDiffusionInferer calls one UNet, so the bundle would sample without the "
                         f"guide; export with --set diffusion.autoguidance.weight=1")
    if any(cfg.diffusion.sampling_margin):
        raise VqldmError(f"export-bundle: diffusion.sampling_margin is {cfg.diffusion.sampling_margin}, but MONAI's "
                         f"LatentDiffusionInferer samples the patch's latent, so the bundle would sample without the "
                         f"margin; export with --set diffusion.sampling_margin=[0,0,0]")
    if not cfg.diffusion.snap_to_codebook:
        raise VqldmError("export-bundle: diffusion.snap_to_codebook is false, but MONAI's VQVAE.decode_stage_2_outputs "
                         "always quantises; export with diffusion.snap_to_codebook: true")


def _scheduler(pipe: DiffusionPipeline, clip: bool) -> dict:
    sch = {"_target_": "monai.networks.schedulers.DDIMScheduler", **schedule_kwargs(pipe.schedule)}
    if clip:
        lo, hi = pipe.norm.codebook_range(pipe.vqvae)
        return {**sch, "clip_sample": True, "clip_sample_min": lo, "clip_sample_max": hi}
    return {**sch, "clip_sample": False}


def inference_config(cfg: Config, pipe: DiffusionPipeline, steps: int, seed: int, num_samples: int) -> dict:
    """The bundle's inference.json: MONAI networks, scheduler and inferer, vqldm's seeded noise, NIfTI out."""
    lo, hi = pipe.vq_ckpt["normalization"]["intensity_range"]
    grid = pipe.voxel_grid
    load = "$@{0}.load_state_dict(torch.load(@bundle_root + '/{1}', map_location=@device, weights_only=True))"
    return {
        "imports": ["$import os", "$import nibabel", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/samples'",
        "device": "$torch.device('cpu')",
        "num_samples": num_samples, "seed": seed, "num_inference_steps": steps,
        "latent_shape": list(pipe.latent_shape(None)), "spacing": [float(s) for s in grid.spacing],
        "spacing_unit": grid.unit,  # NIfTI xyzt_units of the written volumes, as vqldm sample writes them
        "vqvae": {"_target_": "monai.networks.nets.VQVAE", **pipe.vq_ckpt["network"]},
        "unet": {"_target_": "monai.networks.nets.DiffusionModelUNet", **pipe.diff_ckpt["network"]},
        "load_vqvae": load.format("vqvae", MODELS["vqvae"]),
        "load_unet": load.format("unet", MODELS["unet"]),
        "scheduler": _scheduler(pipe, cfg.diffusion.clip_to_codebook_range),
        "inferer": {"_target_": "monai.inferers.LatentDiffusionInferer", "scheduler": "@scheduler",
                    "scale_factor": pipe.scale_factor},
        # sample i's noise from its own generator seeded by (seed, i), as vqldm sample draws it
        "noise": "$torch.stack([torch.randn(@latent_shape, generator=torch.Generator().manual_seed(@seed * 1000003 + i))"
                 " for i in range(@num_samples)]).to(@device)",
        "latents_to_volumes": ("$@inferer.sample(input_noise=@noise, autoencoder_model=@vqvae.to(@device).eval(), "
                               "diffusion_model=@unet.to(@device).eval(), scheduler=@scheduler, verbose=False)"),
        "volumes": f"$torch.clamp((@latents_to_volumes.float() - ({lo})) / ({hi} - ({lo})), 0.0, 1.0).cpu()",
        "image": "$lambda v: nibabel.Nifti1Image(v[0].numpy(), numpy.diag(@spacing + [1.0]))",
        "with_unit": "$lambda img: (img.header.set_xyzt_units(@spacing_unit), img)[1]",
        "save": ("$[nibabel.save(@with_unit(@image(v)), os.path.join(@output_dir, 'sample_%04d.nii.gz' % i)) "
                 "for i, v in enumerate(@volumes)]"),
        "initialize": ["$@load_vqvae", "$@load_unet", "$@scheduler.set_timesteps(num_inference_steps=@num_inference_steps)",
                       "$os.makedirs(@output_dir, exist_ok=True)"],
        "run": ["$@save"],
        "finalize": [],
    }


def metadata(pipe: DiffusionPipeline, steps: int) -> dict:
    import monai

    grid = pipe.voxel_grid
    return {
        "version": "0.1.0", "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": __import__("numpy").__version__, "required_packages_version": {"nibabel": "", "einops": ""},
        "name": "vqldm latent diffusion", "task": "unconditional 3D volume generation (VQ-VAE latent diffusion)",
        "description": (f"Exported by vqldm {__version__} from {pipe.diff_path.name} (stage 2) and {pipe.vq_path.name} "
                        f"(stage 1); DDIM, {steps} steps. Voxel size {list(grid.spacing)} {grid.unit}."),
        "authors": "vqldm", "copyright": "see the training data's licence",
        "vqldm": {"vqldm_version": __version__, "diffusion_sha256": _sha(pipe.diff_path),
                  "vqvae_sha256": pipe.vq_sha256, "spacing_unit": grid.unit},
        "network_data_format": {
            "inputs": {"noise": {"type": "tensor", "format": "latent", "num_channels": pipe.latent_shape(None)[0],
                                 "spatial_shape": pipe.latent_shape(None)[1:], "dtype": "float32"}},
            "outputs": {"volumes": {"type": "image", "format": "intensity in [0, 1]", "num_channels": 1,
                                    "spatial_shape": _volume_shape(pipe),
                                    "dtype": "float32"}},
        },
    }


def _volume_shape(pipe: DiffusionPipeline) -> list[int]:
    from vqldm.config import decoded_spatial, vqvae_from_network

    return decoded_spatial(vqvae_from_network(pipe.vq_ckpt["network"]), pipe.latent_shape(None)[1:])


def _sha(path: Path) -> str:
    from vqldm.checkpoint import file_sha256

    return file_sha256(path)


def _prepare(out: Path, overwrite: bool) -> None:
    held = [p for p in (out / "configs", out / "models") if p.exists()]
    if held and not overwrite:
        raise VqldmError(f"--out {out}: already holds a bundle ({', '.join(p.name for p in held)}/); choose another "
                         f"folder or pass --overwrite")
    for sub in held:  # --overwrite: the earlier files move aside, nothing is deleted
        moved = archive_previous(sub, ("*.json", "*.pt"))
        if moved:
            log.info("moved the earlier bundle files to %s", moved)


def export_bundle(cfg: Config, out: Path, diffusion_checkpoint: str | None = None, vqvae_checkpoint: str | None = None,
                  steps: int | None = None, seed: int = 0, num_samples: int = 4, overwrite: bool = False) -> dict:
    """Write the bundle of the trained pair (EMA weights, loaded on the CPU) into ``out``; returns its paths."""
    if num_samples < 1:
        raise VqldmError("--num-samples must be >= 1")
    cpu = dataclasses.replace(cfg, device=dataclasses.replace(cfg.device, use_cuda=False))
    pipe = load_pipeline(cpu, diffusion_checkpoint, vqvae_checkpoint, use_ema=True, rt=make_runtime(cpu))
    _refuse_what_monai_lacks(cfg, pipe)
    steps = cfg.diffusion.logging.num_inference_steps if steps is None else steps
    if not 1 <= steps <= pipe.schedule["num_train_timesteps"]:
        raise VqldmError(f"--steps {steps}: must lie in [1, {pipe.schedule['num_train_timesteps']}]")
    out = Path(out)
    _prepare(out, overwrite)
    for net, rel in ((pipe.vqvae, MODELS["vqvae"]), (pipe.unet, MODELS["unet"])):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        atomic_write(out / rel, lambda f, s=state: torch.save(s, f))
    paths = {"inference": out / "configs" / "inference.json", "metadata": out / "configs" / "metadata.json"}
    for key, doc in (("inference", inference_config(cfg, pipe, steps, seed, num_samples)), ("metadata", metadata(pipe, steps))):
        atomic_write_bytes(paths[key], (json.dumps(doc, indent=2) + "\n").encode("utf-8"))
    return {**paths, "models": [out / m for m in MODELS.values()], "steps": steps}
