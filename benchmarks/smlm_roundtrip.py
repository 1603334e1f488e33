"""Do localisations survive the trip to voxels and back? synth --locs -> voxelize -> points, per method.

Synthetic microtubule localisations (``vqldm synth --locs``, the ground truth) are voxelised with
each method onto the synthetic data's own grid (8000 x 8000 x 300 nm), turned back into localisations
with ``vqldm points``, and compared table by table: localisation count, mean per-axis offset (voxels)
and two-sided Chamfer distance (nm and voxel diagonals). Goals (issue 15): offset under 0.05 voxel,
Chamfer at most 0.5 diagonal, count within 5 %. Prints and writes OUT/roundtrip.json.

usage: python benchmarks/smlm_roundtrip.py --out DIR [--shape 96 96 48] [--num 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vqldm.commands.points import PointsOptions, volumes_to_tables
from vqldm.commands.voxelize import VoxelizeOptions, voxelize_tables
from vqldm.metrics.pointclouds import roundtrip
from vqldm.smlm.tables import read_table
from vqldm.synth import write_dataset

GOALS = {"abs_offset_voxels": 0.05, "chamfer_diagonals": 0.5, "abs_count_error": 0.05}


def one_method(data: Path, out: Path, method: str, shape) -> dict:
    vox_dir, pts_dir = out / f"vox_{method}", out / f"points_{method}"
    info = voxelize_tables(VoxelizeOptions(inputs=str(data / "locs" / "train"), out_dir=vox_dir, method=method,
                                           fov_nm=[8000.0, 8000.0, 300.0], shape=list(shape), val_fraction=0.0,
                                           progress=False))
    volumes_to_tables(PointsOptions(volumes=vox_dir / "train", out_dir=pts_dir, progress=False))
    rows = []
    for rel, rec in info["files"].items():
        truth = read_table(rec["source"])
        restored = read_table(pts_dir / (Path(rel).name.split(".")[0] + ".csv"))
        rows.append(roundtrip(truth, restored, info["grid"]["voxel_nm"]))
    worst = {"abs_offset_voxels": max(max(abs(v) for v in r["mean_offset_voxels"]) for r in rows),
             "chamfer_diagonals": max(r["chamfer_diagonals"] for r in rows),
             "abs_count_error": max(abs(r["count_error"]) for r in rows)}
    return {"method": method, "voxel_nm": info["grid"]["voxel_nm"], "tables": len(rows),
            "mean_localisations": float(np.mean([r["n_true"] for r in rows])),
            "mean_chamfer_nm": float(np.mean([r["chamfer_nm"] for r in rows])), "worst": worst,
            "meets_goals": all(worst[k] <= GOALS[k] for k in GOALS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 96, 48])
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    write_dataset(out / "data", args.num, 0, tuple(args.shape), args.seed, progress=False, locs=True)
    res = {"shape": args.shape, "goals": GOALS,
           "methods": [one_method(out / "data", out, m, args.shape) for m in ("counts", "gaussian", "occupancy")]}
    (out / "roundtrip.json").write_text(json.dumps(res, indent=2) + "\n")
    for m in res["methods"]:
        w = m["worst"]
        print(f"{m['method']:<9} offset {w['abs_offset_voxels']:.4f} vox  chamfer {w['chamfer_diagonals']:.3f} diag "
              f"({m['mean_chamfer_nm']:.1f} nm mean)  count error {w['abs_count_error']:.4f}  "
              f"goals {'met' if m['meets_goals'] else 'NOT met'}")


if __name__ == "__main__":
    main()
