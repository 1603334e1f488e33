"""Reconstruction metrics on [0,1]-scaled volumes: PSNR, SSIM (MONAI) and foreground Dice."""

from __future__ import annotations

import torch
from monai.metrics import SSIMMetric


def psnr(rec: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean PSNR in dB over the batch; a perfect reconstruction is capped at 100 dB."""
    mse = ((rec.float() - target.float()) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse.clamp_min(1e-10))).clamp_max(100.0).mean()


def foreground_dice(rec: torch.Tensor, target: torch.Tensor, threshold: float) -> torch.Tensor:
    """Dice of the masks ``> threshold``; 1 where both are empty (nothing to find, nothing found)."""
    p = (rec > threshold).flatten(1).float()
    t = (target > threshold).flatten(1).float()
    inter = (p * t).sum(1)
    denom = p.sum(1) + t.sum(1)
    dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
    return dice.mean()


_SSIM_CACHE: dict[tuple, SSIMMetric] = {}


def ssim(rec: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean 3D SSIM (Gaussian window, MONAI); the window shrinks for small or thin volumes."""
    win = tuple(min(11, s if s % 2 == 1 else s - 1) for s in rec.shape[2:])
    key = (win, data_range)
    if key not in _SSIM_CACHE:
        _SSIM_CACHE[key] = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=win)
    return _SSIM_CACHE[key](rec.float().clamp(0, data_range), target.float()).mean()


def reconstruction_metrics(rec_unit: torch.Tensor, target_unit: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """PSNR, SSIM and foreground Dice of volumes already mapped to [0, 1]."""
    rec_unit = rec_unit.float().clamp(0, 1)
    target_unit = target_unit.float()
    return {
        "psnr": psnr(rec_unit, target_unit),
        "ssim": ssim(rec_unit, target_unit),
        "dice": foreground_dice(rec_unit, target_unit, threshold),
    }


def seam_ratio(vol, borders: list[list[int]]) -> float:
    """Mean absolute step between neighbouring voxels across the planes in ``borders`` (per axis, the
    index ``i`` of each plane between voxels ``i - 1`` and ``i``: where windows begin or end) over the
    same across every other plane. About 1 without seams; a visible seam raises it."""
    v = torch.as_tensor(vol).float()
    at, off = [], []
    for axis, planes in enumerate(borders):
        d = v.diff(dim=axis).abs().movedim(axis, 0).flatten(1).mean(1)  # d[i-1]: the step across plane i
        mask = torch.zeros(len(d), dtype=torch.bool)
        for i in planes:
            if 0 < i < v.shape[axis]:
                mask[i - 1] = True
        at.append(d[mask])
        off.append(d[~mask])
    border, interior = torch.cat(at), torch.cat(off)
    if len(border) == 0 or float(interior.mean()) == 0:
        return 1.0
    return float(border.mean() / interior.mean())
