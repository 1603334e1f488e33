"""``vqldm evaluate --points DIR``: generated vs real localisation tables, against the real-vs-real floor.

The real tables are ``--real-points DIR`` or, by default, the held-out volumes (``data.val_data_dir``)
turned into localisations by the same path as the samples (``vqldm points``, with the geometry and
density scale of their ``dataset_info.json``), so that the comparison sees only what generation
changed. Writes OUT/points_metrics.json, OUT/points_report.md and OUT/points.png (rendered xy/xz
projections: real on top, generated below).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vqldm.commands.points import PointsOptions, density_source, volume_points
from vqldm.config import Config
from vqldm.data.io import list_volumes
from vqldm.errors import VqldmError
from vqldm.files import atomic_write_bytes
from vqldm.metrics.pointclouds import POINT_STATS, compare_points
from vqldm.smlm.tables import list_tables, read_table
from vqldm.visuals import image_grid, render_points, save_png

RENDER_PIXEL_NM = 20.0  # a typical SMLM rendering pixel


def _tables(directory: Path, what: str, allow_empty: bool = False) -> list[np.ndarray]:
    if not directory.is_dir():
        raise VqldmError(f"{what} {directory}: no such folder")
    paths = [p for p in list_tables(directory) if p.suffix.lower() == ".csv"]
    if not paths:
        raise VqldmError(f"{what} {directory}: holds no localisation CSV tables")
    return [read_table(p, allow_empty=allow_empty) for p in paths]


def real_tables(cfg: Config, real_points: Path | None, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """The real localisation tables and a line saying where they came from."""
    if real_points is not None:
        return _tables(real_points, "--real-points"), str(real_points)
    val = Path(cfg.data.val_data_dir)
    paths = list_volumes(val)
    if not paths:
        raise VqldmError(f"data.val_data_dir {val}: holds no volumes; pass --real-points DIR of real tables")
    info, files, source = density_source(val, None)
    opts = PointsOptions(volumes=val, out_dir=val, seed=seed, progress=False)
    tables = [volume_points(p, info, files, opts, i)[0] for i, p in enumerate(paths)]
    return tables, f"{val} via points ({source})"


def _render(real: list[np.ndarray], gen: list[np.ndarray], out: Path, n: int = 4) -> Path:
    both = np.concatenate([t for t in real[:n] + gen[:n] if len(t)] or [np.zeros((1, 3))])
    lo, hi = both.min(axis=0), both.max(axis=0) + 1e-6
    rows = [[render_points(t, lo, hi, RENDER_PIXEL_NM) for t in s[:n]] for s in (real, gen)]
    return save_png(image_grid(rows), out / "points.png")


def _markdown(res: dict) -> str:
    lines = ["# Localisations: generated vs real", "",
             f"Real tables: {res['real_source']} ({res['n_real']}); generated: {res['generated_source']} "
             f"({res['n_generated']}). Mean localisations per region: real {res['mean_localisations']['real']:.0f}, "
             f"generated {res['mean_localisations']['generated']:.0f}.", "",
             "| statistic | generated vs real | real vs real (floor) | ratio | unit |", "|---|---|---|---|---|"]
    for name in POINT_STATS:
        s = res["statistics"][name]
        fmt = lambda v: "–" if v is None else f"{v:.4g}"  # noqa: E731
        lines.append(f"| {name} | {fmt(s['generated_vs_real'])} | {fmt(s['real_vs_real'])} | {fmt(s['ratio'])} | "
                     f"{s['units']} |")
    verdict = "every statistic within 2x its floor" if res["summary"]["within_2x_floor"] else \
        f"over 2x its floor: {', '.join(res['summary']['failed'])}"
    lines += ["", f"Verdict: {verdict}.", "", "![real (top) vs generated (bottom), xy over xz](points.png)", ""]
    return "\n".join(lines)


def evaluate_points(cfg: Config, out_dir: Path, points: Path, real_points: Path | None = None,
                    seed: int = 0) -> dict:
    """Compare the tables in ``points`` with the real ones; write metrics, report and picture."""
    gen = _tables(points, "--points", allow_empty=True)  # a generated volume may hold no localisations
    real, source = real_tables(cfg, real_points, seed)
    if len(real) < 2:
        raise VqldmError(f"{source}: needs at least 2 real tables for a real-vs-real floor, got {len(real)}")
    res = compare_points(real, gen, seed=seed)
    res.update(real_source=source, generated_source=str(points))
    out_dir.mkdir(parents=True, exist_ok=True)
    res["picture"] = str(_render(real, gen, out_dir))
    metrics_path, report_path = out_dir / "points_metrics.json", out_dir / "points_report.md"
    atomic_write_bytes(metrics_path, (json.dumps(res, indent=2) + "\n").encode("utf-8"))
    atomic_write_bytes(report_path, _markdown(res).encode("utf-8"))
    return {"metrics_path": metrics_path, "report_path": report_path, **res}
