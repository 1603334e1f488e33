"""The voxel grid in nanometres that ties localisation tables to volumes, both ways.

Voxel ``(i, j, k)`` spans ``[origin + index * voxel, origin + (index + 1) * voxel)`` on each axis, so
a point at continuous voxel coordinate ``c = (p - origin) / voxel`` lies in voxel ``floor(c)`` and
voxel centres sit at ``index + 0.5``. There is no hidden offset or stretch: the same grid maps a
table to a volume and a volume back to a table, and anisotropic voxels (thin z slabs) are the
normal case. Volumes store the spacing in micrometres (NIfTI ``xyzt_units`` micron).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from vqldm.errors import VqldmError


@dataclass(frozen=True)
class Grid:
    origin_nm: tuple[float, float, float]  # the outer corner of voxel (0, 0, 0) (nm)
    voxel_nm: tuple[float, float, float]  # voxel size along x, y, z (nm)
    shape: tuple[int, int, int]  # voxels along x, y, z

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise VqldmError(f"grid shape must be three positive integers, got {list(self.shape)}")
        if len(self.voxel_nm) != 3 or not all(math.isfinite(v) and v > 0 for v in self.voxel_nm):
            raise VqldmError(f"voxel size must be three positive numbers (nm), got {list(self.voxel_nm)}")

    @classmethod
    def from_box(cls, lo, hi, padding=(0.0, 0.0, 0.0), voxel_nm=None, shape=None) -> Grid:
        """The grid over the box ``[lo - padding, hi + padding]`` (nm), by voxel size or by shape.

        With ``shape`` the voxel size is the padded extent over the shape. With ``voxel_nm`` the
        shape is the extent over the voxel size rounded up, and the box grows at its far end.
        """
        lo, hi, pad = (np.asarray(v, np.float64).reshape(3) for v in (lo, hi, padding))
        if (pad < 0).any():
            raise VqldmError(f"padding must be >= 0 nm, got {pad.tolist()}")
        extent = hi - lo + 2 * pad
        if (extent <= 0).any():
            raise VqldmError(f"the field of view {extent.tolist()} nm is empty on some axis; give --fov")
        if (shape is None) == (voxel_nm is None):
            raise VqldmError("give exactly one of a voxel size (--voxel-size, nm) or a grid shape (--shape)")
        if shape is not None:
            shp = np.asarray(shape, np.int64).reshape(3)
            vox = extent / np.maximum(shp, 1)
        else:
            vox = np.asarray(voxel_nm, np.float64).reshape(3)
            if (vox <= 0).any():
                raise VqldmError(f"voxel size must be > 0 nm, got {vox.tolist()}")
            shp = np.ceil(extent / vox - 1e-9).astype(np.int64)
        return cls(tuple(float(v) for v in lo - pad), tuple(float(v) for v in vox), tuple(int(s) for s in shp))

    @classmethod
    def from_dict(cls, d: dict, where: str = "grid") -> Grid:
        try:
            return cls(tuple(float(v) for v in d["origin_nm"]), tuple(float(v) for v in d["voxel_nm"]),
                       tuple(int(v) for v in d["shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise VqldmError(f"{where}: not a grid (needs origin_nm, voxel_nm, shape): {e}") from None

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @property
    def spacing_um(self) -> tuple[float, float, float]:
        return tuple(v * 1e-3 for v in self.voxel_nm)

    def affine_um(self) -> np.ndarray:
        """The NIfTI voxel-to-world matrix in micrometres: voxel centres at ``origin + (index + 0.5) * voxel``."""
        a = np.diag([v * 1e-3 for v in self.voxel_nm] + [1.0])
        a[:3, 3] = [(o + 0.5 * v) * 1e-3 for o, v in zip(self.origin_nm, self.voxel_nm)]
        return a

    @property
    def diagonal_nm(self) -> float:
        return float(np.linalg.norm(self.voxel_nm))

    def to_voxel(self, points_nm: np.ndarray) -> np.ndarray:
        """Continuous voxel coordinates of ``(N, 3)`` points in nm."""
        return (np.asarray(points_nm, np.float64) - np.asarray(self.origin_nm)) / np.asarray(self.voxel_nm)

    def to_nm(self, coords: np.ndarray) -> np.ndarray:
        """Points in nm of ``(N, 3)`` continuous voxel coordinates."""
        return np.asarray(self.origin_nm) + np.asarray(coords, np.float64) * np.asarray(self.voxel_nm)

    def inside(self, points_nm: np.ndarray) -> np.ndarray:
        """Which points lie in the grid's field of view."""
        c = self.to_voxel(points_nm)
        return np.all((c >= 0) & (c < np.asarray(self.shape)), axis=1)
