"""``vqldm points``: a folder of volumes -> one localisation table (CSV, nm) per volume.

The geometry and the density scale come from, in this order: ``--info FILE``; a
``dataset_info.json`` in the folder or its parent (what ``vqldm voxelize`` writes); the ``smlm``
block of the folder's ``samples.json`` (what ``vqldm sample`` records from the checkpoint). A volume
that ``voxelize`` made from a table shifted by ``--per-file-origin`` gets that shift undone, so its
points land where the source table's did. Volume ``i`` draws from its own generator seeded by
``(seed, i)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqldm.data.io import VOLUME_SUFFIXES, list_volumes, read_volume
from vqldm.errors import VqldmError
from vqldm.files import archive_previous, atomic_write_bytes, unique_stems
from vqldm.smlm.dataset import find_info, load_info
from vqldm.smlm.grid import Grid
from vqldm.smlm.points import point_count, volume_to_points
from vqldm.smlm.tables import write_table


@dataclass(frozen=True)
class PointsOptions:
    volumes: Path
    out_dir: Path
    info: str | None = None
    n_points: int | None = None  # default: from the recorded density scale
    threshold: float = 0.0
    seed: int = 0
    progress: bool = True


def density_source(volumes: Path, info_path: str | None) -> tuple[dict, dict, str]:
    """``(density meta, per-file records, where it came from)`` for a folder of volumes."""
    if info_path is not None:
        info = load_info(info_path)
        return info, info.get("files", {}), str(info_path)
    found = find_info(volumes)
    if found is not None:
        info = load_info(found)
        return info, info.get("files", {}), str(found)
    rec = volumes / "samples.json"
    if rec.is_file():
        try:
            smlm = (json.loads(rec.read_text(encoding="utf-8")) or {}).get("smlm")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
            raise VqldmError(f"{rec}: not a readable samples.json ({e})") from None
        if smlm:
            Grid.from_dict(smlm.get("grid") or {}, str(rec))
            return smlm, {}, str(rec)
    raise VqldmError(f"{volumes}: no geometry for its volumes: no dataset_info.json here or in the parent folder "
                     f"and no 'smlm' record in samples.json; pass --info DATASET_INFO.json")


def _record(files: dict, path: Path) -> dict:
    """The voxelize record of this volume (matched by split/name or by name), or {}."""
    rel = f"{path.parent.name}/{path.name}"
    if rel in files:
        return files[rel]
    matches = [v for k, v in files.items() if k.split("/")[-1] == path.name]
    return matches[0] if len(matches) == 1 else {}


def volume_points(path: Path, info: dict, files: dict, opts: PointsOptions, index: int) -> tuple[np.ndarray, dict]:
    vol = read_volume(path).array
    g = Grid.from_dict(info["grid"])
    grid = Grid(g.origin_nm, g.voxel_nm, tuple(int(s) for s in vol.shape))
    n = opts.n_points if opts.n_points is not None else point_count(vol, info["counts_per_intensity"], opts.threshold)
    rng = np.random.default_rng(np.random.SeedSequence(int(opts.seed), spawn_key=(int(index),)))
    pts = volume_to_points(vol, grid, n, rng, opts.threshold)
    shift = np.asarray(_record(files, path).get("shift_nm", [0.0, 0.0, 0.0]), np.float64)
    return pts - shift, {"volume": str(path), "n_localisations": int(len(pts)), "shift_nm": shift.tolist()}


def volumes_to_tables(opts: PointsOptions) -> dict:
    """Write OUT/<name>.csv per volume and OUT/points.json; earlier outputs are archived, never deleted."""
    volumes = Path(opts.volumes)
    paths = list_volumes(volumes)
    if not paths:
        raise VqldmError(f"--volumes {volumes}: holds no volumes (*.nii, *.nii.gz, *.tif, *.tiff)")
    if opts.n_points is not None and opts.n_points < 1:
        raise VqldmError(f"--points {opts.n_points}: must be >= 1")
    info, files, source = density_source(volumes, opts.info)
    stems = unique_stems(paths, VOLUME_SUFFIXES, f"--volumes {volumes}")
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    archive_previous(out, ("*.csv", "points.json"))
    records = []
    items = list(enumerate(zip(paths, stems)))
    if opts.progress:
        from tqdm import tqdm

        items = tqdm(items, desc="points", unit="vol")
    for i, (path, stem) in items:
        pts, rec = volume_points(path, info, files, opts, i)
        rec["table"] = str(write_table(out / f"{stem}.csv", pts))
        records.append(rec)
    summary = {"source": source, "grid": info["grid"], "coordinate_unit": "nm",
               "counts_per_intensity": info["counts_per_intensity"], "threshold": opts.threshold,
               "seed": opts.seed, "fixed_points": opts.n_points, "tables": records}
    atomic_write_bytes(out / "points.json", (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return summary
