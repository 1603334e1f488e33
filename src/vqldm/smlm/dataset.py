"""``dataset_info.json``: the geometry and density scale of a voxelised localisation data set.

``vqldm voxelize`` writes it beside ``train/`` and ``val/``. It holds the :class:`Grid` (nm), the
voxelisation method, ``counts_per_intensity`` (localisations per unit of summed intensity) and, per
volume, its source table, its localisation count and the shift applied to it. Training records the
part that generation needs (:func:`density_meta`) in every checkpoint, so samples can be turned back
into localisations at the real density.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vqldm.errors import VqldmError
from vqldm.smlm.grid import Grid

INFO_NAME = "dataset_info.json"
FORMAT = "vqldm-smlm-dataset"


def find_info(directory: str | Path) -> Path | None:
    """The ``dataset_info.json`` of a volume folder: in it, or in its parent (``DIR/train`` layout)."""
    directory = Path(directory)
    for cand in (directory / INFO_NAME, directory.parent / INFO_NAME):
        if cand.is_file():
            return cand
    return None


def load_info(path: str | Path) -> dict:
    """Read and check a ``dataset_info.json``; one line naming the file when it is not one."""
    path = Path(path)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VqldmError(f"{path}: not a readable dataset_info.json ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise VqldmError(f"{path}: not a vqldm voxelize dataset_info.json (format is not {FORMAT!r})")
    Grid.from_dict(info.get("grid") or {}, str(path))
    cpi = info.get("counts_per_intensity")
    if not isinstance(cpi, (int, float)) or not cpi > 0:
        raise VqldmError(f"{path}: counts_per_intensity must be a positive number, got {cpi!r}")
    return info


def density_meta(info: dict) -> dict:
    """What a checkpoint keeps of a data set's info: grid, method and density scale."""
    return {"grid": info["grid"], "method": info["method"], "sigma_nm": info.get("sigma_nm"),
            "counts_per_intensity": float(info["counts_per_intensity"])}


def info_for_volumes(directory: str | Path, resize=None) -> dict | None:
    """The density meta of a volume folder, or None when it was not made by ``vqldm voxelize``.

    With ``resize`` (``data.voxel_resize``: every volume resampled to that grid first) the voxel size
    grows by the old over the new shape, and ``counts_per_intensity`` by the old over the new voxel
    count, since resampling keeps the mean intensity and so scales the sum by the voxel count.
    """
    path = find_info(directory)
    if path is None:
        return None
    meta = density_meta(load_info(path))
    if resize is not None:
        g = Grid.from_dict(meta["grid"])
        new = tuple(int(n) for n in resize)
        vox = tuple(v * s / n for v, s, n in zip(g.voxel_nm, g.shape, new))
        meta["grid"] = Grid(g.origin_nm, vox, new).to_dict()
        meta["counts_per_intensity"] *= float(np.prod(g.shape)) / float(np.prod(new))
    return meta
