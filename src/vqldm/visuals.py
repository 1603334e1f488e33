"""Maximum-intensity projections (MIPs): pictures of sparse 3D volumes.

A thin filament vanishes in any single slice but shows in a MIP, so every picture vqldm
saves (TensorBoard, previews, reports) is a MIP along each axis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
    cells = [[mip_row(v, pad) for v in row] for row in rows]
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
