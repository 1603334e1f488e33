"""The 3D data pipeline on MONAI transforms and datasets.

Training: load -> (resize) -> normalise -> pad to the patch -> foreground-biased random patches ->
(flips, in-plane rot90). Random crops of microtubule volumes are mostly empty, so a configurable
share of patches is centred on foreground voxels (MONAI ``RandCropByPosNegLabeld``).

Validation: deterministic tiles that cover every volume (a fixed, evenly chosen subset of at most
``data.max_val_patches``), so validation losses are comparable across epochs and runs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor
from monai.data.image_reader import ImageReader

from vqldm.config import Config
from vqldm.data.io import NIFTI_SUFFIXES, TIFF_SUFFIXES, Volume, list_volumes, read_volume
from vqldm.data.units import VoxelGrid
from vqldm.errors import VqldmError
from vqldm.smlm.dataset import find_info

log = logging.getLogger("vqldm")

FG_KEY = "fg"
FG_IDX, BG_IDX = "fg_fg_indices", "fg_bg_indices"


def to_unit(x, intensity_range):
    """Network range (``intensity_range``) -> [0, 1] units, for tensors or arrays."""
    lo, hi = intensity_range
    return (x - lo) / (hi - lo)


@dataclass
class Normalization:
    """How raw intensities become network inputs; stored in every checkpoint."""

    intensity_range: list[float]  # [0, 1] or [-1, 1]
    clip_percentiles: list[float] | None
    method: str = "per_volume"  # per_volume: min-max each volume; fixed: keep intensities, clip to [0, 1]

    def to_dict(self) -> dict:
        return {"intensity_range": list(self.intensity_range), "clip_percentiles": self.clip_percentiles,
                "method": self.method}

    @classmethod
    def from_dict(cls, stored: dict) -> Normalization:
        """The normalisation a checkpoint recorded (older checkpoints: per-volume min-max)."""
        method = "fixed" if stored.get("method") == "fixed" else "per_volume"
        return cls(list(stored["intensity_range"]), stored.get("clip_percentiles"), method)

    def unit(self, arr: np.ndarray) -> np.ndarray:
        """A raw volume -> [0, 1] float32, by this normalisation's method."""
        if self.method == "fixed":
            return np.clip(np.asarray(arr, np.float32), 0.0, 1.0)
        return normalize_unit(arr, self.clip_percentiles)

    def to_unit(self, x):
        """Network range -> [0, 1] (for metrics, pictures and written volumes)."""
        return to_unit(x, self.intensity_range)


def normalize_method(cfg: Config) -> str:
    """``data.normalize`` resolved: ``auto`` is ``fixed`` for a data set that ``vqldm voxelize`` wrote (its
    intensities share one density scale, which per-volume min-max would throw away), else ``per_volume``."""
    if cfg.data.normalize != "auto":
        return cfg.data.normalize
    return "fixed" if find_info(cfg.data.train_data_dir) is not None else "per_volume"


def normalization_of(cfg: Config, stored: dict | None = None) -> Normalization:
    """The config's normalisation, or the one a checkpoint recorded (``stored``), which wins."""
    if stored is None:
        return Normalization(list(cfg.data.intensity_range), cfg.data.clip_percentiles, normalize_method(cfg))
    return Normalization.from_dict(stored)


def normalize_unit(arr: np.ndarray, clip_percentiles: Sequence[float] | None = None) -> np.ndarray:
    """Per-volume min-max to [0, 1]. A constant volume becomes all zeros, never NaN."""
    arr = np.asarray(arr, dtype=np.float32)
    if clip_percentiles is not None:
        lo, hi = np.percentile(arr, clip_percentiles)
        arr = np.clip(arr, lo, hi)
    lo, hi = float(arr.min()), float(arr.max())
    if not hi > lo:
        return np.zeros_like(arr)
    return (arr - lo) / (hi - lo)


class LoadVolumed(mt.MapTransform):
    """Read ``d[key]`` (a path) into a channel-first float32 array (1, X, Y, Z), resampled to the voxel
    size ``spacing`` (``data.resample_spacing``) where given."""

    def __init__(self, keys, spacing: Sequence[float] | None = None):
        super().__init__(keys)
        self.spacing = None if spacing is None else [float(s) for s in spacing]

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            v = read_volume(d[key])
            d[key] = v.array[None] if self.spacing is None else resample(v, self.spacing)
        return d


def resample(v: Volume, spacing: Sequence[float]) -> np.ndarray:
    """``v`` on a grid of voxel size ``spacing`` (its unit), as (1, X, Y, Z) float32: MONAI ``Spacing``
    (trilinear) on the volume's affine, so orientation and origin stay."""
    if v.grid.same_spacing(VoxelGrid(tuple(spacing), v.unit), rtol=1e-6):
        return v.array[None]
    img = MetaTensor(torch.as_tensor(v.array[None]), affine=torch.as_tensor(v.grid.affine_array()))
    out = mt.Spacing(pixdim=spacing, mode="bilinear", padding_mode="border")(img)
    return np.ascontiguousarray(np.asarray(out.detach().cpu().numpy(), dtype=np.float32))


class VolumeReader(ImageReader):
    """A MONAI reader for every format vqldm reads and writes, TIFF and OME-TIFF included (MONAI's own
    readers need ITK for 3D TIFF), with the voxel spacing in the affine:
    ``LoadImage(reader=VolumeReader())(path).pixdim`` is the file's spacing, in ``meta["spacing_unit"]``."""

    def verify_suffix(self, filename) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return all(str(n).lower().endswith(NIFTI_SUFFIXES + TIFF_SUFFIXES) for n in names)

    def read(self, data, **kwargs):
        names = [data] if isinstance(data, (str, Path)) else list(data)
        vols = [read_volume(n) for n in names]
        return vols[0] if len(vols) == 1 else vols

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        vols = img if isinstance(img, list) else [img]
        affine = vols[0].grid.affine_array()
        meta = {"affine": affine, "original_affine": affine.copy(), "spatial_shape": np.asarray(vols[0].array.shape),
                "original_channel_dim": float("nan") if len(vols) == 1 else 0, "space": "RAS",
                "spacing_unit": vols[0].unit}
        data = vols[0].array if len(vols) == 1 else np.stack([v.array for v in vols])
        return data, meta


class NormalizeVolumed(mt.MapTransform):
    """Min-max to [0,1]; add a foreground mask (in [0,1] units); rescale to the configured range."""

    def __init__(self, keys, norm: Normalization, fg_threshold: float | None):
        super().__init__(keys)
        self.norm, self.fg_threshold = norm, fg_threshold

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = self.norm.unit(np.asarray(d[key]))
            if self.fg_threshold is not None:
                d[FG_KEY] = (x > self.fg_threshold).astype(np.uint8)
            lo, hi = self.norm.intensity_range
            d[key] = (x * (hi - lo) + lo).astype(np.float32)
        return d


def _deterministic_transforms(cfg: Config, norm: Normalization, with_fg: bool) -> list:
    ts: list = [LoadVolumed(keys="image", spacing=cfg.data.resample_spacing)]
    if cfg.data.voxel_resize is not None:
        ts.append(mt.Resized(keys="image", spatial_size=cfg.data.voxel_resize, mode="trilinear"))
        ts.append(mt.EnsureTyped(keys="image", data_type="numpy", track_meta=False))
    ts.append(NormalizeVolumed(keys="image", norm=norm,
                               fg_threshold=cfg.data.foreground_threshold if with_fg else None))
    pad_keys = ["image", FG_KEY] if with_fg else ["image"]
    ts.append(mt.SpatialPadd(keys=pad_keys, spatial_size=cfg.data.patch_size))
    if with_fg:
        ts.append(mt.FgBgToIndicesd(keys=FG_KEY))
    # plain tensors from here on: MetaTensor bookkeeping slows every op and trips torch.compile
    ts.append(mt.EnsureTyped(keys="image", data_type="tensor", track_meta=False))
    return ts


def train_transforms(cfg: Config, norm: Normalization, augment: bool | None = None) -> mt.Compose:
    """MONAI transforms for training patches; the deterministic prefix is what CacheDataset caches."""
    augment = cfg.data.augmentation if augment is None else augment
    ratio = cfg.data.foreground_crop_ratio
    ts = _deterministic_transforms(cfg, norm, with_fg=True)
    ts.append(mt.RandCropByPosNegLabeld(
        keys="image", label_key=FG_KEY, spatial_size=cfg.data.patch_size,
        pos=ratio, neg=1.0 - ratio, num_samples=1,
        fg_indices_key=FG_IDX, bg_indices_key=BG_IDX))
    ts.append(mt.DeleteItemsd(keys=[FG_KEY, FG_IDX, BG_IDX]))
    if augment:
        for axis in range(3):
            ts.append(mt.RandFlipd(keys="image", prob=0.5, spatial_axis=axis))
        px, py, _ = cfg.data.patch_size
        if px == py:  # rot90 in xy keeps the shape only for square patches (filaments lie in xy)
            ts.append(mt.RandRotate90d(keys="image", prob=0.5, max_k=3, spatial_axes=(0, 1)))
    ts.append(mt.EnsureTyped(keys="image", data_type="tensor", dtype=torch.float32, track_meta=False))
    return mt.Compose(ts)


def tile_starts(length: int, patch: int) -> list[int]:
    """Evenly spaced window starts covering [0, length) with windows of ``patch``."""
    if length <= patch:
        return [0]
    n = math.ceil(length / patch)
    return sorted({round(i * (length - patch) / (n - 1)) for i in range(n)})


class TileDataset(torch.utils.data.Dataset):
    """Fixed validation tiles: (volume, start) pairs over cached, normalised volumes."""

    def __init__(self, volumes: Dataset, patch: Sequence[int], max_tiles: int):
        self.volumes, self.patch = volumes, list(patch)
        tiles = []
        for i in range(len(volumes)):
            shape = volumes[i]["image"].shape[1:]
            for sx in tile_starts(shape[0], patch[0]):
                for sy in tile_starts(shape[1], patch[1]):
                    for sz in tile_starts(shape[2], patch[2]):
                        tiles.append((i, sx, sy, sz))
        if len(tiles) > max_tiles:  # evenly chosen, so every volume stays represented
            keep = np.linspace(0, len(tiles) - 1, max_tiles).round().astype(int)
            tiles = [tiles[k] for k in sorted(set(keep.tolist()))]
        self.tiles = tiles

    def __len__(self):
        return len(self.tiles)

    def __getitem__(self, k):
        i, sx, sy, sz = self.tiles[k]
        px, py, pz = self.patch
        img = torch.as_tensor(np.asarray(self.volumes[i]["image"]))[:, sx:sx + px, sy:sy + py, sz:sz + pz]
        return {"image": img.float().contiguous()}


@dataclass
class DataSummary:
    files: list[Path]
    shapes: list[tuple[int, ...]]
    spacing: tuple[float, float, float]  # the networks' voxel size (after voxel_resize / resample_spacing), in ``unit``
    min: float
    max: float
    skipped: list[str]
    constant: list[str]
    unit: str = "unknown"  # vqldm.data.units name: "micron", "mm", "meter" or "unknown"
    grid: VoxelGrid = VoxelGrid()  # spacing, unit and the first file's (NIfTI) affine: into the checkpoints

    def meta(self) -> dict:
        """The checkpoint's ``data`` entries for the voxel grid (``spacing``, ``spacing_unit``, ``affine``)."""
        return self.grid.to_meta()


def network_grid(v: Volume, voxel_resize=None, resample_spacing=None) -> VoxelGrid:
    """The voxel grid the networks see for ``v``: its own, resized to ``data.voxel_resize``, or
    resampled to ``data.resample_spacing``."""
    if resample_spacing is not None:
        return VoxelGrid(tuple(float(s) for s in resample_spacing), v.unit, v.grid.affine)
    return v.grid if voxel_resize is None else v.grid.resized(v.array.shape, voxel_resize)


def check_same_grid(grid: VoxelGrid, ref: VoxelGrid, path: Path, ref_path: Path, how: str = "") -> None:
    """One voxel size for all data, else one line naming the file and both spacings (``how``: the
    config key that made the grid, if any)."""
    if not grid.same_spacing(ref):
        what = f"after data.{how} " if how else ""
        raise VqldmError(f"{path}: voxel spacing {what}{grid.describe()} differs from {ref.describe()} of "
                         f"{ref_path}; vqldm learns one voxel size: resample the files to one spacing first "
                         f"(or set data.resample_spacing)")


def scan_data_dir(cfg: Config, key: str, progress: bool = False) -> DataSummary:
    """:func:`scan_volumes` of ``data.<key>`` (train_data_dir or val_data_dir) with the config's data
    options: its volume limit and the networks' voxel grid."""
    d = cfg.data
    limit = d.max_train_volumes if key == "train_data_dir" else d.max_val_volumes
    return scan_volumes(getattr(d, key), key, d.skip_unreadable, progress, d.voxel_resize, d.resample_spacing,
                        limit, d.class_folders)


def grid_key(voxel_resize=None, resample_spacing=None) -> str:
    """The config key that sets the networks' voxel grid, if any (for messages)."""
    return "resample_spacing" if resample_spacing is not None else "voxel_resize" if voxel_resize is not None else ""


def scan_volumes(directory: str | Path, key: str, skip_unreadable: bool = False, progress: bool = False,
                 voxel_resize=None, resample_spacing=None, limit: int | None = None,
                 nested: bool = False) -> DataSummary:
    """Read every volume once before training: a corrupt file is named now, not hours later; so is a
    file whose voxel spacing (after ``voxel_resize`` or ``resample_spacing``) differs from the first one's.

    ``limit``: only the first that many volumes (by name) are used; ``nested``: the volumes of its
    subfolders (``data.class_folders``)."""
    files = list_volumes(directory, nested)
    if not files:
        where = "the class subfolders of " if nested else ""
        raise VqldmError(f"data.{key}: no volumes (.nii, .nii.gz, .tif, .tiff) in {where}{directory}")
    if limit is not None and len(files) > limit:
        log.info("data.%s: using the first %d of %d volumes in %s (data.max_%s_volumes)", key, limit, len(files),
                 directory, key.split("_")[0])
        files = files[:limit]
    good, shapes, skipped, constant = [], [], [], []
    lo, hi, grid = math.inf, -math.inf, None
    it = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc=f"checking {key}", unit="vol", leave=False)
    for f in it:
        try:
            v: Volume = read_volume(f)
        except VqldmError as e:
            if not skip_unreadable:
                raise
            log.warning("skipping unreadable volume (data.skip_unreadable): %s", e)
            skipped.append(str(e))
            continue
        g = network_grid(v, voxel_resize, resample_spacing)
        grid = grid or g
        check_same_grid(g, grid, f, good[0] if good else f, grid_key(voxel_resize, resample_spacing))
        good.append(f)
        shapes.append(tuple(v.array.shape))
        vmin, vmax = float(v.array.min()), float(v.array.max())
        if vmax <= vmin:
            constant.append(f.name)
        lo, hi = min(lo, vmin), max(hi, vmax)
    if not good:
        raise VqldmError(f"data.{key}: no readable volumes in {directory}")
    if constant:
        log.warning("%d constant volume(s) in %s (they normalise to all zeros): %s",
                    len(constant), directory, ", ".join(constant[:5]))
    return DataSummary(good, shapes, grid.spacing, lo, hi, skipped, constant, grid.unit, grid)


def _cache_workers(cfg: Config) -> int:
    return max(1, min(cfg.data.num_workers, 4))


class RepeatDataset(torch.utils.data.Dataset):
    """Each volume ``times`` per epoch; every access draws a fresh random patch."""

    def __init__(self, base: Dataset, times: int):
        self.base, self.times = base, times

    def __len__(self):
        return len(self.base) * self.times

    def __getitem__(self, i):
        return self.base[i % len(self.base)]


def train_dataset(cfg: Config, files: list[Path], augment: bool | None = None,
                  norm: Normalization | None = None) -> Dataset:
    """``data.patches_per_volume`` random patches of each volume per epoch (batch size stays the batch size).

    ``norm``: a checkpoint's normalisation (default: the config's).
    """
    data = [{"image": str(f)} for f in files]
    base = CacheDataset(data, train_transforms(cfg, norm or normalization_of(cfg), augment), cache_rate=cfg.data.cache_rate,
                        num_workers=_cache_workers(cfg), progress=False)
    return RepeatDataset(base, cfg.data.patches_per_volume)


def val_dataset(cfg: Config, files: list[Path], norm: Normalization | None = None) -> TileDataset:
    data = [{"image": str(f)} for f in files]
    vols = CacheDataset(data, mt.Compose(_deterministic_transforms(cfg, norm or normalization_of(cfg), with_fg=False)),
                        cache_rate=cfg.data.cache_rate, num_workers=_cache_workers(cfg), progress=False)
    return TileDataset(vols, cfg.data.patch_size, cfg.data.max_val_patches)


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, pin_memory: bool,
                sampler=None, drop_last: bool = False) -> DataLoader:
    """MONAI DataLoader (it seeds worker RNGs and flattens multi-patch samples)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last,
                      persistent_workers=False)
