"""The documented Python API (docs/api.md): ``from vqldm import load_model, train, ...``.

Load a trained pair (stage 1 + diffusion prior) or a token prior from its checkpoints, sample volumes
as arrays with their voxel size and unit, reconstruct, encode and decode volumes with a VQ-VAE, and
train a stage from a config object. Every name in :data:`__all__` is stable: it changes only with a
deprecation first. Sampling here gives exactly the volumes ``vqldm sample`` writes for the same seed,
batch size and settings; errors are :class:`~vqldm.errors.VqldmError` with the key or file named.

This module imports torch and MONAI only when a function needs them, so ``import vqldm`` stays light.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vqldm.config import Config, apply_overrides, config_from_dict, load_yaml
from vqldm.errors import VqldmError

__all__ = ["Autoencoder", "Config", "Model", "Samples", "VqldmError", "load_autoencoder", "load_config",
           "load_model", "synthesize", "train"]

STAGES = ("vqvae", "diffusion", "prior")
PRESETS = ("default", "tiny", "demo", "microtubules")


def load_config(source: str | Path | dict | Config | None = None, overrides: list[str] | None = None) -> Config:
    """A validated, read-only config from a YAML file, a packaged preset name (``"tiny"``, ``"demo"``,
    ``"microtubules"``, ``"default"``), a dict in the YAML schema, a Config, or None (all defaults);
    ``overrides`` are ``"dotted.key=value"`` strings, as ``--set`` takes them."""
    name = None
    if isinstance(source, Config):
        data, name = source.to_dict(), source.source
    elif isinstance(source, dict):
        data = copy.deepcopy(source)
    elif source is None:
        data = {}
    elif str(source) in PRESETS and not Path(source).exists():
        from importlib import resources

        import yaml

        data = yaml.safe_load(resources.files("vqldm.configs").joinpath(f"{source}.yaml").read_text(encoding="utf-8"))
        name = f"preset {source}"
    else:
        data, name = load_yaml(source), str(source)
    return config_from_dict(apply_overrides(data, list(overrides or [])), source=name)


def _with_device(cfg: Config, device: str | None) -> Config:
    """``cfg`` on ``device`` ("cpu", "cuda", "cuda:1"; None: the config's ``device`` section)."""
    if device is None:
        return cfg
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise VqldmError(f"device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")
    d = dataclasses.replace(cfg.device, use_cuda=kind == "cuda", gpu_id=int(index or cfg.device.gpu_id))
    return dataclasses.replace(cfg, device=d)


def synthesize(out: str | Path, num_train: int = 8, num_val: int = 2, shape=(32, 32, 32), seed: int = 0) -> dict:
    """Synthetic SMLM microtubule volumes in ``out/train`` and ``out/val`` (as ``vqldm synth``)."""
    from vqldm.synth import write_dataset

    return write_dataset(out, num_train, num_val, tuple(shape), seed, progress=False)


def train(config: Config | str | Path | dict, stage: str = "vqvae", *, overwrite: bool = False,
          progress: bool = False):
    """Train one stage (``"vqvae"``, ``"diffusion"`` or ``"prior"``) as ``vqldm train-<stage>`` does;
    returns its ``FitResult`` (``best_path``, ``latest_path``, ``best_val_loss``, ``epochs``, ``steps``)."""
    cfg = config if isinstance(config, Config) else load_config(config)
    if stage not in STAGES:
        raise VqldmError(f"train: stage {stage!r}: choose {', '.join(STAGES)}")
    from vqldm.data.io import check_data_dirs

    check_data_dirs(cfg.data)
    if stage == "vqvae":
        from vqldm.autoencoder.train import train_vqvae as run
    elif stage == "diffusion":
        from vqldm.priors.diffusion.train import train_diffusion as run
    else:
        from vqldm.priors.transformer.train import train_prior as run
    return run(cfg, overwrite=overwrite, progress=progress)


@dataclass
class Samples:
    """Generated volumes and the training data's voxel grid: ``volumes[i]`` is sample ``indices[i]``."""

    volumes: Any  # numpy float32 (N, X, Y, Z) in [0, 1]
    spacing: tuple[float, float, float]  # voxel size in ``unit``
    unit: str  # micron, mm, meter or unknown (NIfTI's names)
    affine: Any = None  # the training data's NIfTI voxel-to-world map, where it had one
    seed: int = 0
    indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int):
        return self.volumes[i]

    def save(self, folder: str | Path, suffix: str = "nii.gz") -> list[Path]:
        """``folder/sample_0000.<suffix>`` ... with their spacing and unit (nii.gz, tif or ome.tif)."""
        from vqldm.data.io import write_volume

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return [write_volume(folder / f"sample_{i:04d}.{suffix}", v, self.spacing, self.unit, self.affine)
                for i, v in zip(self.indices, self.volumes)]


class Model:
    """A trained prior (diffusion or token) and its stage 1, from :func:`load_model`."""

    def __init__(self, cfg: Config, pipe, prior: str):
        self.config, self.pipeline, self.prior = cfg, pipe, prior

    @property
    def device(self):
        return self.pipeline.rt.device

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.pipeline.spacing)

    @property
    def unit(self) -> str:
        return self.pipeline.unit

    def sample(self, n: int, *, seed: int = 0, sampler: str | None = None, steps: int | None = None,
               batch_size: int = 8, snap: bool | None = None, shape: list[int] | None = None,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               progress: bool = False, class_name: str | None = None, guidance: float = 1.0,
               autoguidance: float | None = None, guide_checkpoint: str | Path | None = None,
               cond_volume: str | Path | None = None, cond: dict[str, float] | None = None) -> Samples:
        """``n`` volumes; sample ``i`` is seeded by ``(seed, i)``. Diffusion: ``sampler`` (ddim, ddpm, dpmpp_2m, rflow),
        ``steps``, ``snap``, ``shape``, ``autoguidance`` and ``guide_checkpoint`` (as ``--autoguidance`` and
        ``--guide-checkpoint``), for a coarse-to-fine model ``cond_volume`` (``--cond-volume``); token prior:
        ``temperature``, ``top_k``, ``top_p``; for a conditional model of either prior ``class_name``, ``cond``
        (covariates, {name: value}, as ``--cond KEY=VALUE``) and ``guidance`` (as ``--class`` and ``--guidance``). None: as ``vqldm sample`` (the config's, then the model's defaults)."""
        from vqldm.commands.sample import SampleOptions, sampling_settings, token_settings

        if n < 1 or batch_size < 1:
            raise VqldmError(f"sample: n ({n}) and batch_size ({batch_size}) must be >= 1")
        opts = SampleOptions(n, Path("."), scheduler=sampler, steps=steps, seed=seed, batch_size=batch_size,
                             shape=shape, snap=None if snap is None else ("on" if snap else "off"),
                             temperature=temperature, top_k=top_k, top_p=top_p)
        indices = list(range(n))
        if self.prior == "transformer":
            if any(v is not None for v in (autoguidance, guide_checkpoint, cond_volume)):
                raise VqldmError("sample: autoguidance, guide_checkpoint and cond_volume are the diffusion prior's; "
                                 "the token prior takes temperature, top_k, top_p, class_name, guidance and cond")
            self.pipeline.set_conditions(class_name, guidance, cond)
            vols = self.pipeline.generate(indices, seed, batch_size, progress=progress, **token_settings(self.config, opts))
        else:
            self.pipeline.set_conditions(class_name, guidance, cond, cond_volume)
            ag = self.config.diffusion.autoguidance
            self.pipeline.set_autoguidance(ag.weight if autoguidance is None else autoguidance, ag.min_timestep,
                                           None if guide_checkpoint is None else str(guide_checkpoint), ag.rescale)
            name, k, on = sampling_settings(self.config, opts, self.pipeline)
            vols = self.pipeline.generate(indices, seed, k, name, batch_size, on, shape, progress,
                                          self.config.diffusion.clip_to_codebook_range,
                                          self.config.diffusion.sampling_margin)
        grid = self.pipeline.voxel_grid
        return Samples(vols[:, 0].numpy(), tuple(grid.spacing), grid.unit, grid.affine, seed, indices)

    def autoencoder(self) -> "Autoencoder":
        """The stage 1 this prior decodes with."""
        p = self.pipeline
        return Autoencoder(p.vqvae, p.vq_ckpt, p.rt)


def load_model(config: Config | str | Path | dict | None = None, *, prior: str = "diffusion",
               checkpoint: str | Path | None = None, vqvae_checkpoint: str | Path | None = None,
               device: str | None = None, use_ema: bool = True) -> Model:
    """A trained prior from its checkpoint (default: the config's ``<prior>.checkpoints.output_dir/
    best_model.pt``) with the stage 1 it was trained on, on ``device`` ("cpu", "cuda", "cuda:N")."""
    if prior not in ("diffusion", "transformer"):
        raise VqldmError(f"load_model: prior {prior!r}: choose diffusion or transformer")
    cfg = _with_device(config if isinstance(config, Config) else load_config(config), device)
    from vqldm.runtime import make_runtime

    rt = make_runtime(cfg)
    ckpt, vq = (str(checkpoint) if checkpoint else None), (str(vqvae_checkpoint) if vqvae_checkpoint else None)
    if prior == "transformer":
        from vqldm.priors.transformer.pipeline import load_token_pipeline

        return Model(cfg, load_token_pipeline(cfg, ckpt, vq, use_ema, rt), prior)
    from vqldm.priors.diffusion.pipeline import load_pipeline

    return Model(cfg, load_pipeline(cfg, ckpt, vq, use_ema, rt), prior)


class Autoencoder:
    """A trained VQ-VAE (stage 1): volumes <-> latents. Volumes are numpy (X, Y, Z) arrays; inputs are
    normalised as in training (the checkpoint's method), outputs are in [0, 1] with the checkpoint's
    intensity calibration applied where it has one."""

    def __init__(self, vqvae, ckpt: dict, rt):
        self.network, self.checkpoint, self.rt = vqvae, ckpt, rt

    @property
    def stride(self) -> int:
        from vqldm.autoencoder.model import total_stride

        return total_stride(self.checkpoint["network"])

    def _input(self, volume):
        import numpy as np
        import torch

        from vqldm.data.pipeline import Normalization

        arr = np.asarray(volume)
        if arr.ndim != 3 or any(n % self.stride for n in arr.shape):
            raise VqldmError(f"volume of shape {list(arr.shape)}: expected (X, Y, Z), each a multiple of the "
                             f"VQ-VAE's stride {self.stride}")
        norm = Normalization.from_dict(self.checkpoint["normalization"])
        lo, hi = norm.intensity_range
        x = torch.from_numpy(norm.unit(arr).astype(np.float32)) * (hi - lo) + lo
        return x[None, None]

    def encode(self, volume):
        """The quantised latent (embedding_dim, x, y, z), float32 on the CPU."""
        from vqldm.latents import encode

        return encode(self.network, self._input(volume), self.rt)[0].cpu()

    def codes(self, volume):
        """The code index of every latent voxel (x, y, z), int64 on the CPU."""
        from vqldm.latents import encode_indices

        return encode_indices(self.network, self._input(volume), self.rt)[0, 0].cpu()

    def decode(self, latent, snap: bool = False):
        """A latent (embedding_dim, x, y, z) -> volume (X, Y, Z) in [0, 1]; ``snap``: nearest codes first."""
        import torch

        from vqldm.latents import LatentNorm
        from vqldm.sampling.decode import decode_latents

        z = torch.as_tensor(latent, dtype=torch.float32)[None].to(self.rt.device)
        out = decode_latents(self.network, z, LatentNorm(1.0), self.checkpoint["normalization"]["intensity_range"],
                             snap, self.rt.autocast, self.checkpoint.get("intensity_calibration"))
        return out[0, 0].numpy()

    def reconstruct(self, volume):
        """encode -> decode: the volume as the VQ-VAE reproduces it, (X, Y, Z) in [0, 1]."""
        return self.decode(self.encode(volume))


def load_autoencoder(checkpoint: str | Path, *, device: str | None = "cpu") -> Autoencoder:
    """A stage-1 checkpoint (best_model.pt or latest_checkpoint.pt) as an :class:`Autoencoder`."""
    from vqldm.latents import load_vqvae
    from vqldm.runtime import make_runtime

    rt = make_runtime(_with_device(Config(), device or "cpu"))
    vqvae, ckpt = load_vqvae(checkpoint, rt, what="load_autoencoder")
    return Autoencoder(vqvae, ckpt, rt)
