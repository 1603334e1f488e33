"""Point-cloud statistics of localisation tables: generated vs real, each next to its real-vs-real floor.

Per cloud (an ``(N, 3)`` table in nm):

* ``n_localisations``: localisations per region (one table is one region; count).
* ``nn_distance``: each localisation's distance to its nearest neighbour in the same table (nm,
  pooled over a set): the local density and clustering that blinking and labelling make.

Between sets, ``chamfer``: for each cloud of one set, its two-sided Chamfer distance (the mean
nearest-neighbour distance from it to the other cloud plus the mean back, nm) to the closest cloud of
the other set, averaged (the "minimum matching distance" of point-cloud generation papers).

As in :mod:`vqldm.metrics.generation`, every distance is divided by the same distance between two
disjoint halves of the real set, so a ratio near 1 reads "as close to real as real is to itself".
For speed, clouds are subsampled to ``max_points`` (seeded) for the Chamfer distance, and the pooled
nearest-neighbour distances (computed on the whole tables) likewise.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from scipy.stats import wasserstein_distance

from vqldm.metrics.generation import PASS_RATIO, _ratio, _splits

POINT_STATS = ("n_localisations", "nn_distance", "chamfer")
POINT_UNITS = {"n_localisations": "localisations per region (W1)", "nn_distance": "nm (W1 of pooled distances)",
               "chamfer": "nm (two-sided, closest cloud of the other set)"}


def one_sided(a: np.ndarray, b: np.ndarray) -> float:
    """Mean distance from each point of ``a`` to its nearest point of ``b`` (nm)."""
    return float(cKDTree(b).query(a, k=1)[0].mean())


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Chamfer distance: mean NN distance a -> b plus b -> a (nm, not squared)."""
    return one_sided(a, b) + one_sided(b, a)


def nn_distances(a: np.ndarray) -> np.ndarray:
    """Each point's distance to its nearest other point of the same cloud (nm)."""
    if len(a) < 2:
        return np.zeros(0)
    return cKDTree(a).query(a, k=2)[0][:, 1]


def per_axis_offset(a: np.ndarray, b: np.ndarray, voxel_nm) -> list[float]:
    """Mean position of ``a`` minus that of ``b``, per axis, in voxels."""
    return ((a.mean(axis=0) - b.mean(axis=0)) / np.asarray(voxel_nm, np.float64)).tolist()


def _subsample(a: np.ndarray, max_points: int, rng: np.random.Generator) -> np.ndarray:
    return a if len(a) <= max_points else a[rng.choice(len(a), max_points, replace=False)]


def _set_chamfer(xs: list[np.ndarray], ys: list[np.ndarray]) -> float | None:
    xs, ys = [x for x in xs if len(x)], [y for y in ys if len(y)]
    if not xs or not ys:
        return None
    return float(np.mean([min(chamfer(x, y) for y in ys) for x in xs]))


def _stat(name: str, x: dict, y: dict) -> float | None:
    """One statistic between two sets, each ``{"clouds", "nn", "counts"}`` (lists of per-table arrays)."""
    if name == "n_localisations":
        return float(wasserstein_distance(x["counts"], y["counts"]))
    if name == "nn_distance":
        a, b = (np.concatenate(s["nn"]) for s in (x, y))
        return float(wasserstein_distance(a, b)) if a.size and b.size else None
    return _set_chamfer(x["clouds"], y["clouds"])


def _set(tables: list[np.ndarray], max_points: int, rng: np.random.Generator) -> dict:
    """A set's clouds subsampled for Chamfer, nearest-neighbour distances of the *whole* tables (they depend
    on density, so a subsampled cloud would give wrong ones; the distances themselves are then subsampled),
    and the counts."""
    return {"clouds": [_subsample(c, max_points, rng) for c in tables],
            "nn": [_subsample(nn_distances(c), max_points, rng) for c in tables],
            "counts": np.array([len(c) for c in tables], np.float64)}


def _subset(s: dict, idx) -> dict:
    return {"clouds": [s["clouds"][i] for i in idx], "nn": [s["nn"][i] for i in idx], "counts": s["counts"][idx]}


def compare_points(real: list[np.ndarray], generated: list[np.ndarray], seed: int = 0, n_splits: int = 5,
                   max_points: int = 5000) -> dict:
    """Generated vs real localisation tables, each statistic against its real-vs-real floor."""
    if len(real) < 2 or not generated:
        raise ValueError(f"compare_points() needs >= 2 real and >= 1 generated tables, "
                         f"got {len(real)}, {len(generated)}")
    rng = np.random.default_rng(seed)
    r, g = _set(real, max_points, rng), _set(generated, max_points, rng)
    splits = _splits(len(real), n_splits, rng)
    stats = {}
    for name in POINT_STATS:
        d = _stat(name, g, r)
        floors = [f for a, b in splits if (f := _stat(name, _subset(r, a), _subset(r, b))) is not None]
        floor = float(np.mean(floors)) if floors else None
        ratio, note = _ratio(d, floor)
        stats[name] = {"generated_vs_real": d, "real_vs_real": floor, "ratio": ratio, "units": POINT_UNITS[name],
                       **({"ratio_note": note} if note else {})}
    ratios = [s["ratio"] for s in stats.values()]
    return {"n_real": len(real), "n_generated": len(generated), "max_points": max_points, "seed": seed,
            "mean_localisations": {"real": float(r["counts"].mean()), "generated": float(g["counts"].mean())},
            "statistics": stats,
            "summary": {"max_ratio": max((r for r in ratios if r is not None), default=None),
                        "within_2x_floor": all(r is not None and r <= PASS_RATIO for r in ratios),
                        "failed": [k for k, s in stats.items() if s["ratio"] is None or s["ratio"] > PASS_RATIO]}}


def roundtrip(truth: np.ndarray, restored: np.ndarray, voxel_nm, max_points: int = 50_000,
              seed: int = 0) -> dict:
    """How well ``restored`` reproduces ``truth``: count, per-axis offset (voxels), Chamfer (nm, in diagonals)."""
    rng = np.random.default_rng(seed)
    a, b = _subsample(truth, max_points, rng), _subsample(restored, max_points, rng)
    diag = float(np.linalg.norm(voxel_nm))
    cd = chamfer(a, b) if len(a) and len(b) else float("inf")
    return {"n_true": int(len(truth)), "n_restored": int(len(restored)),
            "count_error": (len(restored) - len(truth)) / max(len(truth), 1),
            "mean_offset_voxels": per_axis_offset(restored, truth, voxel_nm) if len(restored) else None,
            "chamfer_nm": cd, "chamfer_diagonals": cd / diag}
