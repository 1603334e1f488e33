"""The evaluation report: a markdown page with a metrics table, MIPs and histogram overlays.

Pictures are drawn with Pillow only (no matplotlib dependency).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vqldm.files import atomic_write_bytes
from vqldm.metrics.generation import (
    PASS_RATIO,
    POOLED_STATS,
    SCALAR_STATS,
    UNITS,
    pooled_histogram,
    pooled_range,
    volume_statistics,
)

REAL_RGB = (70, 130, 200)
REAL_FILL = (170, 200, 235)
GEN_RGB = (230, 120, 30)
_PRETTY = {
    "foreground_fraction": "foreground fraction",
    "filament_length": "filament length",
    "n_components": "connected components",
    "orientation_azimuth": "orientation azimuth",
    "orientation_elevation": "orientation elevation",
    "intensity": "foreground intensity",
    "segment_straightness": "segment straightness",
    "segment_length": "segment length",
    "mmd": "MMD",
}


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if x == 0.0:
        return "0"
    return f"{x:.{digits}g}"


def _hist_from_values(real: np.ndarray, gen: np.ndarray, integer: bool = False, bins: int = 12) -> dict:
    both = np.concatenate([real, gen]) if real.size + gen.size else np.zeros(1)
    lo, hi = float(both.min()), float(both.max())
    if integer and hi - lo <= 30:
        edges = np.arange(np.floor(lo) - 0.5, np.ceil(hi) + 1.5)
    else:
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)

    def dens(x):
        h, _ = np.histogram(x, bins=edges)
        return (h / h.sum()).tolist() if h.sum() else [0.0] * (len(edges) - 1)

    return {"edges": edges.tolist(), "real": dens(real), "generated": dens(gen)}


def _panel(
    img, box, hist: dict, title: str, xlabel: str, n_real: int, n_gen: int, x_scale: float = 1.0, integer: bool = False
) -> None:
    """One histogram overlay: real as filled bars, generated as a step outline on top."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    f_title, f_small = _font(15), _font(12)
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 58, x1 - 16, y0 + 66, y1 - 42
    draw.text((x0 + 8, y0 + 6), title, fill=(0, 0, 0), font=f_title)
    edges = np.asarray(hist["edges"], np.float64) * x_scale
    r = np.asarray(hist["real"], np.float64)
    g = np.asarray(hist["generated"], np.float64)
    ymax = max(float(r.max(initial=0)), float(g.max(initial=0)), 1e-12) * 1.1
    lo, hi = float(edges[0]), float(edges[-1])
    if hi <= lo:
        hi = lo + 1.0

    def px(x):
        return left + (x - lo) / (hi - lo) * (right - left)

    def py(y):
        return bottom - y / ymax * (bottom - top)

    for k, v in enumerate(r):
        if v > 0:
            draw.rectangle([px(edges[k]), py(v), px(edges[k + 1]), bottom], fill=REAL_FILL, outline=REAL_RGB)
    pts = [(px(edges[0]), bottom)]
    for k, v in enumerate(g):
        pts += [(px(edges[k]), py(v)), (px(edges[k + 1]), py(v))]
    pts.append((px(edges[-1]), bottom))
    draw.line(pts, fill=GEN_RGB, width=3)
    for k, (name, dens) in enumerate((("real", r), ("generated", g))):
        if not dens.sum():  # say so, rather than leave an empty plot to be misread
            draw.text((left + 12, top + 6 + 16 * k), f"{name}: no values", fill=(200, 0, 0), font=f_small)
    _axes(draw, (x0, y0, x1, y1), (left, right, top, bottom), (lo, hi, ymax), px, py, xlabel, integer)
    _legend(draw, x0, y0, n_real, n_gen)


def _axes(draw, box, frame, ranges, px, py, xlabel: str, integer: bool) -> None:
    """Axes, ticks and labels of a histogram panel."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = frame
    lo, hi, ymax = ranges
    f_small = _font(12)
    # axes, ticks, labels
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(0, 0, 0), width=1)
    ticks = (lo, (lo + hi) / 2, hi)
    if integer:  # bins are centred on integers: label the integers, not the bin edges
        ticks = tuple(sorted({round(lo + 0.5), round((lo + hi) / 2), round(hi - 0.5)}))
    for x in ticks:
        xp = px(x)
        draw.line([(xp, bottom), (xp, bottom + 4)], fill=(0, 0, 0))
        lab = _fmt(x, 3)
        w = draw.textlength(lab, font=f_small)
        draw.text((min(max(xp - w / 2, x0 + 2), x1 - w - 2), bottom + 6), lab, fill=(0, 0, 0), font=f_small)
    for y in (0.0, ymax / 1.1):
        yp = py(y)
        draw.line([(left - 4, yp), (left, yp)], fill=(0, 0, 0))
        lab = _fmt(y, 2)
        w = draw.textlength(lab, font=f_small)
        draw.text((left - 6 - w, yp - 7), lab, fill=(0, 0, 0), font=f_small)
    w = draw.textlength(xlabel, font=f_small)
    draw.text(((left + right) / 2 - w / 2, bottom + 22), xlabel, fill=(0, 0, 0), font=f_small)
    draw.text((x0 + 6, top - 15), "fraction", fill=(0, 0, 0), font=f_small)


def _legend(draw, x0: int, y0: int, n_real: int, n_gen: int) -> None:
    f_small = _font(12)
    lx, ly = x0 + 8, y0 + 28
    for i, (name, col, n) in enumerate((("real", REAL_RGB, n_real), ("generated", GEN_RGB, n_gen))):
        draw.rectangle([lx, ly + 2, lx + 14, ly + 12], fill=REAL_FILL if i == 0 else GEN_RGB, outline=col)
        label = f"{name} (n={n})"
        draw.text((lx + 20, ly), label, fill=(0, 0, 0), font=f_small)
        lx += 20 + draw.textlength(label, font=f_small) + 24


def _histogram_data(metrics: dict, real: list[np.ndarray], generated: list[np.ndarray]) -> dict:
    """Histograms for every statistic, from the metrics dict where present, else recomputed."""
    hists = dict(metrics.get("histograms") or {})
    per_volume = dict(metrics.get("per_volume") or {})
    missing_pooled = [k for k in POOLED_STATS if k not in hists]
    missing_scalar = [k for k in SCALAR_STATS if k not in per_volume]
    if missing_pooled or missing_scalar:
        thr = float(metrics.get("threshold", 0.1))
        mcs = int(metrics.get("min_component_size", 3))
        rs = [volume_statistics(v, thr, mcs) for v in real]
        gs = [volume_statistics(v, thr, mcs) for v in generated]
        for k in missing_scalar:
            per_volume[k] = {"real": [s[k] for s in rs], "generated": [s[k] for s in gs]}
        for k in missing_pooled:
            key = "intensities" if k == "intensity" else k
            rv = np.concatenate([s[key] for s in rs]) if rs else np.zeros(0)
            gv = np.concatenate([s[key] for s in gs]) if gs else np.zeros(0)
            hists[k] = pooled_histogram(rv, gv, *pooled_range(k, thr, rv, gv))
    for k in SCALAR_STATS:
        hists[k] = _hist_from_values(
            np.asarray(per_volume[k]["real"], np.float64),
            np.asarray(per_volume[k]["generated"], np.float64),
            integer=k != "foreground_fraction",
        )
    return hists


def _draw_histograms(path: Path, metrics: dict, real, generated) -> Path:
    from PIL import Image

    hists = _histogram_data(metrics, real, generated)
    panels = [
        ("intensity", "foreground intensity (all foreground voxels)", "intensity", 1.0),
        ("orientation_azimuth", "orientation azimuth (skeleton voxels)", "azimuth in xy plane (deg)", 180 / np.pi),
        (
            "orientation_elevation",
            "orientation elevation (skeleton voxels)",
            "elevation from xy plane (deg)",
            180 / np.pi,
        ),
        ("foreground_fraction", "foreground fraction (per volume)", "fraction of voxels > threshold", 1.0),
        ("filament_length", "filament length (per volume)", "skeleton voxels", 1.0),
        ("n_components", "connected components (per volume)", "components (26-connected)", 1.0),
        ("segment_straightness", "segment straightness (skeleton segments)", "end-to-end / contour length", 1.0),
        ("segment_length", "segment length (skeleton segments)", "contour length (voxels)", 1.0),
    ]
    pw, ph, cols = 440, 300, 3
    rows = (len(panels) + cols - 1) // cols
    img = Image.new("RGB", (pw * cols, ph * rows), (255, 255, 255))
    n_real = int(metrics.get("n_real", len(real)))
    n_gen = int(metrics.get("n_generated", len(generated)))
    for i, (key, title, xlabel, scale) in enumerate(panels):
        c, r = i % cols, i // cols
        box = (c * pw, r * ph, (c + 1) * pw, (r + 1) * ph)
        _panel(
            img,
            box,
            hists[key],
            title,
            xlabel,
            n_real,
            n_gen,
            x_scale=scale,
            integer=key in ("filament_length", "n_components")
            and len(hists[key]["edges"]) > 2
            and float(np.diff(hists[key]["edges"])[0]) == 1.0,
        )
    img.save(path)
    return path


def _stat_row(name: str, s: dict) -> str:
    ratio = s.get("ratio")
    ok = ratio is not None and ratio <= PASS_RATIO
    mark = "PASS" if ok else "**FAIL**"
    ratio_txt = _fmt(ratio, 3) if ratio is not None else "undefined"
    if s.get("ratio_interval"):  # the 5th-95th percentile over bootstrap redraws of the generated set
        ratio_txt += f" ({_fmt(s['ratio_interval'][0], 3)}-{_fmt(s['ratio_interval'][1], 3)})"
    return (
        f"| {_PRETTY.get(name, name)} | {s.get('units', UNITS.get(name, ''))} | {_fmt(s.get('generated_vs_real'))} "
        f"| {_fmt(s.get('real_vs_real'))} | {ratio_txt} | {mark} | {_fmt(s.get('real_mean'))} "
        f"| {_fmt(s.get('generated_mean'))} |"
    )


def _verdict_lines(metrics: dict, stats: dict, mmd: dict, summary: dict, n_real: int, n_gen: int) -> list[str]:
    lines: list[str] = []
    failed = summary.get("failed", [])
    n_judged = len(stats) + (1 if mmd else 0)
    if summary.get("within_2x_floor"):
        lines.append(
            f"**Verdict: PASS** - all {n_judged} distances are within {PASS_RATIO:g}x the "
            f"real-vs-real floor (max ratio {_fmt(summary.get('max_ratio'), 3)})."
        )
    else:
        lines.append(
            f"**Verdict: FAIL** - {len(failed)} of {n_judged} distances exceed {PASS_RATIO:g}x the "
            f"real-vs-real floor or are undefined: {', '.join(_PRETTY.get(f, f) for f in failed)}."
        )
    lines += [
        "",
        (
            f"- real volumes: {metrics.get('n_real', n_real)}, generated volumes: "
            f"{metrics.get('n_generated', n_gen)}"
        ),
        (
            f"- foreground threshold: {_fmt(metrics.get('threshold'))}; components smaller than "
            f"{metrics.get('min_component_size', 3)} voxels ignored"
        ),
        (
            f"- real-vs-real floor: mean over {metrics.get('n_splits', 'several')} random splits of the real set "
            f"into two disjoint halves (seed {metrics.get('seed', 0)})"
        ),
    ]
    if summary.get("redraw_pass_rate") is not None:
        lines.append(
            f"- redraws: {summary['redraw_pass_rate']:.0%} of {summary['redraws']['n']} bootstrap redraws of the "
            f"generated set pass every distance; each ratio's bracket is its 5th-95th percentile over them "
            f"(how much the verdict owes to which volumes were drawn)"
        )
    lines.append("")
    warnings = metrics.get("warnings") or []
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    return lines


def _statistics_lines(stats: dict, mmd: dict) -> list[str]:
    lines: list[str] = []
    lines += [
        "## Statistics",
        "",
        (
            "Distances are 1D Wasserstein-1 in the units shown (azimuth: circular W1 on [0, pi)). "
            f"*ratio* = generated-vs-real / real-vs-real floor; <= {PASS_RATIO:g} passes."
        ),
        "",
        (
            "| statistic | units | generated vs real | real vs real (floor) | ratio (redraws 5-95 %) | "
            f"<= {PASS_RATIO:g}x floor | real mean | generated mean |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name in list(SCALAR_STATS) + list(POOLED_STATS) + [k for k in stats if k not in SCALAR_STATS + POOLED_STATS]:
        if name in stats:
            lines.append(_stat_row(name, stats[name]))
            if stats[name].get("ratio_note"):
                notes.append(f"- {_PRETTY.get(name, name)}: {stats[name]['ratio_note']}")
    if mmd:
        lines.append(
            _stat_row(
                "MMD (per-volume features)", {**mmd, "units": "kernel units", "real_mean": None, "generated_mean": None}
            )
        )
        if mmd.get("ratio_note"):
            notes.append(f"- MMD: {mmd['ratio_note']}")
    lines.append("")
    if notes:
        lines += ["Undefined ratios:", ""] + notes + [""]
    return lines


def _mmd_lines(mmd: dict) -> list[str]:
    lines: list[str] = []
    if not mmd:
        return lines
    lines += [
        "## MMD",
        "",
        (
            f"Maximum mean discrepancy between per-volume feature vectors: {mmd.get('estimator', '')}. "
            f"Bandwidth {_fmt(mmd.get('bandwidth'))}. Features: {', '.join(mmd.get('features', []))}."
        ),
        (
            f"Generated vs real {_fmt(mmd.get('generated_vs_real'))}, real vs real floor "
            f"{_fmt(mmd.get('real_vs_real'))}, ratio {_fmt(mmd.get('ratio'), 3)}."
        ),
        "",
    ]
    return lines


def _diversity_lines(div: dict) -> list[str]:
    lines: list[str] = []
    if div:
        r, g = div.get("real", {}), div.get("generated", {})
        lines += [
            "## Diversity",
            "",
            (
                "Mean pairwise MS-SSIM within each set (lower = more diverse). Generated much higher than real "
                "suggests mode collapse (samples look alike); much lower suggests noise."
            ),
            "",
            "| set | mean MS-SSIM | std | pairs | scales | kernel |",
            "|---|---|---|---|---|---|",
        ]
        for label, d in (("real", r), ("generated", g)):
            lines.append(
                f"| {label} | {_fmt(d.get('mean'))} | {_fmt(d.get('std'))} | {d.get('n_pairs', 'n/a')} "
                f"| {d.get('n_scales', 'n/a')} | {d.get('kernel_size', 'n/a')} |"
            )
        diff = div.get("difference")
        if diff is not None:
            word = "less" if diff > 0 else "more"
            lines += ["", f"Generated minus real: {_fmt(diff, 3)} (generated samples are {word} diverse than real)."]
        for label, d in (("real", r), ("generated", g)):
            if d.get("note"):
                lines.append(f"- {label}: {d['note']}")
        lines.append("")
    return lines


def _pictures_lines(rows: list, row_names: list[str]) -> list[str]:
    lines: list[str] = []
    lines += ["## Pictures", ""]
    if rows:
        lines += [
            (
                f"Maximum-intensity projections, one row per set ({', then '.join(row_names)}, top to bottom); "
                "each cell shows the XY, XZ and YZ projections of one volume."
            ),
            "",
            "![real vs generated MIPs](real_vs_generated.png)",
            "",
        ]
    lines += [
        ("Histogram overlays: real as filled blue bars, generated as an orange outline; each normalised to sum to 1."),
        "",
        "![histograms](histograms.png)",
        "",
        "## How to read this",
        "",
        (
            "Each distance is compared with the distance between two halves of the real set (the floor): "
            "how much real data differs from itself by chance. A ratio near or below 1 means generated "
            "volumes are as close to real as real volumes are to each other. The floor compares half-size "
            "sets, so a perfect generator scores below 1 and the 2x threshold is lenient. Orientations are "
            "measured in voxel-index space at skeleton voxels, from the structure tensor of the volume."
        ),
        "",
    ]
    return lines


def write_report(
    out_dir,
    metrics: dict,
    real: list[np.ndarray],
    generated: list[np.ndarray],
    title: str = "vqldm evaluation",
    n_show: int = 4,
    preamble: str = "",
) -> Path:
    """Write ``out_dir/report.md`` with ``real_vs_generated.png`` and ``histograms.png`` beside it.

    Args:
        out_dir: output folder (created if missing; existing files of the same names are
            overwritten, nothing is deleted).
        metrics: the dict returned by ``vqldm.metrics.generation.compare``.
        real: the real volumes ``metrics`` was computed on (for pictures).
        generated: the generated volumes.
        title: markdown heading.
        n_show: volumes per row in the MIP grid.
        preamble: markdown placed after the title (e.g. the stage-1 section of ``vqldm evaluate``).

    Returns:
        Path of ``report.md``.
    """
    from vqldm.visuals import mip_grid, save_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, row_names = [], []
    for name, vols in (("real", real), ("generated", generated)):
        if len(vols):
            rows.append(list(vols[:n_show]))
            row_names.append(name)
    if rows:
        save_png(mip_grid(rows), out / "real_vs_generated.png")
    _draw_histograms(out / "histograms.png", metrics, real, generated)
    stats, mmd = metrics.get("statistics", {}), metrics.get("mmd", {})
    lines = [f"# {title}", ""]
    if preamble:
        lines += [preamble, "", "## Generation", ""]
    lines += _verdict_lines(metrics, stats, mmd, metrics.get("summary", {}), len(real), len(generated))
    lines += _statistics_lines(stats, mmd)
    lines += _mmd_lines(mmd)
    lines += _diversity_lines(metrics.get("diversity", {}))
    lines += _pictures_lines(rows, row_names)
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path
