"""Autoguidance (Karras et al., 2024, "Guiding a diffusion model with a bad version of itself").

An unconditional prior is steered by an early snapshot of its own training run, the *guide*: each
step uses ``guide + w (model - guide)``, which pushes the sample away from the errors that the
less-trained guide makes in larger measure. With ``w = 1`` this is plain sampling. The guide runs
only at timesteps ``t >= min_timestep``, the noisiest part of the chain, where the layout (how many
filaments, where they run) is decided; guiding the last, fine steps too oversharpens intensities
(Kynkäänniemi et al., 2024, guide on an interval; measured in docs/quality.md).

Training keeps the guide: ``diffusion.autoguidance.guide_epoch`` makes the engine save that epoch's
EMA weights as ``guide_model.pt`` beside ``best_model.pt``, and every later checkpoint records the
file's epoch and sha256 (``snapshots``), so sampling finds the run's own guide and can tell it apart
from any other file of that name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vqldm.checkpoint import file_sha256
from vqldm.errors import VqldmError
from vqldm.priors.diffusion.unet import guidance_mix, guidance_rescale

GUIDE = "guide_model.pt"


@dataclass(frozen=True)
class Autoguidance:
    """How sampling is guided: ``weight`` (1: not at all) from ``min_timestep`` up, with the guided output's
    spread pulled back to the model's by ``rescale`` (:func:`~vqldm.priors.diffusion.unet.guidance_rescale`)."""

    weight: float = 1.0
    min_timestep: int = 0
    rescale: float = 0.0

    @property
    def active(self) -> bool:
        return self.weight != 1.0


def autoguided(model, guide, weight: float, min_timestep: int, rescale: float = 0.0):
    """The denoiser ``guide + weight (model - guide)`` at timesteps ``t >= min_timestep`` and ``model``
    alone below; both are ``f(x, t, condition)``. Below ``min_timestep`` the guide is not called. With
    ``rescale`` > 0 each sample's guided output keeps (that share of) the model's own spread. Reads
    the step's timestep on the host (one value per call: every sampler gives one t to the whole batch)."""
    def call(x: torch.Tensor, t: torch.Tensor, condition=None) -> torch.Tensor:
        out = model(x, t, condition)
        if weight == 1.0 or float(t.reshape(-1)[0]) < min_timestep:
            return out
        return guidance_rescale(guidance_mix(guide(x, t, condition), out, weight), out, rescale)
    return call


def recorded_guide(ckpt: dict, path: Path) -> Path:
    """The guide a diffusion checkpoint's own run kept (``snapshots`` in it), checked by sha256; a
    VqldmError in one line where it has none or the file beside it is another."""
    rec = (ckpt.get("snapshots") or {}).get(GUIDE)
    guide = Path(path).parent / GUIDE
    if rec is None:
        raise VqldmError(f"autoguidance: {path} records no guide (its run was trained without "
                         f"diffusion.autoguidance.guide_epoch, or this checkpoint predates the guide); train with "
                         f"it, pass --guide-checkpoint, or sample with --autoguidance 1")
    if not guide.is_file():
        raise VqldmError(f"autoguidance: {path} was trained with the guide {GUIDE} (epoch {rec.get('epoch')}), but "
                         f"{guide} is missing; pass --guide-checkpoint, or sample with --autoguidance 1")
    if file_sha256(guide) != rec.get("sha256"):
        raise VqldmError(f"autoguidance: {guide} is not the guide {path} was trained with (sha256 differs); "
                         f"pass --guide-checkpoint, or sample with --autoguidance 1")
    return guide


def check_guide(guide: dict, model: dict, guide_path: Path, model_path: Path) -> None:
    """A guide must denoise the model's latent under the model's conditions: the same stage 1, latent grid,
    normalisation, noise schedule, classes, covariates and coarse condition. One line naming both files and
    the first difference otherwise."""
    keys = ("vqvae_sha256", "latent_shape", "scale_factor", "latent_shift", "latent_scale", "scheduler", "classes",
            "covariates", "coarse_condition", "self_condition")
    for k in keys:
        a, b = _plain(guide.get(k)), _plain(model.get(k))
        if a != b:
            raise VqldmError(f"--guide-checkpoint: {guide_path} cannot guide {model_path}: their {k} differ "
                             f"({_short(a)} vs {_short(b)}); a guide must be trained on the same stage 1 and data")


def _plain(v):
    """Tensors as nested lists, so recorded values compare by value."""
    return v.tolist() if torch.is_tensor(v) else v


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
