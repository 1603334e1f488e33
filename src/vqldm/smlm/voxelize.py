"""Localisations to voxels: occupancy, counts (density) or Gaussian splatting with a sigma in nm.

:func:`raw_density` gives localisations per voxel (``counts``), the same blurred by a Gaussian of
``sigma_nm`` per axis (``gaussian``; the blur reflects at the field's border, so the sum is kept),
or 1 where a voxel holds any localisation (``occupancy``). A data set is then divided by one
``counts_per_intensity`` scale, the same for every volume, so intensities keep the absolute
localisation density (the upstream converter normalises each volume on its own, which loses it).
The scale is recorded, and ``sum(intensity) * counts_per_intensity`` restores the localisation
count of a volume (:mod:`vqldm.smlm.points`).

The scale follows a rule (:func:`parse_scale`): ``p99.9`` (the default) is the 99.9th percentile of
the data set's occupied voxels, which puts filaments at the intensities the networks' foreground
threshold (0.1) expects; ``peak`` is the largest voxel (intensities within [0, 1], but sparse
filaments then sit mostly below 0.1); a number fixes it. The few voxels denser than the scale keep
intensities above 1 in the files, so that the files still restore every localisation; training
(``data.normalize: fixed``) clips them at 1, about 0.8 % of the density of synthetic microtubules.
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


SAMPLE_PER_VOLUME = 20_000  # occupied-voxel values kept per volume (seeded) for a percentile scale


def parse_scale(rule: str | float) -> tuple[str, float | None]:
    """``"peak"``, ``"pNN.N"`` (a percentile of occupied voxels) or a positive number, as (kind, value)."""
    text = str(rule).strip().lower()
    if text == "peak":
        return "peak", None
    try:
        if text.startswith("p"):
            q = float(text[1:])
            if 0 < q <= 100:
                return "percentile", q
        elif float(text) > 0:
            return "value", float(text)
    except ValueError:
        pass
    raise VqldmError(f"--scale {rule!r}: give peak, a percentile such as p99.9, or a positive number of "
                     f"localisations per unit intensity")


def occupied_sample(raw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Up to ``SAMPLE_PER_VOLUME`` values of the occupied voxels (for a percentile scale)."""
    vals = raw[raw > raw.max() * 1e-6] if raw.max() > 0 else raw[:0].ravel()
    return vals if vals.size <= SAMPLE_PER_VOLUME else rng.choice(vals, SAMPLE_PER_VOLUME, replace=False)


def counts_per_intensity(method: str, rule: str | float, peak: float, values: np.ndarray, n_points: int,
                         n_occupied: int) -> float:
    """Localisations per unit of summed intensity for a data set.

    ``counts``/``gaussian``: the volumes are the density divided by the scale its ``rule`` gives
    (:func:`parse_scale`; ``values`` are occupied voxels of the whole data set). ``occupancy``: the
    mean number of localisations per occupied voxel, so that the summed occupancy restores the count.
    """
    if method == "occupancy":
        return float(n_points) / max(int(n_occupied), 1)
    kind, v = parse_scale(rule)
    value = v if kind == "value" else peak if kind == "peak" else \
        (float(np.percentile(values, v)) if values.size else 0.0)
    if not value > 0:
        raise VqldmError("the localisation tables put no points inside the field of view")
    return float(value)


def to_intensity(raw: np.ndarray, method: str, cpi: float) -> tuple[np.ndarray, float]:
    """The float32 volume (density / ``cpi``, not clipped) and the share of its density above 1."""
    if method == "occupancy":
        return raw.astype(np.float32), 0.0
    vol = raw / cpi
    total = float(vol.sum())
    above = float(np.clip(vol - 1.0, 0.0, None).sum())
    return vol.astype(np.float32), above / total if total > 0 else 0.0
