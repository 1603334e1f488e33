"""Generation-quality metrics: do generated volumes look like held-out real ones?

Every distance is reported next to its *real-vs-real floor*: the same distance between
two disjoint random halves of the real set. A distance alone has no scale ("is 0.003
good?"); relative to the floor it reads as "generated differs from real N times as much
as real differs from itself". A ratio <= 2 is taken as realistic.

Units. Nothing is normalised silently:

* ``foreground_fraction``: fraction of voxels > ``threshold`` (dimensionless, 0..1).
* ``filament_length``: voxel count of the 3D skeleton of the foreground mask (voxels;
  a diagonal filament counts ~1 voxel per step, i.e. up to sqrt(3) shorter than its
  Euclidean length).
* ``n_components``: count of 26-connected foreground components >= ``min_component_size``.
* ``orientation_azimuth``: in-plane (xy) angle of the local filament direction,
  radians in [0, pi) (an axis, not a vector: 0 and pi are the same direction).
* ``orientation_elevation``: angle between the local direction and the xy plane,
  radians in [0, pi/2].
* ``intensity``: voxel values of the foreground, in the volume's own units ([0,1]).
* ``segment_straightness``: per skeleton segment (the skeleton cut at its branch points,
  segments of at least ``MIN_SEGMENT_VOXELS``), end-to-end distance / contour length
  (dimensionless, (0, 1]; 1 is a straight segment). Stiff microtubules score near 1; short,
  curly pieces lower. A persistence-length proxy that azimuth and length do not see.
* ``segment_length``: contour length of each such segment (voxels, steps of 1, sqrt 2 or
  sqrt 3 along the skeleton): long filaments give long segments, broken ones short segments.

Angles are measured in voxel-index space, axis order (X, Y, Z): on anisotropic voxels
they are not physical angles, but real and generated are measured the same way.

Distances are 1D Wasserstein-1 (earth mover's) distances in the unit of the statistic,
except ``orientation_azimuth`` which uses the exact circular W1 on [0, pi) so that
filaments along x (angles near both 0 and pi) are not split in two.

Sample-size note: the floor compares halves (n/2 vs n/2) while ``generated_vs_real``
compares n vs n, so a perfect generator is expected to score a ratio below 1 (about
1/sqrt(2) for W1 on per-volume statistics). The 2x threshold is therefore lenient.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
from scipy import ndimage as ndi
from scipy.stats import wasserstein_distance

SCALAR_STATS = ("foreground_fraction", "filament_length", "n_components")
POOLED_STATS = ("orientation_azimuth", "orientation_elevation", "intensity", "segment_straightness",
                "segment_length")
MIN_SEGMENT_VOXELS = 5  # shorter skeleton segments (spurs, specks) say nothing about stiffness
UNITS = {
    "foreground_fraction": "fraction of voxels",
    "filament_length": "skeleton voxels",
    "n_components": "count",
    "orientation_azimuth": "rad, [0, pi), circular W1",
    "orientation_elevation": "rad, [0, pi/2]",
    "intensity": "intensity units",
    "segment_straightness": "end-to-end / contour length per skeleton segment",
    "segment_length": "voxels (contour length per skeleton segment)",
}
PASS_RATIO = 2.0
# Standard MS-SSIM weights (Wang et al. 2003), truncated to the scales that fit.
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_ST_SIGMA, _ST_RHO = 1.0, 2.0  # structure tensor scales (voxels): filament width, local window
_HIST_BINS = 32


def _as_volume(vol: np.ndarray) -> np.ndarray:
    vol = np.asarray(vol)
    if vol.ndim == 4 and vol.shape[0] == 1:
        vol = vol[0]
    if vol.ndim != 3:
        raise ValueError(f"expected a 3D volume (X,Y,Z) or (1,X,Y,Z), got shape {vol.shape}")
    return vol.astype(np.float32, copy=False)


def _orientation(
    vol: np.ndarray, skel: np.ndarray, sigma: float = _ST_SIGMA, rho: float = _ST_RHO
) -> tuple[np.ndarray, np.ndarray]:
    """Azimuth and elevation of the local filament direction at each skeleton voxel.

    Method: gradient structure tensor of the volume (Gaussian derivatives at scale
    ``sigma``, tensor smoothed at integration scale ``rho``), read at skeleton voxels; the
    filament runs along the eigenvector of the *smallest* eigenvalue (gradients of a
    thin line point radially). Grey values give sub-voxel accuracy (about 1 degree on
    straight lines), unlike a PCA of skeleton neighbours, which snaps to the voxel
    lattice. Sampling at skeleton voxels weights every filament by its length.
    """
    if not skel.any():
        return np.zeros(0), np.zeros(0)
    v = vol.astype(np.float32)
    grads = [ndi.gaussian_filter(v, sigma, order=tuple(int(i == a) for i in range(3))) for a in range(3)]
    tensor = np.empty((int(skel.sum()), 3, 3))
    for i in range(3):
        for j in range(i, 3):
            c = ndi.gaussian_filter(grads[i] * grads[j], rho)[skel]
            tensor[:, i, j] = c
            tensor[:, j, i] = c
    _, vecs = np.linalg.eigh(tensor)
    d = vecs[:, :, 0]  # eigh sorts ascending: first column is the along-filament axis
    azimuth = np.mod(np.arctan2(d[:, 1], d[:, 0]), np.pi)
    elevation = np.arcsin(np.clip(np.abs(d[:, 2]), 0.0, 1.0))
    return azimuth, elevation


def volume_statistics(vol: np.ndarray, threshold: float = 0.1, min_component_size: int = 3) -> dict:
    """Per-volume statistics of a sparse filament volume.

    Args:
        vol: (X,Y,Z) or (1,X,Y,Z) array, intensities expected in [0,1].
        threshold: foreground is ``vol > threshold``.
        min_component_size: 26-connected components with fewer voxels are ignored
            (single hot voxels are noise, not filaments).

    Returns:
        dict with ``foreground_fraction`` (float), ``filament_length`` (int, skeleton
        voxels), ``n_components`` (int), ``orientation`` ((N,2) array: azimuth in
        [0, pi) and elevation in [0, pi/2], radians, one row per skeleton voxel, from
        the structure tensor of the volume, see ``_orientation``),
        ``orientation_azimuth`` / ``orientation_elevation`` (the two columns) and
        ``intensities`` (1D float32 array of foreground values).
    """
    from skimage.morphology import skeletonize

    vol = _as_volume(vol)
    mask = vol > threshold
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    if n:
        sizes = np.bincount(labels.ravel())[1:]
        n_comp = int((sizes >= min_component_size).sum())
    else:
        n_comp = 0
    skel = skeletonize(mask) > 0 if mask.any() else np.zeros_like(mask)
    az, el = _orientation(vol, skel)
    straight, seg_len = skeleton_segments(skel)
    return {
        "foreground_fraction": float(mask.mean()),
        "filament_length": int(skel.sum()),
        "n_components": n_comp,
        "orientation": np.stack([az, el], axis=1),
        "orientation_azimuth": az,
        "orientation_elevation": el,
        "intensities": vol[mask].astype(np.float32),
        "segment_straightness": straight,
        "segment_length": seg_len,
    }


# half of the 26 neighbour offsets (the other half are their negatives): each edge is found once
_HALF = [np.array(d) for d in ((i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1))
         if d > (0, 0, 0)]


def _shortcuts(d: np.ndarray) -> list[np.ndarray]:
    """Offsets e of the voxels through which a diagonal step d can also be made in two shorter steps."""
    out = []
    for e in (np.array(x) for x in np.ndindex(3, 3, 3)):
        e = e - 1
        rest = d - e
        if e.any() and rest.any() and np.abs(rest).max() <= 1 and \
                np.linalg.norm(e) < np.linalg.norm(d) and np.linalg.norm(rest) < np.linalg.norm(d):
            out.append(e)
    return out


_SHORTCUTS = [_shortcuts(d) for d in _HALF]


def _skeleton_edges(skel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Skeleton voxels and the 26-adjacency edges between them, without the diagonal edges that
    cut a corner of a shorter path (so a staircase or a bend is one path, not a tangle of triangles).

    Returns (points (N,3), edge start, edge end, edge length).
    """
    pts = np.argwhere(skel)
    idx = -np.ones(np.add(skel.shape, 2), np.int64)
    idx[tuple((pts + 1).T)] = np.arange(len(pts))
    a, b, w = [], [], []
    for d, cuts in zip(_HALF, _SHORTCUTS):
        nb = idx[tuple((pts + 1 + d).T)]
        keep = nb >= 0
        for e in cuts:  # a corner of a shorter path: the diagonal edge is redundant
            keep &= idx[tuple((pts + 1 + e).T)] < 0
        a.append(np.nonzero(keep)[0])
        b.append(nb[keep])
        w.append(np.full(int(keep.sum()), float(np.linalg.norm(d))))
    return pts, np.concatenate(a), np.concatenate(b), np.concatenate(w)


def skeleton_segments(skel: np.ndarray, min_voxels: int = MIN_SEGMENT_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """(straightness, contour length) of each segment of a 3D skeleton, in voxel-index space.

    The skeleton becomes a graph (26-adjacency, corner-cutting diagonals dropped) and is cut at its
    branch points (degree 3 or more), so crossing filaments count as separate pieces rather than
    one bent one. Each remaining path of at least ``min_voxels`` voxels gives its contour length
    (the sum of its steps: 1, sqrt 2, sqrt 3) and end-to-end distance; closed loops are skipped.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    skel = np.asarray(skel, bool)
    if not skel.any():
        return np.zeros(0), np.zeros(0)
    pts, a, b, w = _skeleton_edges(skel)
    n = len(pts)
    junction = np.bincount(np.concatenate([a, b]), minlength=n) >= 3
    keep = ~junction[a] & ~junction[b]
    a, b, w = a[keep], b[keep], w[keep]
    _, comp = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
    comp[junction] = -1
    degree = np.bincount(np.concatenate([a, b]), minlength=n)
    contour = np.bincount(comp[a], weights=w, minlength=comp.max() + 1)
    size = np.bincount(comp[comp >= 0], minlength=comp.max() + 1)
    straight, length = [], []
    for c in np.nonzero(size >= min_voxels)[0]:
        ends = np.nonzero((comp == c) & (degree <= 1))[0]
        if len(ends) != 2 or contour[c] <= 0:
            continue  # a closed loop has no ends
        straight.append(min(float(np.linalg.norm(pts[ends[0]] - pts[ends[1]])) / contour[c], 1.0))
        length.append(float(contour[c]))
    return np.asarray(straight, np.float64), np.asarray(length, np.float64)


def circular_wasserstein(u: np.ndarray, v: np.ndarray, period: float = np.pi) -> float:
    """Exact W1 between two samples on a circle of circumference ``period``.

    Uses W1 = min_c integral |F - G - c| (Rabin et al. 2011), minimised by the
    length-weighted median of F - G.
    """
    u = np.mod(np.asarray(u, np.float64), period)
    v = np.mod(np.asarray(v, np.float64), period)
    pts = np.sort(np.concatenate([u, v, [0.0, period]]))
    lengths = np.diff(pts)
    left = pts[:-1]
    f = np.searchsorted(np.sort(u), left, side="right") / u.size
    g = np.searchsorted(np.sort(v), left, side="right") / v.size
    diff = f - g
    order = np.argsort(diff)
    cw = np.cumsum(lengths[order])
    c = diff[order][np.searchsorted(cw, cw[-1] / 2.0)]
    return float(np.sum(lengths * np.abs(diff - c)))


def _distance(name: str, a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size == 0 or b.size == 0:
        return None
    if name == "orientation_azimuth":
        return circular_wasserstein(a, b, np.pi)
    return float(wasserstein_distance(a, b))


def _mean(name: str, x: np.ndarray) -> float | None:
    """Mean of a statistic; the azimuth is an axis, so its mean is the axial (doubled-angle) mean."""
    if x.size == 0:
        return None
    if name == "orientation_azimuth":
        return float(np.mod(np.angle(np.mean(np.exp(2j * x))) / 2.0, np.pi))
    return float(x.mean())


def _ratio(d: float | None, floor: float | None) -> tuple[float | None, str | None]:
    """d / floor, with explicit answers where that is undefined."""
    if d is None:
        return None, "distance undefined: one side has no values (e.g. no foreground)"
    if floor is None:
        return None, "real-vs-real floor undefined (real halves have no values)"
    if floor == 0.0:
        if d == 0.0:
            return 1.0, "floor is 0 and generated matches it exactly"
        return None, "floor is 0 (real halves identical) but generated differs: unbounded ratio"
    return float(d / floor), None


def _splits(n: int, n_splits: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for _ in range(n_splits):
        p = rng.permutation(n)
        out.append((p[: n // 2], p[n // 2 :]))
    return out


def _subsample(x: np.ndarray, max_n: int, rng: np.random.Generator) -> np.ndarray:
    return x if x.size <= max_n else rng.choice(x, max_n, replace=False)


def _ms_ssim_config(shape: tuple[int, ...], kernel_size: int = 7, min_kernel: int = 5):
    """Largest number of MS-SSIM scales whose coarsest level still holds the kernel.

    MONAI requires ``size // max(1, n_scales-1)**2 >= kernel`` per axis; the conv itself
    needs ``size // 2**(n_scales-1) >= kernel``; both are enforced. Short axes (e.g. an
    anisotropic Z of 24) may use a smaller odd kernel (>= ``min_kernel``) so they do not
    force fewer scales on the whole volume.

    Returns:
        (weights, per-axis kernel sizes), or None if even one scale does not fit.
    """
    for n in range(len(_MS_SSIM_WEIGHTS), 0, -1):
        div = max(max(1, n - 1) ** 2, 2 ** (n - 1))
        ks = []
        for s in shape:
            k = min(kernel_size, s // div)
            k -= (k + 1) % 2  # odd
            ks.append(k)
        floor_k = min_kernel if n > 1 else 3
        if min(ks) >= floor_k:
            w = np.asarray(_MS_SSIM_WEIGHTS[:n])
            return tuple(float(x) for x in w / w.sum()), tuple(ks)
    return None


def _mean_pairwise_ms_ssim(vols: list[np.ndarray], max_pairs: int, rng: np.random.Generator, batch: int = 8) -> dict:
    """Mean MS-SSIM over (at most ``max_pairs`` random) same-shape pairs of ``vols``."""
    import torch
    from monai.metrics import MultiScaleSSIMMetric

    shapes = [v.shape for v in vols]
    # One kernel config serves all pairs, so pair only volumes of the most common shape.
    shape = max(sorted(set(shapes)), key=shapes.count) if shapes else None
    idx = [i for i, s in enumerate(shapes) if s == shape]
    pairs = list(combinations(idx, 2))
    if not pairs:
        return {"mean": None, "std": None, "n_pairs": 0, "note": "fewer than 2 same-shape volumes"}
    cfg = _ms_ssim_config(shape)
    if cfg is None:
        return {"mean": None, "std": None, "n_pairs": 0, "note": f"volume shape {shape} too small for SSIM"}
    if len(pairs) > max_pairs:
        pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
    weights, ks = cfg
    metric = MultiScaleSSIMMetric(
        spatial_dims=3, data_range=1.0, kernel_size=ks, kernel_sigma=1.5, weights=weights, reduction="none"
    )
    vals = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            a = torch.from_numpy(np.stack([vols[i] for i, _ in chunk])[:, None].copy())
            b = torch.from_numpy(np.stack([vols[j] for _, j in chunk])[:, None].copy())
            vals.extend(metric(a, b).flatten().tolist())
    vals = np.asarray(vals, np.float64)
    return {
        "mean": float(vals.mean()),
        "std": float(vals.std()),
        "n_pairs": int(vals.size),
        "n_scales": len(weights),
        "kernel_size": [int(k) for k in ks],
        "weights": [round(w, 4) for w in weights],
    }


def _features(stats: list[dict], mu: np.ndarray, sd: np.ndarray, edges: np.ndarray) -> np.ndarray:
    scal = np.array([[s[k] for k in SCALAR_STATS] for s in stats], np.float64)
    scal = (scal - mu) / sd
    hists = []
    for s in stats:
        h, _ = np.histogram(s["intensities"], bins=edges)
        hists.append(h / h.sum() if h.sum() else h.astype(np.float64))
    return np.concatenate([scal, np.asarray(hists, np.float64)], axis=1)


def _mmd(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """MMD (square root of the biased V-statistic MMD^2, >= 0) with a Gaussian kernel."""

    def k(a, b):
        d2 = np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
        return np.exp(-d2 / (2.0 * bandwidth**2))

    m2 = k(x, x).mean() + k(y, y).mean() - 2.0 * k(x, y).mean()
    return float(math.sqrt(max(m2, 0.0)))


def pooled_histogram(real: np.ndarray, gen: np.ndarray, lo: float, hi: float, bins: int = _HIST_BINS) -> dict:
    """Real and generated densities (each sums to 1, or all 0 if empty) on shared bins over [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)

    def dens(x):
        h, _ = np.histogram(np.clip(x, lo, hi), bins=edges)
        return (h / h.sum()).tolist() if h.sum() else [0.0] * bins

    return {"edges": edges.tolist(), "real": dens(real), "generated": dens(gen)}


def pooled_range(name: str, threshold: float, real: np.ndarray, gen: np.ndarray) -> tuple[float, float]:
    """The histogram range of a pooled statistic: its natural range, or the data's for lengths."""
    fixed = {"orientation_azimuth": (0.0, np.pi), "orientation_elevation": (0.0, np.pi / 2),
             "intensity": (threshold, 1.0), "segment_straightness": (0.0, 1.0)}
    if name in fixed:
        return fixed[name]
    hi = max([float(x.max()) for x in (real, gen) if x.size] or [1.0])
    return 0.0, hi


def compare(
    real: list[np.ndarray],
    generated: list[np.ndarray],
    threshold: float = 0.1,
    seed: int = 0,
    n_splits: int = 10,
    min_component_size: int = 3,
    max_pairs: int = 20,
    max_pooled: int = 200_000,
    intensity_bins: int = 8,
    redraws: int = 100,
) -> dict:
    """Compare generated volumes with held-out real ones, each distance against its floor.

    Args:
        real: held-out real volumes, (X,Y,Z) arrays in [0,1]; at least 2 (4+ advised).
        generated: generated volumes, same conventions; at least 1.
        threshold: foreground threshold for every statistic.
        seed: seeds the real-half splits, MS-SSIM pair choice and pooled subsampling.
        n_splits: random real/real splits averaged for each floor.
        min_component_size: see ``volume_statistics``.
        max_pairs: cap on MS-SSIM pairs per set (speed).
        max_pooled: pooled distributions larger than this are randomly subsampled
            before the W1 distance (speed; W1 of a 200k subsample is accurate to ~1e-3).
        intensity_bins: bins of the per-volume intensity histogram used in MMD features.
        redraws: bootstrap redraws of the generated set (0: none). Each ratio gets the 5th-95th
            percentile of its redrawn values (``ratio_interval``), and the summary the fraction of
            redraws with every ratio within 2x (``redraw_pass_rate``): how much the verdict owes to
            which volumes were drawn. The ratios themselves do not depend on it.

    Returns:
        JSON-serialisable dict: ``n_real``, ``n_generated``, ``threshold``,
        ``statistics`` (per statistic: ``generated_vs_real``, ``real_vs_real``, ``ratio``,
        ``real_mean``, ``generated_mean``, ``units``, and ``ratio_note`` when the ratio is
        None), ``diversity`` (mean pairwise MS-SSIM, lower = more diverse), ``mmd``,
        ``summary`` (``max_ratio`` over statistics and MMD with a defined ratio,
        ``within_2x_floor``: every ratio defined and <= 2, ``failed``: names; with ``redraws``
        also ``redraw_pass_rate`` and ``redraws``, and each defined ratio its ``ratio_interval``),
        ``warnings``, ``per_volume`` and ``histograms`` (for plots).

    Raises:
        ValueError: fewer than 2 real or no generated volumes, or a non-3D volume.
    """
    if len(real) < 2:
        raise ValueError(f"compare() needs at least 2 real volumes for a real-vs-real floor, got {len(real)}")
    if len(generated) < 1:
        raise ValueError("compare() needs at least 1 generated volume, got 0")
    real = [_as_volume(v) for v in real]
    generated = [_as_volume(v) for v in generated]
    rng = np.random.default_rng(seed)
    warnings = _input_warnings(real, generated, threshold)
    rs = [volume_statistics(v, threshold, min_component_size) for v in real]
    gs = [volume_statistics(v, threshold, min_component_size) for v in generated]
    splits = _splits(len(real), n_splits, rng)
    statistics, histograms = _distances(rs, gs, splits, rng, max_pooled, threshold)
    features = _mmd_features(rs, gs, threshold, intensity_bins)
    mmd = _mmd_block(features, splits, intensity_bins)
    redraw = _redraws(rs, gs, features, statistics, mmd, redraws, seed)
    per_volume = {k: {"real": [s[k] for s in rs], "generated": [s[k] for s in gs]} for k in SCALAR_STATS}
    return {
        "n_real": len(real),
        "n_generated": len(generated),
        "threshold": float(threshold),
        "min_component_size": int(min_component_size),
        "n_splits": int(n_splits),
        "seed": int(seed),
        "statistics": statistics,
        "diversity": _diversity(real, generated, max_pairs, seed),
        "mmd": mmd,
        "summary": {**_summary(statistics, mmd["ratio"]), **redraw},
        "warnings": warnings,
        "per_volume": per_volume,
        "histograms": histograms,
    }


def _input_warnings(real: list[np.ndarray], generated: list[np.ndarray], threshold: float) -> list[str]:
    warnings: list[str] = []
    if len(real) < 4:
        warnings.append(
            f"only {len(real)} real volumes: the real-vs-real floor compares halves of "
            f"{len(real) // 2} volume(s) and is noisy; use 4+ (ideally 16+)"
        )
    for name, vols in (("real", real), ("generated", generated)):
        lo = min(float(v.min()) for v in vols)
        hi = max(float(v.max()) for v in vols)
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            warnings.append(
                f"{name} volumes span [{lo:.3g}, {hi:.3g}], not [0,1]: threshold "
                f"{threshold} and intensity distances may be meaningless"
            )
    if {v.shape for v in real} != {v.shape for v in generated}:
        warnings.append(
            f"real shapes {sorted({v.shape for v in real})} differ from generated "
            f"{sorted({v.shape for v in generated})}: fractions/lengths/counts are not comparable"
        )
    return warnings


def _values(stats: list[dict], name: str) -> np.ndarray:
    """One statistic over a set: per-volume scalars, or the pooled per-voxel/per-segment values."""
    if name in SCALAR_STATS:
        return np.array([s[name] for s in stats], np.float64)
    key = "intensities" if name == "intensity" else name
    return np.concatenate([s[key] for s in stats]).astype(np.float64) if stats else np.zeros(0)


def _distances(rs, gs, splits, rng, max_pooled: int, threshold: float) -> tuple[dict, dict]:
    """Per statistic: generated-vs-real distance, the real-vs-real floor, their ratio; pooled histograms."""
    statistics, histograms = {}, {}
    for name in SCALAR_STATS + POOLED_STATS:
        r_all = _subsample(_values(rs, name), max_pooled, rng)
        g_all = _subsample(_values(gs, name), max_pooled, rng)
        d = _distance(name, g_all, r_all)
        floors = []
        for a, b in splits:
            fa = _subsample(_values([rs[i] for i in a], name), max_pooled, rng)
            fb = _subsample(_values([rs[i] for i in b], name), max_pooled, rng)
            f = _distance(name, fa, fb)
            if f is not None:
                floors.append(f)
        floor = float(np.mean(floors)) if floors else None
        ratio, note = _ratio(d, floor)
        entry = {"generated_vs_real": d, "real_vs_real": floor, "ratio": ratio, "real_mean": _mean(name, r_all),
                 "generated_mean": _mean(name, g_all), "units": UNITS[name]}
        if note:
            entry["ratio_note"] = note
        statistics[name] = entry
        if name in POOLED_STATS:
            histograms[name] = pooled_histogram(r_all, g_all, *pooled_range(name, threshold, r_all, g_all))
    return statistics, histograms


def ms_ssim_diversity(vols: list[np.ndarray], max_pairs: int = 64, seed: int = 0) -> dict:
    """Mean pairwise MS-SSIM of same-shape volumes in [0, 1] (high: alike; 1: identical)."""
    return _mean_pairwise_ms_ssim(vols, max_pairs, np.random.default_rng(seed))


def _diversity(real, generated, max_pairs: int, seed: int) -> dict:
    """MS-SSIM within each set; identical-looking samples (mode collapse) score high. Same-seeded pair
    choice per set, so equal-size sets are compared on the same index pairs."""
    div_real = _mean_pairwise_ms_ssim(real, max_pairs, np.random.default_rng(seed))
    div_gen = _mean_pairwise_ms_ssim(generated, max_pairs, np.random.default_rng(seed))
    return {
        "real_ms_ssim": div_real["mean"],
        "generated_ms_ssim": div_gen["mean"],
        "difference": (div_gen["mean"] - div_real["mean"])
        if div_real["mean"] is not None and div_gen["mean"] is not None
        else None,
        "real": div_real,
        "generated": div_gen,
        "interpretation": "mean pairwise MS-SSIM within each set; lower = more diverse. "
        "generated >> real suggests mode collapse; generated << real suggests noise.",
    }


def _mmd_features(rs, gs, threshold: float, intensity_bins: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-volume feature vectors of the real and generated sets (standardised with the real set's
    statistics) and the kernel bandwidth: the median pairwise distance among the real ones."""
    r_scal = np.array([[s[k] for k in SCALAR_STATS] for s in rs], np.float64)
    mu = r_scal.mean(0)
    sd = r_scal.std(0)
    sd[sd == 0] = 1.0  # constant real feature: leave it in raw units rather than divide by 0
    edges = np.linspace(threshold, 1.0, intensity_bins + 1)
    fr = _features(rs, mu, sd, edges)
    fg = _features(gs, mu, sd, edges)
    d_rr = np.sqrt(np.sum((fr[:, None] - fr[None]) ** 2, -1))[np.triu_indices(len(fr), 1)]
    med = float(np.median(d_rr))
    return fr, fg, (med if med > 0 else 1.0)


def _mmd_block(features: tuple, splits, intensity_bins: int) -> dict:
    """MMD on per-volume feature vectors (``_mmd_features``), standardised with the real set's statistics."""
    fr, fg, bandwidth = features
    mmd_d = _mmd(fg, fr, bandwidth)
    mmd_floor = float(np.mean([_mmd(fr[a], fr[b], bandwidth) for a, b in splits]))
    mmd_ratio, mmd_note = _ratio(mmd_d, mmd_floor)
    mmd = {
        "generated_vs_real": mmd_d,
        "real_vs_real": mmd_floor,
        "ratio": mmd_ratio,
        "bandwidth": bandwidth,
        "estimator": "sqrt of biased (V-statistic) MMD^2, Gaussian kernel, bandwidth = median "
        "pairwise distance among real feature vectors",
        "features": [f"{k} (standardised by real mean/std)" for k in SCALAR_STATS]
        + [f"intensity hist bin {i} (fraction of foreground)" for i in range(intensity_bins)],
    }
    if mmd_note:
        mmd["ratio_note"] = mmd_note
    return mmd


REDRAW_POOLED = 20_000  # pooled values per redraw: enough for a percentile, fast enough for 100 redraws


def _redraws(rs, gs, features: tuple, statistics: dict, mmd: dict, n: int, seed: int) -> dict:
    """Bootstrap the generated set ``n`` times (volumes drawn with replacement) against the fixed real
    set and floors. Each defined ratio gets the 5th-95th percentile of its redrawn values
    (``ratio_interval``); returned are the fraction of redraws within 2x on every statistic and MMD (an
    undefined ratio is a miss, as in the summary) and how it was computed."""
    if n <= 0:
        return {}
    rng = np.random.default_rng([seed, 1])  # its own stream: the ratios above stay as they were
    entries = {**statistics, "mmd": mmd}
    defined = [k for k, e in entries.items() if e["ratio"] is not None]
    real = {k: _subsample(_values(rs, k), REDRAW_POOLED, rng) for k in defined if k != "mmd"}
    fr, fg, bandwidth = features  # the MMD block's per-volume features
    ratios = np.full((n, len(defined)), np.nan)
    for b in range(n):
        idx = rng.integers(0, len(gs), len(gs))
        sub = [gs[i] for i in idx]
        for j, k in enumerate(defined):
            d = _mmd(fg[idx], fr, bandwidth) if k == "mmd" else \
                _distance(k, _subsample(_values(sub, k), REDRAW_POOLED, rng), real[k])
            r, _ = _ratio(d, entries[k]["real_vs_real"])
            ratios[b, j] = np.nan if r is None else r
    for j, k in enumerate(defined):
        col = ratios[:, j][np.isfinite(ratios[:, j])]
        if col.size:  # JSON has no NaN: no interval where no redraw has a ratio
            entries[k]["ratio_interval"] = [float(np.percentile(col, q)) for q in (5, 95)]
    passed = np.all(ratios <= PASS_RATIO, axis=1) & (len(defined) == len(entries))  # NaN counts as a miss
    return {"redraw_pass_rate": float(passed.mean()),
            "redraws": {"n": int(n), "interval": "5th-95th percentile", "method": "bootstrap over the generated "
                        "volumes (drawn with replacement); real set and floors fixed"}}


def _summary(statistics: dict, mmd_ratio: float | None) -> dict:
    judged = {**{k: v["ratio"] for k, v in statistics.items()}, "mmd": mmd_ratio}
    defined = [r for r in judged.values() if r is not None]
    failed = [k for k, r in judged.items() if r is None or r > PASS_RATIO]
    return {"max_ratio": max(defined) if defined else None, "within_2x_floor": not failed, "failed": failed,
            "pass_ratio": PASS_RATIO}
