"""Volumes larger than the training patch, one window at a time (MONAI ``sliding_window_inference``).

Encoding: the encoder runs on overlapping image windows of the training patch size, and the
*pre-quantisation* latents are blended with Gaussian weights; the blend is quantised once, so
neighbouring windows agree on every code. Decoding: the decoder runs on overlapping latent windows
of the training latent size and the images are blended the same way. Windows start on the latent
grid (their step is a multiple of the VQ-VAE's stride), so a window's latent is exactly the slice of
the whole latent it covers. The network sees one window at a time (``sw_batch_size``); only the
blended output is held whole.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from vqldm.autoencoder.calibration import apply_calibration
from vqldm.autoencoder.model import snap_to_codebook

# the Gaussian blending weight's sigma as a share of the window: MONAI's default 0.125 leaves both
# windows' edges (where the encoder sees its zero padding) in charge mid-overlap; 0.25 measured smaller
# seams and a higher PSNR on the demo run (docs/editing.md)
SIGMA_SCALE = 0.25


def aligned_overlap(roi: list[int], stride: int, overlap: float) -> list[float]:
    """Per axis, the overlap (MONAI's fraction of the window) nearest ``overlap`` whose window step
    is a whole number of latent voxels (a multiple of ``stride``), at least one."""
    out = []
    for r in roi:
        step = max(stride, int(r * (1.0 - overlap)) // stride * stride)
        # MONAI takes int(r * (1 - o)) as the step: nudge o down so float rounding cannot lose a voxel
        out.append(max(0.0, 1.0 - step / r - 1e-9))
    return out


def window_borders(size: list[int], roi: list[int], stride: int, overlap: float = 0.25) -> list[list[int]]:
    """Per axis, the voxel planes where a window begins or ends (as MONAI places them for
    :func:`encode_windowed`), for the seam figure :func:`vqldm.metrics.reconstruction.seam_ratio`."""
    out = []
    for n, r, o in zip(size, roi, aligned_overlap([min(r, n) for r, n in zip(roi, size)], stride, overlap)):
        r = min(r, n)
        step = max(int(r * (1.0 - o)), 1)
        starts = sorted(set(list(range(0, n - r, step)) + [n - r]))
        out.append(sorted({s for s in starts if s > 0} | {s + r for s in starts if s + r < n}))
    return out


def pad_to_multiple(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, list[int]]:
    """Pad (B, C, X, Y, Z) at the far end to a multiple of ``stride`` by reflection; returns the
    padded tensor and the original spatial size (to crop back to)."""
    size = list(x.shape[2:])
    pads: list[int] = []
    for n in reversed(size):
        pads += [0, (-n) % stride]
    if not any(pads):
        return x, size
    mode = "replicate" if any(p >= n for p, n in zip(pads[1::2], reversed(size))) else "reflect"
    return F.pad(x, pads, mode=mode), size


def _blend(predictor, x: torch.Tensor, roi: list[int], overlap: list[float], progress: bool,
           device: torch.device | None = None) -> torch.Tensor:
    """``predictor`` on overlapping ``roi`` windows of ``x``, Gaussian-blended; the blend (and its weight
    map) is held on ``device`` (default: ``x``'s)."""
    return sliding_window_inference(x, roi_size=roi, sw_batch_size=1, predictor=predictor, overlap=overlap,
                                    mode="gaussian", sigma_scale=SIGMA_SCALE, padding_mode="replicate",
                                    progress=progress, device=device)


@torch.no_grad()
def encode_windowed(vqvae: torch.nn.Module, x: torch.Tensor, roi: list[int], stride: int, overlap: float = 0.25,
                    autocast=None, progress: bool = False) -> torch.Tensor:
    """Network-range image (B, 1, X, Y, Z), each side a multiple of ``stride``, -> the quantised latent
    (B, D, X/s, Y/s, Z/s): Gaussian-blended pre-quantisation latents of ``roi``-sized windows,
    quantised once."""
    ctx = autocast or contextlib.nullcontext

    def enc(w):
        with ctx():
            return vqvae.encode(w).float()

    roi = [min(r, n) for r, n in zip(roi, x.shape[2:])]
    z = _blend(enc, x.float(), roi, aligned_overlap(roi, stride, overlap), progress)
    return snap_to_codebook(vqvae, z)


@torch.no_grad()
def decode_windowed(vqvae: torch.nn.Module, z: torch.Tensor, latent_roi: list[int], stride: int,
                    intensity_range, overlap: float = 0.25, autocast=None, calibration: dict | None = None,
                    progress: bool = False) -> torch.Tensor:
    """Quantised latent (B, D, x, y, z) -> volumes in [0, 1], (B, 1, x*s, y*s, z*s) float32 on the
    CPU: the decoder on ``latent_roi``-sized windows, Gaussian-blended in voxel space, then the same
    intensity map as :func:`vqldm.sampling.decode.decode_latents`. The blended volume is stitched on the
    CPU and mapped in place, so accelerator memory is bounded by one window and host memory by about
    twice the volume."""
    ctx = autocast or contextlib.nullcontext

    def dec(w):
        with ctx():
            return vqvae.decode(w).float()

    roi = [min(r, n) for r, n in zip(latent_roi, z.shape[2:])]
    img = _blend(dec, z.float(), roi, aligned_overlap(roi, 1, overlap), progress, torch.device("cpu"))
    lo, hi = intensity_range
    img = img.sub_(lo).div_(hi - lo)  # to_unit, in place
    return apply_calibration(img, calibration).clamp_(0, 1)


def tiled_denoiser(denoiser, latent_roi: list[int], overlap: float = 0.25):
    """A denoiser for latents larger than the training latent: the UNet runs on overlapping
    ``latent_roi`` tiles, one at a time, and the tiles' predictions are blended with Gaussian weights
    (MultiDiffusion, Bar-Tal et al., 2023, with weighted averaging). Samplers step linearly in the
    model output, so blending the predictions at every step is blending the tiles' next latents.
    Latents no larger than ``latent_roi`` go to ``denoiser`` whole."""
    def call(x, t, condition=None):
        if all(n <= r for n, r in zip(x.shape[2:], latent_roi)):
            return denoiser(x, t, condition)
        outs = []
        for b in range(x.shape[0]):  # a tile's timestep is its sample's
            def tile(w, b=b):
                return denoiser(w, t[b:b + 1].expand(w.shape[0]), condition).float()

            outs.append(_blend(tile, x[b:b + 1].float(), list(latent_roi), aligned_overlap(latent_roi, 1, overlap),
                               False))
        return torch.cat(outs)
    return call
