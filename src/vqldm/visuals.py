"""Maximum-intensity projections (MIPs): pictures of sparse 3D volumes.

A thin filament vanishes in any single slice but shows in a MIP, so every picture vqldm
saves (TensorBoard, previews, reports) is a MIP along each axis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


RENDER_BLUR_PX = 1.0  # Gaussian rendering of localisation tables (pixels)


def _to_unit(vol: np.ndarray) -> np.ndarray:
    vol = np.nan_to_num(np.asarray(vol, dtype=np.float32))
    lo, hi = float(vol.min()), float(vol.max())
    if lo >= 0.0 and hi <= 1.0:
        return vol
    if lo >= -1.0 and hi <= 1.0:  # [-1,1] normalised data
        return (vol + 1.0) / 2.0
    return (vol - lo) / (hi - lo) if hi > lo else np.zeros_like(vol)


def mips(vol: np.ndarray) -> list[np.ndarray]:
    """The three axis MIPs of a (X,Y,Z) or (1,X,Y,Z) volume, as float arrays in [0,1]."""
    vol = np.asarray(vol)
    if vol.ndim == 4:
        vol = vol[0]
    if vol.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {vol.shape}")
    v = _to_unit(vol)
    return [v.max(axis=2), v.max(axis=1), v.max(axis=0)]  # XY (along z), XZ, YZ


def mip_row(vol: np.ndarray, pad: int = 2) -> np.ndarray:
    """One row image (H, W) in [0,1]: the three MIPs side by side."""
    planes = mips(vol)
    h = max(p.shape[0] for p in planes)
    cols = []
    for p in planes:
        canvas = np.zeros((h, p.shape[1]), np.float32)
        canvas[: p.shape[0]] = p
        cols.append(canvas)
        cols.append(np.full((h, pad), 0.5, np.float32))
    return np.concatenate(cols[:-1], axis=1)


def mip_grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """A grid image in [0,1]: ``rows[i][j]`` is a volume; each cell holds its three MIPs."""
    return image_grid([[mip_row(v, pad) for v in row] for row in rows], pad)


def render_points(points_nm: np.ndarray, lo, hi, pixel_nm: float, pad: int = 2) -> np.ndarray:
    """A localisation table rendered as SMLM users view it: the xy density over an xz strip, in [0,1].

    Each pixel counts the localisations in ``pixel_nm`` squares of the box ``[lo, hi)`` (nm), blurred by
    ``RENDER_BLUR_PX`` pixels (a Gaussian rendering, as ThunderSTORM's), shown with a square-root tone
    map up to the 99.5th percentile of the occupied pixels.
    """
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    bins = [max(1, int(np.ceil((hi[a] - lo[a]) / pixel_nm))) for a in range(3)]
    pts = np.asarray(points_nm, np.float64).reshape(-1, 3)
    xy = np.histogram2d(pts[:, 1], pts[:, 0], bins=(bins[1], bins[0]), range=((lo[1], hi[1]), (lo[0], hi[0])))[0]
    xz = np.histogram2d(pts[:, 2], pts[:, 0], bins=(bins[2], bins[0]), range=((lo[2], hi[2]), (lo[0], hi[0])))[0]
    from scipy.ndimage import gaussian_filter

    xy, xz = gaussian_filter(xy, RENDER_BLUR_PX), gaussian_filter(xz, RENDER_BLUR_PX)
    both = np.concatenate([xy, np.full((pad, bins[0]), np.nan), xz[::-1]], axis=0)
    occupied = both[np.isfinite(both) & (both > 0)]
    top = float(np.percentile(occupied, 99.5)) if occupied.size else 1.0
    img = np.sqrt(np.clip(np.nan_to_num(both, nan=0.0) / top, 0.0, 1.0))
    img[np.isnan(both)] = 1.0
    return img.astype(np.float32)


def image_grid(cells: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Images in [0,1] laid out in rows on a white background."""
    h = max(c.shape[0] for row in cells for c in row)
    w = max(c.shape[1] for row in cells for c in row)
    out_rows = []
    for row in cells:
        parts = []
        for c in row:
            canvas = np.zeros((h, w), np.float32)
            canvas[: c.shape[0], : c.shape[1]] = c
            parts.append(canvas)
            parts.append(np.ones((h, pad * 2), np.float32))
        out_rows.append(np.concatenate(parts[:-1], axis=1))
        out_rows.append(np.ones((pad * 2, out_rows[-1].shape[1]), np.float32))
    width = max(r.shape[1] for r in out_rows)
    out_rows = [np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=1.0) for r in out_rows[:-1]]
    return np.concatenate(out_rows, axis=0)


def save_png(image: np.ndarray, path: str | Path, min_size: int = 256) -> Path:
    """Write a [0,1] grayscale image as an 8-bit PNG, upscaled (nearest) so small volumes stay visible."""
    from PIL import Image

    img = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    scale = max(1, int(np.ceil(min_size / max(1, min(img.shape)))))
    scale = min(scale, 8)
    img = np.kron(img, np.ones((scale, scale), np.float32))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255).round().astype(np.uint8)).save(path)
    return path
