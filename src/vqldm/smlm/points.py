"""Volumes to localisations: points drawn in proportion to voxel intensity, in nm.

Each point picks a voxel with probability proportional to its intensity (voxels at or below
``threshold`` are left out) and a uniform position inside it. Voxels are picked by systematic
(low-variance) sampling: one uniform offset, then ``N`` evenly spaced picks along the cumulative
intensity, so a voxel whose share is ``N p`` gets ``floor(N p)`` or ``ceil(N p)`` points. Each voxel's
expected count is the same as for independent draws, but the multinomial noise (which would shift a
volume's mean position by about 0.15 voxel at 10k points) is gone. Each point then is mapped to nm by the same
:class:`~vqldm.smlm.grid.Grid` that voxelised the data: no z offset and no stretch. The number of
points is ``round(sum(intensity) * counts_per_intensity)`` (the density the data set recorded), or a
fixed number.
"""

from __future__ import annotations

import numpy as np

from vqldm.errors import VqldmError
from vqldm.smlm.grid import Grid


def point_count(volume: np.ndarray, counts_per_intensity: float, threshold: float = 0.0) -> int:
    """The localisations a volume stands for at the recorded density."""
    v = np.asarray(volume, np.float64)
    return int(round(float(v[v > threshold].sum()) * float(counts_per_intensity)))


def volume_to_points(volume: np.ndarray, grid: Grid, n_points: int, rng: np.random.Generator,
                     threshold: float = 0.0) -> np.ndarray:
    """``n_points`` localisations (``(N, 3)`` float64 nm) drawn from ``volume`` on ``grid``."""
    v = np.asarray(volume, np.float64)
    if tuple(v.shape) != tuple(grid.shape):
        raise VqldmError(f"volume shape {list(v.shape)} differs from the grid's {list(grid.shape)}")
    w = np.where(v > threshold, v, 0.0).ravel()
    total = float(w.sum())
    if n_points <= 0 or total <= 0:
        return np.zeros((0, 3), np.float64)
    cdf = np.cumsum(w / total)
    picks = (rng.uniform() + np.arange(int(n_points))) / int(n_points)
    idx = np.minimum(np.searchsorted(cdf, picks, side="right"), w.size - 1)
    coords = np.stack(np.unravel_index(idx, grid.shape), axis=1).astype(np.float64)
    coords += rng.uniform(size=coords.shape)
    return grid.to_nm(coords)
