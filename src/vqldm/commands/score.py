"""``vqldm score``: how likely the token prior finds each volume, token by token.

Each volume is encoded to its code grid, and the prior gives every code's negative log-likelihood
given the codes before it (in the prior's order). The per-token map, upsampled to voxels, shows where
a volume is unlike the training data (Pinaya et al., 2022, did this in 2D for anomaly detection);
the per-volume score is the mean over tokens. For microscopy this flags artefacts such as drift,
clusters or empty regions.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from vqldm.config import Config
from vqldm.data import pipeline
from vqldm.data.io import VOLUME_SUFFIXES, list_volumes, read_volume, write_volume
from vqldm.errors import VqldmError
from vqldm.files import atomic_write_bytes, unique_stems
from vqldm.autoencoder.model import total_stride
from vqldm.latents import encode_indices
from vqldm.priors.transformer.model import to_grid, to_sequence
from vqldm.priors.transformer.pipeline import TokenPipeline, load_token_pipeline
from vqldm.priors.transformer.task import token_nll

log = logging.getLogger("vqldm")


@torch.no_grad()
def token_nll_grid(pipe: TokenPipeline, volume: np.ndarray, start: int | torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood (nats) of each code of one raw volume, as its code grid (x, y, z), after
    ``start`` (the start token or prefix; default: the null class and covariates, the unconditional likelihood)."""
    norm = pipeline.Normalization.from_dict(pipe.vq_ckpt["normalization"])
    lo, hi = norm.intensity_range
    x = torch.from_numpy(norm.unit(volume) * (hi - lo) + lo)[None, None]
    grid = encode_indices(pipe.vqvae, x, pipe.rt)
    order = torch.tensor(pipe.ckpt["ordering"]["order"], dtype=torch.long, device=pipe.rt.device)
    with pipe.rt.autocast():
        nll = token_nll(pipe.model, to_sequence(grid, order), pipe.null_start if start is None else start)
    return to_grid(nll.float(), order, pipe.grid)[0].cpu()


def voxel_map(nll: torch.Tensor, stride: int) -> np.ndarray:
    """A token grid brought to the voxel grid: each token covers its stride^3 block of voxels."""
    return nll.repeat_interleave(stride, 0).repeat_interleave(stride, 1).repeat_interleave(stride, 2).numpy()


def _check_shape(path: Path, shape: tuple, patch: list[int]) -> None:
    if list(shape) != list(patch):
        raise VqldmError(f"--volumes: {path} has shape {list(shape)}, but the token prior scores volumes of its "
                         f"training patch size {list(patch)}")


def score_volumes(cfg: Config, volumes: Path, out: Path, prior_checkpoint: str | None = None,
                  progress: bool = True) -> dict:
    """Write ``nll_<name>.nii.gz`` per volume and ``scores.csv`` / ``scores.json``; returns the scores."""
    files = list_volumes(volumes)
    if not files:
        raise VqldmError(f"--volumes: no volumes (.nii, .nii.gz, .tif, .tiff) in {volumes}")
    stems = unique_stems(files, VOLUME_SUFFIXES, f"--volumes {volumes}")
    pipe = load_token_pipeline(cfg, prior_checkpoint)
    patch, stride = pipe.ckpt["data"]["patch_size"], total_stride(pipe.vq_ckpt["network"])
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    it = list(zip(files, stems))
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc="scoring", unit="vol", leave=False)
    for f, name in it:
        vol = read_volume(f)
        _check_shape(f, vol.array.shape, patch)
        nll = token_nll_grid(pipe, vol.array)
        write_volume(out / f"nll_{name}.nii.gz", voxel_map(nll, stride), vol.spacing, vol.unit, vol.affine)
        rows.append({"file": f.name, "mean_nll_nats": float(nll.mean()),
                     "bits_per_token": float(nll.mean()) / math.log(2.0),
                     "p99_token_nll_nats": float(torch.quantile(nll.flatten(), 0.99))})
    _write_scores(out, rows, pipe)
    return {"scores": rows, "csv": out / "scores.csv", "json": out / "scores.json"}


def _write_scores(out: Path, rows: list[dict], pipe: TokenPipeline) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "scores.csv", buf.getvalue().encode("utf-8"))
    record = {"prior_checkpoint": str(pipe.path), "vqvae_checkpoint": str(pipe.vq_path),
              "unit": "nats per token (negative log-likelihood under the token prior); maps: nats, per voxel "
                      "of the token's block", "volumes": rows}
    atomic_write_bytes(out / "scores.json", json.dumps(record, indent=2).encode("utf-8"))
