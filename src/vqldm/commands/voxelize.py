"""``vqldm voxelize``: a folder of localisation tables -> ``train/`` and ``val/`` volumes + ``dataset_info.json``.

Three passes over the tables, so that nothing is written until every table has been read and
checked: (1) read and validate each table and find the field of view, (2) voxelise to find the data
set's density scale, (3) write the volumes into a hidden staging folder. Only then are ``train/`` and
``val/`` moved into place and ``dataset_info.json`` written last; a run that fails leaves no
half-written data set behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vqldm.data.io import list_volumes, write_volume
from vqldm.errors import VqldmError
from vqldm.files import atomic_write_bytes, unique_stems
from vqldm.smlm import voxelize as V
from vqldm.smlm.dataset import FORMAT, INFO_NAME
from vqldm.smlm.grid import Grid
from vqldm.smlm.tables import CSV_SUFFIXES, HDF5_SUFFIXES, list_tables, read_table

DEFAULT_SIGMA_VOXELS = 1.5  # gaussian splatting's default sigma, in voxels per axis (the users' data: docs/smlm.md)


@dataclass(frozen=True)
class VoxelizeOptions:
    inputs: str
    out_dir: Path
    method: str = "gaussian"
    sigma_nm: list[float] | None = None  # gaussian: one value or x, y, z (nm); default 1.5 voxels per axis
    fov_nm: list[float] | None = None  # default: the bounding box of all tables
    origin_nm: list[float] | None = None  # default: 0 with --fov, else the tables' minimum
    padding_nm: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    voxel_nm: list[float] | None = None
    shape: list[int] | None = None
    per_file_origin: bool = False  # shift each table so that its own minimum sits at the origin
    drop_outside: bool = False  # drop points outside the field of view instead of refusing the table
    scale: str = "p99.9"  # counts per unit intensity: peak, a percentile of occupied voxels (pNN.N) or a number
    val_fraction: float = 0.2
    seed: int = 0
    key: str | None = None  # HDF5 dataset name
    progress: bool = True


def _bar(items, desc: str, progress: bool):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="table")


def _load(path: Path, opts: VoxelizeOptions) -> tuple[np.ndarray, np.ndarray]:
    """One table and the shift applied to it (nm)."""
    pts = read_table(path, opts.key)
    shift = -pts.min(axis=0) if opts.per_file_origin else np.zeros(3)
    return pts + shift, shift


def _grid(tables: list[Path], opts: VoxelizeOptions) -> Grid:
    """Pass 1: every table read and checked; the grid from --fov or from the tables' bounding box."""
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for path in _bar(tables, "voxelize 1/3: read", opts.progress):
        pts, _ = _load(path, opts)
        lo, hi = np.minimum(lo, pts.min(axis=0)), np.maximum(hi, pts.max(axis=0))
    if opts.fov_nm is not None:
        lo = np.asarray(opts.origin_nm if opts.origin_nm is not None else [0.0, 0.0, 0.0], np.float64)
        hi = lo + np.asarray(opts.fov_nm, np.float64)
    else:
        lo = np.asarray(opts.origin_nm, np.float64) if opts.origin_nm is not None else lo
        hi = np.nextafter(hi, np.inf)  # the largest coordinate falls inside the last voxel
    return Grid.from_box(lo, hi, opts.padding_nm, voxel_nm=opts.voxel_nm, shape=opts.shape)


def _inside(pts: np.ndarray, path: Path, grid: Grid, drop: bool) -> np.ndarray:
    keep = grid.inside(pts)
    if not keep.all() and not drop:
        raise VqldmError(f"{path}: {int((~keep).sum())} of {len(pts)} localisations lie outside the field of view "
                         f"(origin {grid.origin_nm} nm, {grid.shape} voxels of {grid.voxel_nm} nm); "
                         f"widen --fov/--padding or pass --drop-outside")
    return pts[keep]


def _scale(tables: list[Path], grid: Grid, opts: VoxelizeOptions) -> float:
    """Pass 2: the data set's counts per unit intensity (see :func:`vqldm.smlm.voxelize.counts_per_intensity`)."""
    if V.parse_scale(opts.scale)[0] == "value" and opts.method != "occupancy":
        return V.counts_per_intensity(opts.method, opts.scale, 0.0, np.zeros(0), 0, 0)
    peak, n_points, n_occupied, values = 0.0, 0, 0, []
    rng = np.random.default_rng(opts.seed)
    for path in _bar(tables, "voxelize 2/3: scale", opts.progress):
        pts = _inside(_load(path, opts)[0], path, grid, opts.drop_outside)
        raw = V.raw_density(pts, grid, opts.method, opts.sigma_nm)
        peak, n_points, n_occupied = max(peak, float(raw.max())), n_points + len(pts), n_occupied + int((raw > 0).sum())
        values.append(V.occupied_sample(raw, rng))
    return V.counts_per_intensity(opts.method, opts.scale, peak, np.concatenate(values), n_points, n_occupied)


def split_names(stems: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Seeded train/val split: each stem -> "train" or "val" (at least one of each when possible)."""
    if not 0.0 <= val_fraction < 1.0:
        raise VqldmError(f"--val-fraction {val_fraction}: must lie in [0, 1)")
    n_val = int(round(val_fraction * len(stems)))
    if val_fraction > 0 and len(stems) >= 2:
        n_val = min(max(n_val, 1), len(stems) - 1)
    order = np.random.default_rng(seed).permutation(len(stems))
    val = {stems[i] for i in order[:n_val]}
    return {s: ("val" if s in val else "train") for s in stems}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise VqldmError(f"voxelize: output path {out} exists and is not a folder")
    if (out / INFO_NAME).exists():
        raise VqldmError(f"voxelize: {out / INFO_NAME} already exists; refusing to overwrite (choose a new --out)")
    for split in ("train", "val"):
        if (out / split).exists() and any((out / split).iterdir()):
            raise VqldmError(f"voxelize: {out / split} is not empty; refusing to overwrite (choose a new --out)")


def _write(tables, stems, split, grid, cpi, opts: VoxelizeOptions, stage: Path) -> dict:
    """Pass 3: write each volume into the staging folder; returns the per-volume records."""
    files = {}
    for path, stem in _bar(list(zip(tables, stems)), "voxelize 3/3: write", opts.progress):
        pts, shift = _load(path, opts)
        n_in = len(pts)
        pts = _inside(pts, path, grid, opts.drop_outside)
        vol, above = V.to_intensity(V.raw_density(pts, grid, opts.method, opts.sigma_nm), opts.method, cpi)
        rel = f"{split[stem]}/{stem}.nii.gz"
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        write_volume(stage / rel, vol, grid.spacing_um, "micron", grid.affine_um())
        files[rel] = {"source": str(path.resolve()), "n_localisations": len(pts), "n_outside_dropped": n_in - len(pts),
                      "shift_nm": [float(v) for v in shift], "above_one_fraction": round(above, 6)}
    return files


def voxelize_tables(opts: VoxelizeOptions) -> dict:
    """Run the three passes and write OUT/train, OUT/val and OUT/dataset_info.json; returns the info."""
    V.check_method(opts.method, opts.sigma_nm if opts.sigma_nm is not None or opts.method != "gaussian" else [1.0])
    V.parse_scale(opts.scale)
    out = Path(opts.out_dir)
    _check_out(out)
    tables = list_tables(opts.inputs)
    stems = unique_stems(tables, CSV_SUFFIXES + HDF5_SUFFIXES, f"--input {opts.inputs}")
    grid = _grid(tables, opts)
    if opts.method == "gaussian" and opts.sigma_nm is None:
        opts = replace(opts, sigma_nm=[DEFAULT_SIGMA_VOXELS * v for v in grid.voxel_nm])
    cpi = _scale(tables, grid, opts)
    split = split_names(stems, opts.val_fraction, opts.seed)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".voxelize-partial-{os.getpid()}"
    try:
        files = _write(tables, stems, split, grid, cpi, opts, stage)
        info = _info(opts, grid, cpi, files)
        for name in ("train", "val"):
            if (stage / name).is_dir():
                (out / name).mkdir(exist_ok=True)
                for f in sorted((stage / name).iterdir()):
                    os.replace(f, out / name / f.name)
        atomic_write_bytes(out / INFO_NAME, (json.dumps(info, indent=2) + "\n").encode("utf-8"))
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # only this run's own staging folder
    return info


def _info(opts: VoxelizeOptions, grid: Grid, cpi: float, files: dict) -> dict:
    sigma = None if opts.sigma_nm is None else [float(v) for v in np.broadcast_to(opts.sigma_nm, (3,))]
    return {
        "format": FORMAT, "version": 1,
        "grid": grid.to_dict(), "spacing_unit_in_files": "micron", "coordinate_unit": "nm",
        "method": opts.method, "sigma_nm": sigma if opts.method == "gaussian" else None,
        "counts_per_intensity": cpi, "scale_rule": str(opts.scale),
        "above_one_fraction": _above_one(files),
        "per_file_origin": opts.per_file_origin, "padding_nm": [float(v) for v in opts.padding_nm],
        "split": {"seed": opts.seed, "val_fraction": opts.val_fraction,
                  "train": sum(k.startswith("train/") for k in files), "val": sum(k.startswith("val/") for k in files)},
        "files": files,
    }


def _above_one(files: dict) -> float:
    """The share of the data set's density above intensity 1 (kept in the files; training clips it)."""
    n = sum(r["n_localisations"] for r in files.values())
    return round(sum(r["above_one_fraction"] * r["n_localisations"] for r in files.values()) / max(n, 1), 6)


def summary_lines(out: Path, info: dict) -> dict[str, object]:
    g = info["grid"]
    return {
        "train": f"{out / 'train'} ({len(list_volumes(out / 'train'))} volumes)",
        "val": f"{out / 'val'} ({len(list_volumes(out / 'val'))} volumes)",
        "grid": f"{g['shape']} voxels of {[round(v, 3) for v in g['voxel_nm']]} nm from {g['origin_nm']} nm",
        "density scale": f"{info['counts_per_intensity']:.6g} localisations per unit intensity ({info['scale_rule']}; "
                         f"{100 * info['above_one_fraction']:.2f} % of the density above 1)",
        "dataset info": out / INFO_NAME,
    }
