"""Localisations to voxels: occupancy, counts (density) or Gaussian splatting with a sigma in nm.

:func:`raw_density` gives localisations per voxel (``counts``), the same blurred by a Gaussian of
``sigma_nm`` per axis (``gaussian``; the blur reflects at the field's border, so the sum is kept),
or 1 where a voxel holds any localisation (``occupancy``). A data set is then divided by one
``counts_per_intensity`` scale, the same for every volume, so intensities keep the absolute
localisation density (the upstream converter normalises each volume on its own, which loses it).
The scale is recorded, and ``sum(intensity) * counts_per_intensity`` restores the localisation
count of a volume (:mod:`vqldm.smlm.points`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from vqldm.errors import VqldmError
from vqldm.smlm.grid import Grid

METHODS = ("occupancy", "counts", "gaussian")


def histogram(points_nm: np.ndarray, grid: Grid) -> np.ndarray:
    """Localisations per voxel (float64, the grid's shape); points outside the grid are dropped."""
    idx = np.floor(grid.to_voxel(points_nm)).astype(np.int64)
    idx = idx[np.all((idx >= 0) & (idx < np.asarray(grid.shape)), axis=1)]
    flat = np.ravel_multi_index(idx.T, grid.shape)
    return np.bincount(flat, minlength=int(np.prod(grid.shape))).reshape(grid.shape).astype(np.float64)


def check_method(method: str, sigma_nm) -> None:
    if method not in METHODS:
        raise VqldmError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "gaussian":
        sig = np.asarray(sigma_nm if sigma_nm is not None else [-1.0], np.float64).reshape(-1)
        if sig.size not in (1, 3) or (sig <= 0).any():
            raise VqldmError("--method gaussian needs --sigma-nm: one or three positive numbers (nm)")


def raw_density(points_nm: np.ndarray, grid: Grid, method: str, sigma_nm=None) -> np.ndarray:
    """The unscaled volume of one table (float64): see the module docstring."""
    check_method(method, sigma_nm)
    counts = histogram(points_nm, grid)
    if method == "occupancy":
        return (counts > 0).astype(np.float64)
    if method == "counts":
        return counts
    sigma_vox = np.broadcast_to(np.asarray(sigma_nm, np.float64), (3,)) / np.asarray(grid.voxel_nm)
    return ndimage.gaussian_filter(counts, sigma_vox, mode="reflect", truncate=4.0)


def counts_per_intensity(method: str, peak: float, n_points: int, n_occupied: int, scale: float | None) -> float:
    """Localisations per unit of summed intensity for a data set.

    ``counts``/``gaussian``: the volumes are the density divided by ``scale`` (default: the data
    set's peak, so intensities span [0, 1] and nothing is clipped). ``occupancy``: the mean number
    of localisations per occupied voxel, so that the summed occupancy still restores the count.
    """
    if method == "occupancy":
        return float(n_points) / max(int(n_occupied), 1)
    value = float(scale) if scale is not None else float(peak)
    if not value > 0:
        raise VqldmError("the localisation tables put no points inside the field of view")
    return value


def to_intensity(raw: np.ndarray, method: str, cpi: float) -> tuple[np.ndarray, float]:
    """The float32 volume in [0, 1] and the fraction of its density lost to clipping at 1."""
    if method == "occupancy":
        return raw.astype(np.float32), 0.0
    vol = raw / cpi
    total = float(vol.sum())
    clipped = float(np.clip(vol - 1.0, 0.0, None).sum())
    return np.clip(vol, 0.0, 1.0).astype(np.float32), clipped / total if total > 0 else 0.0
