"""A trained diffusion prior and its stage 1, rebuilt from their checkpoints alone, turning seeded
noise into volumes.

Sample ``i``'s starting noise is drawn from its own generator seeded by ``(seed, i)``, so which
samples a run makes does not depend on the batch size or on the number of ranks. Noise that a
sampler draws along the way (DDPM) comes from a ``torch.Generator`` seeded per batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vqldm.checkpoint import file_sha256, inference_weights, load_checkpoint, rebuild
from vqldm.config import Config, check_latent_for_unet, decoded_spatial, latent_spatial, vqvae_from_network
from vqldm.data.labels import class_index
from vqldm.data.pipeline import Normalization
from vqldm.errors import VqldmError
from vqldm.latents import LatentNorm, RecordedGrid, recorded_stage1
from vqldm.priors.diffusion.autoguidance import Autoguidance, autoguided, check_guide, recorded_guide
from vqldm.priors.diffusion.coarse import condition_volume
from vqldm.priors.diffusion.conditions import Asked, Slots, guided
from vqldm.priors.diffusion.covariates import asked_values
from vqldm.priors.diffusion.unet import as_denoiser, build_unet, self_condition_channels
from vqldm.runtime import Runtime, make_runtime, sample_generator
from vqldm.sampling.decode import decode_latents
from vqldm.sampling.margin import cropped, padded
from vqldm.sampling.samplers import Denoiser, sample_latents
from vqldm.sampling.self_condition import SelfCondition

log = logging.getLogger("vqldm")


@dataclass
class DiffusionPipeline(RecordedGrid):
    """Both networks, rebuilt from their checkpoints alone, ready to turn noise into volumes; ``voxel_grid``,
    ``spacing`` and ``unit``: the training data's voxel grid, written into every sample."""

    unet: torch.nn.Module
    vqvae: torch.nn.Module
    diff_ckpt: dict
    vq_ckpt: dict
    rt: Runtime
    diff_path: Path
    vq_path: Path
    vq_sha256: str | None = None  # of the stage-1 file actually loaded
    _denoise: Denoiser | None = None  # the (possibly CUDA-graph-replayed) UNet call, built once
    sample_class: str | None = None  # a class-conditional UNet: the class asked for (None: the null class)
    guidance: float = 1.0  # classifier-free guidance weight W: uncond + W (cond - uncond)
    autoguidance: Autoguidance = Autoguidance()  # set_autoguidance: weight and interval
    guide: torch.nn.Module | None = None  # the autoguidance guide UNet (None: plain sampling)
    guide_path: Path | None = None
    guide_ckpt: dict | None = None
    coarse: torch.Tensor | None = None  # coarse-to-fine: the coarse view (1, 1, x, y, z) samples must match
    coarse_path: Path | None = None
    asked_covariates: dict | None = None  # --cond KEY=VALUE: the covariates asked for (raw values)
    covariate_values: tuple | None = None  # ... normalised, with their presence: ((K,), (K,))

    @property
    def classes(self) -> list[str] | None:
        """The class names of a class-conditional UNet (recorded in its checkpoint), else None."""
        return self.diff_ckpt.get("classes")

    @property
    def coarse_stride(self) -> int | None:
        """Image voxels per latent voxel of a coarse-to-fine UNet's coarse view, else None."""
        return (self.diff_ckpt.get("coarse_condition") or {}).get("stride")

    @property
    def coarse_view(self) -> str:
        """A coarse-to-fine UNet's view: ``volume`` (block means) or ``projection`` (their mean along z)."""
        return (self.diff_ckpt.get("coarse_condition") or {}).get("view", "volume")

    @property
    def covariates(self) -> dict[str, list[float]]:
        """The covariates of a UNet trained with ``diffusion.covariates``: name -> training [min, max]."""
        return dict(self.diff_ckpt.get("covariates") or {})

    @property
    def slots(self) -> Slots:
        return Slots.of(self.diff_ckpt["network"])

    @property
    def extra_channels(self) -> int:
        return self.slots.extra_channels

    @property
    def self_condition(self) -> SelfCondition | None:
        """How a self-conditioned UNet is fed its own estimate (recorded in its checkpoint), else None."""
        if not self_condition_channels(self.diff_ckpt["network"]):
            return None
        return SelfCondition.from_meta(self.diff_ckpt.get("self_condition") or {})

    def set_coarse(self, path: str | None) -> None:
        """Coarse-to-fine: every sample is to match the coarse view of the volume in ``path`` (None: the
        null condition); a model trained without ``diffusion.coarse_condition`` refuses it in one line."""
        self.coarse, self.coarse_path, self._denoise = None, None, None
        if path is None:
            return
        if not self.coarse_stride:
            raise VqldmError(f"--cond-volume: {self.diff_path} was trained without diffusion.coarse_condition")
        unit = Normalization.from_dict(self.vq_ckpt["normalization"]).unit
        self.set_coarse_view(condition_volume(path, unit, self.diff_ckpt["data"]["patch_size"],
                                              list(self.diff_ckpt["latent_shape"])[1:], self.coarse_stride,
                                              self.coarse_view))
        self.coarse_path = Path(path)

    def set_coarse_view(self, view: torch.Tensor) -> None:
        """Coarse-to-fine with a coarse view given directly, (1, 1, x, y, z) in [0, 1] on the latent grid
        (a generated one, say); :meth:`set_coarse` takes it from a volume file."""
        lat = list(self.diff_ckpt["latent_shape"])[1:]
        if not self.coarse_stride or list(view.shape) != [1, 1] + lat:
            raise VqldmError(f"a coarse view must be (1, 1, {', '.join(map(str, lat))}) for a coarse-to-fine model; "
                             f"got {list(view.shape)} for {self.diff_path}")
        self.coarse, self.coarse_path, self._denoise = view.float(), None, None

    def set_covariates(self, asked: dict[str, float] | None) -> None:
        """Sample at these covariate values (``--cond KEY=VALUE``; a covariate left out is its null); an
        unknown name is one line, a value outside the training range a warning."""
        if asked and not self.covariates:
            raise VqldmError(f"--cond {next(iter(asked))}: {self.diff_path} was trained without diffusion.covariates")
        self.covariate_values = asked_values(asked or {}, self.covariates) if self.covariates else None
        self.asked_covariates, self._denoise = dict(asked or {}) or None, None

    def set_class(self, name: str | None, guidance: float = 1.0) -> None:
        """Sample class ``name`` (with the coarse view and covariates set before) with guidance ``guidance``
        (a conditional model without a class samples the null class); an unconditional model refuses a
        class in one line, and guidance without any condition too."""
        if name is not None:
            class_index(self.classes, name)
        elif guidance != 1.0 and self.coarse is None and not self.asked_covariates:
            raise VqldmError("--guidance needs --class, --cond-volume or --cond: it mixes a condition's prediction "
                             "with the unconditional one")
        self.sample_class, self.guidance, self._denoise = name, float(guidance), None

    def set_conditions(self, class_name: str | None = None, guidance: float = 1.0, cond: dict | None = None,
                       cond_volume: str | None = None) -> None:
        """Everything the samples are conditioned on, in the order the checks need (``--guidance`` needs a
        condition): the coarse view of ``cond_volume``, the covariates ``cond``, the class and the weight."""
        self.set_coarse(None if cond_volume is None else str(cond_volume))
        self.set_covariates(cond)
        self.set_class(class_name, guidance)

    def asked(self) -> Asked:
        """Everything this pipeline's samples are conditioned on."""
        label = None if self.sample_class is None else self.classes.index(self.sample_class)
        values, keep = self.covariate_values or (None, None)
        return Asked(label, self.coarse, values, keep)

    def _conditioned(self, call: Denoiser) -> Denoiser:
        """``call`` with this pipeline's conditions and guidance (unchanged for an unconditional UNet)."""
        slots = self.slots
        return guided(call, slots, self.asked(), self.guidance) if slots.count else call

    @property
    def scale_factor(self) -> float:
        return float(self.diff_ckpt["scale_factor"])

    @property
    def norm(self) -> LatentNorm:
        """How the UNet saw the latent (one global scale, or per channel)."""
        return LatentNorm.from_checkpoint(self.diff_ckpt)

    @property
    def schedule(self) -> dict:
        """The noise schedule the UNet was trained with (``scheduler`` in its checkpoint)."""
        return self.diff_ckpt["scheduler"]

    def data_records(self) -> tuple[dict, dict]:
        return self.diff_ckpt.get("data", {}), self.vq_ckpt.get("data", {})

    def latent_shape(self, shape: list[int] | None) -> list[int]:
        """(D, x, y, z) of the latent that decodes to volumes of ``shape`` (default: the training patch)."""
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
            out.append(torch.randn(latent_shape, generator=sample_generator(seed, i)))
        return torch.stack(out).to(self.rt.device)

    def decode(self, z: torch.Tensor, snap: bool) -> torch.Tensor:
        """Scaled latent -> volumes in [0, 1], (B, 1, X, Y, Z) float32 on CPU."""
        return decode_latents(self.vqvae, z, self.norm, self.vq_ckpt["normalization"]["intensity_range"],
                              snap, self.rt.autocast, self.vq_ckpt.get("intensity_calibration"))

    def set_autoguidance(self, weight: float, min_timestep: int = 0, guide_checkpoint: str | None = None,
                         rescale: float = 0.0) -> None:
        """Sample with autoguidance ``weight`` at timesteps ``>= min_timestep``, guided by ``guide_checkpoint``
        (default: the guide this checkpoint's own run kept, ``guide_model.pt``), the guided output's spread
        rescaled by ``rescale``. Weight 1 samples plainly."""
        if not (math.isfinite(weight) and weight >= 1.0):
            raise VqldmError(f"--autoguidance must be >= 1 (1: no autoguidance), got {weight}")
        self.autoguidance = Autoguidance(float(weight), int(min_timestep), float(rescale))
        self._denoise = None
        self.guide = self.guide_path = self.guide_ckpt = None
        if not self.autoguidance.active:
            if guide_checkpoint:
                raise VqldmError("--guide-checkpoint needs an autoguidance weight above 1 (--autoguidance W or "
                                 "diffusion.autoguidance.weight); at 1 the guide would not be used")
            return
        what = "--guide-checkpoint"
        path = Path(guide_checkpoint) if guide_checkpoint else recorded_guide(self.diff_ckpt, self.diff_path)
        ckpt = load_checkpoint(path, kind="diffusion", what=what)
        check_guide(ckpt, self.diff_ckpt, path, self.diff_path)
        self.guide, self.guide_path, self.guide_ckpt = _unet_from(ckpt, path, what, True, self.rt), path, ckpt

    def autoguidance_record(self) -> dict | None:
        """What samples.json says of the autoguidance (None: plain sampling)."""
        if self.guide is None:
            return None
        a = self.autoguidance
        return {"weight": a.weight, "min_timestep": a.min_timestep, "rescale": a.rescale, "guide": str(self.guide_path),
                "guide_sha256": file_sha256(self.guide_path), "guide_epoch": self.guide_ckpt.get("epoch")}

    def _call(self, net: torch.nn.Module) -> Denoiser:
        """One UNet as the samplers' call: compiled where ``device.compile`` is on, with the class and CFG."""
        net = torch.compile(net, dynamic=False) if self.rt.compile else net
        sc_channels = self_condition_channels(self.diff_ckpt["network"])
        return self._conditioned(as_denoiser(net, self.extra_channels, sc_channels))

    def _guided(self, model: Denoiser, guide: Denoiser | None) -> Denoiser:
        a = self.autoguidance
        return model if guide is None else autoguided(model, guide, a.weight, a.min_timestep, a.rescale)

    def plain_denoiser(self) -> Denoiser:
        """The UNet call without CUDA graphs (tiles vary in batch position; compiled where asked)."""
        return self._guided(self._call(self.unet), None if self.guide is None else self._call(self.guide))

    def denoiser(self) -> Denoiser:
        """The UNet call, built once: compiled where ``device.compile`` is on, each UNet replayed from a CUDA
        graph (one per batch shape) where ``device.cuda_graphs`` is on, autoguided where asked."""
        if self._denoise is None:
            model = self._graphed(self._call(self.unet), "UNet sampling call")
            guide = None if self.guide is None else self._graphed(self._call(self.guide), "guide UNet sampling call")
            self._denoise = self._guided(model, guide)
        return self._denoise

    def _graphed(self, call: Denoiser, name: str) -> Denoiser:
        if not self.rt.cuda_graphs or self.slots.count or self.self_condition:  # a replay would drop the condition
            return call
        from vqldm.graphs import CudaGraphed

        graphed = CudaGraphed(lambda b: call(b["x"], b["t"]), self.rt.device, warmup=2, name=name)
        return lambda x, t, condition=None: graphed({"x": x, "t": t})

    def tiled(self, lat: list[int]) -> tuple[bool, list[int]]:
        """Whether a latent of ``lat`` (D, x, y, z) exceeds the training latent (then the UNet runs on
        tiles of it and the decoder on windows), and the training latent's spatial size."""
        train = list(self.diff_ckpt["latent_shape"])[1:]
        return any(n > r for n, r in zip(lat[1:], train)), train

    def decode_any(self, z: torch.Tensor, snap: bool, tiled: bool) -> torch.Tensor:
        """:meth:`decode`, or for latents beyond the training latent the sliding-window decoder."""
        if not tiled:
            return self.decode(z, snap)
        from vqldm.autoencoder.model import snap_to_codebook, total_stride
        from vqldm.sampling.window import decode_windowed

        z = self.norm.denormalize(z)
        z = snap_to_codebook(self.vqvae, z) if snap else z
        return decode_windowed(self.vqvae, z, self.tiled(list(z.shape[1:]))[1], total_stride(self.vq_ckpt["network"]),
                               self.vq_ckpt["normalization"]["intensity_range"], autocast=self.rt.autocast,
                               calibration=self.vq_ckpt.get("intensity_calibration"))

    def margin(self, asked: list[int] | None) -> list[int]:
        """The sampling margin (latent cells per axis) ``generate`` applies: ``asked``, except with a coarse
        view to match (``--cond-volume``), which lies on the asked latent grid itself (no margin)."""
        return [0, 0, 0] if not asked or self.coarse is not None else [int(m) for m in asked]

    @torch.no_grad()
    def generate(self, indices: list[int], seed: int, steps: int, sampler: str, batch_size: int, snap: bool,
                 shape: list[int] | None = None, progress: bool = False, clip: bool = True,
                 margin: list[int] | None = None) -> torch.Tensor:
        """Volumes (N, 1, X, Y, Z) in [0, 1] for sample ``indices``; batches the UNet. A ``shape`` beyond
        the training patch is sampled on overlapping latent tiles (MultiDiffusion) and decoded by
        sliding window, so the networks hold one tile at a time. ``margin``: latent cells per axis
        denoised beyond each face and cropped off before decoding (:mod:`vqldm.sampling.margin`)."""
        lat = self.latent_shape(shape)
        tiled, train = self.tiled(lat)
        margin = self.margin(margin)
        if any(margin):
            check_latent_for_unet(len(self.diff_ckpt["network"]["channels"]), padded(lat, margin)[1:],
                                  f"diffusion.sampling_margin {margin}")
        if tiled and self.coarse is not None:
            raise VqldmError("--cond-volume with --shape beyond the training patch: coarse-to-fine samples the "
                             "training patch; omit --shape")
        denoiser = self.denoiser()
        if tiled:
            from vqldm.sampling.window import tiled_denoiser

            denoiser = tiled_denoiser(self.plain_denoiser(), train)
        clip_range = self.norm.codebook_range(self.vqvae) if clip else None
        outs = []
        for start in range(0, len(indices), batch_size):
            idx = indices[start:start + batch_size]
            noise = self.noise(idx, seed, padded(lat, margin))
            # noise drawn during sampling (DDPM) is seeded per batch, for repeatable files
            g = torch.Generator(device=noise.device).manual_seed(int(seed) * 7919 + idx[0])
            z = sample_latents(sampler, denoiser, noise, steps, self.schedule, generator=g,
                               clip_range=clip_range, autocast=self.rt.autocast,
                               desc=f"{sampler} sampling" if progress else None,
                               self_condition=None if tiled else self.self_condition)
            outs.append(self.decode_any(cropped(z, margin), snap, tiled))
        return torch.cat(outs) if outs else torch.zeros([0, 1] + (shape or []))


def _unet_from(ckpt: dict, path: Path, what: str, use_ema: bool, rt: Runtime) -> torch.nn.Module:
    state = inference_weights(ckpt, path, use_ema, "--diffusion-checkpoint")
    unet = rebuild(lambda: build_unet(ckpt["network"], flash_attention=rt.is_cuda), state, what, path, "diffusion UNet")
    return rt.frozen(unet)


def load_pipeline(cfg: Config, diffusion_checkpoint: str | None = None, vqvae_checkpoint: str | None = None,
                  use_ema: bool = True, rt: Runtime | None = None) -> DiffusionPipeline:
    """The UNet of ``diffusion_checkpoint`` (default: ``diffusion.checkpoints.output_dir/best_model.pt``)
    and the stage-1 checkpoint it was trained on (or ``vqvae_checkpoint``, with a warning if it differs)."""
    rt = rt or make_runtime(cfg)
    if diffusion_checkpoint:
        diff_path, what = Path(diffusion_checkpoint), "--diffusion-checkpoint"
    else:
        diff_path, what = Path(cfg.diffusion.checkpoints.output_dir) / "best_model.pt", "diffusion.checkpoints.output_dir"
    ckpt = load_checkpoint(diff_path, kind="diffusion", what=what)
    unet = _unet_from(ckpt, diff_path, what, use_ema, rt)
    vqvae, vq_ckpt, vq_path, vq_what, sha, mismatch = recorded_stage1(ckpt, diff_path, vqvae_checkpoint, rt)
    if mismatch:
        if not vqvae_checkpoint:
            raise VqldmError(mismatch + "; pass the right one with --vqvae-checkpoint")
        log.warning("%s; decoding with it anyway as --vqvae-checkpoint asks", mismatch)
    if vq_ckpt["network"]["embedding_dim"] != ckpt["network"]["out_channels"]:
        raise VqldmError(f"{vq_what}: {vq_path} has embedding_dim {vq_ckpt['network']['embedding_dim']} but the "
                         f"diffusion UNet models {ckpt['network']['out_channels']} channels")
    return DiffusionPipeline(unet, vqvae, ckpt, vq_ckpt, rt, diff_path, vq_path, vq_sha256=sha)
