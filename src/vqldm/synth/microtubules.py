"""Synthetic 3D SMLM microtubule volumes: worm-like chains, localisations, voxelised density.

The generator mimics what a 4Pi-SMLM microtubule data set looks like after voxelisation:

1. Filaments are smooth chains in a thin slab (default 8 x 8 x 0.3 um). The in-plane
   direction is a discrete worm-like chain (heading angle random walk with per-step variance
   ``step / persistence``). A free 3D chain would leave a 300 nm slab within a micrometre, so
   the out-of-plane tilt is instead a stationary AR(1) process (small, slowly varying
   elevation angle) and z is folded back at the slab faces, as in a flat cell lamella.
2. Fluorophores are Poisson-sampled along each chain with a log-normally modulated rate
   (uneven labelling), placed within the tube radius; each blinks into a few localisations
   scattered by the localisation precision. A few uniform background localisations are added.
3. Localisations are histogrammed on the voxel grid, blurred (~1 voxel) and divided by a
   robust maximum, so each volume lies in [0, 1] with max 1.

Everything is vectorised over filaments and points; each volume depends only on its RNG.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, signal

from vqldm.files import atomic_write_bytes
from vqldm.data.io import nifti_bytes as _nifti_bytes
from vqldm.errors import VqldmError
from vqldm.smlm.tables import write_table

__all__ = ["MicrotubuleParams", "synth_volume", "synth_volume_and_locs",
           "write_dataset", "density_levels", "stiffness_levels", "voxel_size_nm", "nifti_bytes", "FOREGROUND_THRESHOLD"]

FOREGROUND_THRESHOLD = 0.1  # a voxel above this (normalised) counts as foreground in summaries
_SPLITS = ("train", "val")


@dataclass(frozen=True)
class MicrotubuleParams:
    """Physical and imaging parameters of the synthetic microtubule data set.

    Pairs ``(lo, hi)`` are ranges from which a value is drawn uniformly per volume
    (``n_filaments``) or per filament (the others).
    """

    fov_nm: tuple[float, float, float] = (8000.0, 8000.0, 300.0)  # field of view x, y, z (nm)
    n_filaments: tuple[int, int] = (5, 15)  # filaments per volume, inclusive range (count)
    length_nm: tuple[float, float] = (4000.0, 12000.0)  # contour length per filament (nm)
    persistence_nm: tuple[float, float] = (8000.0, 40000.0)  # effective in-plane persistence length (nm)
    tilt_sd_rad: float = 0.025  # stationary sd of the elevation angle out of the xy plane (rad)
    tilt_corr_nm: float = 1500.0  # correlation length of the elevation angle along a filament (nm)
    step_nm: float = 20.0  # chain discretisation step (nm)
    tube_radius_nm: float = 12.5  # microtubule radius; labels lie within it (nm)
    label_density_per_nm: tuple[float, float] = (0.03, 0.1)  # mean fluorophores per filament length (1/nm)
    density_sd: float = 0.6  # sd of the log labelling rate along a filament (log units)
    density_corr_nm: float = 300.0  # correlation length of the labelling-rate modulation (nm)
    locs_per_label: float = 3.0  # mean localisations per fluorophore from repeated blinking (count)
    precision_xy_nm: float = 10.0  # median lateral localisation precision, sigma (nm)
    precision_z_nm: float = 8.0  # median axial localisation precision, sigma (nm)
    precision_spread: float = 0.3  # sd of log precision across localisations (log units)
    background_fraction: float = 0.02  # uniform background localisations per filament localisation (ratio)
    blur_sigma_vox: float = 1.0  # Gaussian blur after histogramming, sigma (voxels)
    norm_percentile: float = 99.5  # percentile of nonzero voxels used as the robust max (percent)
    norm_floor_locs: float = 12.0  # robust max is at least the blurred peak of this many coincident localisations (count)

    def __post_init__(self) -> None:
        # YAML/JSON give lists; store tuples so params stay hashable and asdict round-trips.
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        if len(self.fov_nm) != 3 or min(self.fov_nm) <= 0:
            raise VqldmError(f"synth params: fov_nm must be 3 positive numbers, got {self.fov_nm}")
        for name in ("n_filaments", "length_nm", "persistence_nm", "label_density_per_nm"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not (0 < lo_hi[0] <= lo_hi[1]):
                raise VqldmError(f"synth params: {name} must be a range (lo, hi) with 0 < lo <= hi, got {lo_hi}")
        for name in ("tilt_corr_nm", "step_nm", "density_corr_nm", "locs_per_label", "norm_percentile"):
            if not getattr(self, name) > 0:
                raise VqldmError(f"synth params: {name} must be > 0, got {getattr(self, name)}")
        for name in ("tilt_sd_rad", "tube_radius_nm", "density_sd", "precision_xy_nm", "precision_z_nm",
                     "precision_spread", "background_fraction", "blur_sigma_vox", "norm_floor_locs"):
            if not getattr(self, name) >= 0:
                raise VqldmError(f"synth params: {name} must be >= 0, got {getattr(self, name)}")
        if self.locs_per_label < 1:
            raise VqldmError(f"synth params: locs_per_label must be >= 1, got {self.locs_per_label}")
        if self.norm_percentile > 100:
            raise VqldmError(f"synth params: norm_percentile must be <= 100, got {self.norm_percentile}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> MicrotubuleParams:
        """Builds params from a config mapping; unknown keys are an error naming the key."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise VqldmError(f"synth params: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def voxel_size_nm(shape: tuple[int, int, int], params: MicrotubuleParams = MicrotubuleParams()) -> tuple[float, ...]:
    """Voxel size (nm) per axis: the field of view divided by the grid shape."""
    shape = _check_shape(shape)
    return tuple(float(f) / s for f, s in zip(params.fov_nm, shape))


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise VqldmError(f"synth: shape must be 3 positive integers (X, Y, Z), got {shape!r}") from None
    if len(out) != 3 or min(out) < 1:
        raise VqldmError(f"synth: shape must be 3 positive integers (X, Y, Z), got {shape!r}")
    return out


def _chains(rng: np.random.Generator, p: MicrotubuleParams, n: int):
    """Vertices (n, N+1, 3), segment counts (n,), and per-segment frames of n chains."""
    ds = p.step_nm
    lengths = rng.uniform(*p.length_nm, size=n)
    persist = rng.uniform(*p.persistence_nm, size=n)
    n_seg = np.maximum(1, np.ceil(lengths / ds).astype(np.int64))
    N = int(n_seg.max())

    # In-plane heading: discrete WLC, angle increments with variance ds / Lp.
    theta0 = rng.uniform(0.0, 2.0 * np.pi, size=n)
    dtheta = rng.standard_normal((n, N)) * np.sqrt(ds / persist)[:, None]
    dtheta[:, 0] = 0.0
    theta = theta0[:, None] + np.cumsum(dtheta, axis=1)

    # Elevation: stationary AR(1) so filaments stay nearly in-plane yet weave in z.
    a = math.exp(-ds / p.tilt_corr_nm)
    u = rng.standard_normal((n, N)) * p.tilt_sd_rad
    u[:, 1:] *= math.sqrt(1.0 - a * a)
    phi = signal.lfilter([1.0], [1.0, -a], u, axis=1)

    cphi, sphi = np.cos(phi), np.sin(phi)
    cth, sth = np.cos(theta), np.sin(theta)
    tangent = np.stack([cphi * cth, cphi * sth, sphi], axis=-1)
    verts = np.zeros((n, N + 1, 3))
    verts[:, 1:] = np.cumsum(ds * tangent, axis=1)

    # Pin a random point along each chain inside the field, so chains cross it in both directions.
    fov = np.asarray(p.fov_nm, dtype=np.float64)
    anchor_idx = np.floor(rng.uniform(size=n) * n_seg).astype(np.int64)
    anchor = rng.uniform(size=(n, 3)) * fov
    verts += (anchor - verts[np.arange(n), anchor_idx])[:, None, :]
    # Fold z back into the slab (reflection at its faces) rather than letting filaments vanish.
    zf = fov[2]
    t = np.mod(verts[..., 2], 2.0 * zf)
    verts[..., 2] = np.where(t > zf, 2.0 * zf - t, t)

    # Orthonormal cross-section frame per segment: e1 horizontal, e2 = tangent x e1.
    e1 = np.stack([-sth, cth, np.zeros_like(cth)], axis=-1)
    e2 = np.stack([-sphi * cth, -sphi * sth, cphi], axis=-1)
    return verts, n_seg, lengths, persist, e1, e2


def _smooth_lognormal(rng: np.random.Generator, shape: tuple[int, int], sd: float, corr_steps: float) -> np.ndarray:
    """Mean-one log-normal modulation, correlated along axis 1 over ``corr_steps`` samples."""
    g = rng.standard_normal(shape)
    if sd == 0:
        return np.ones(shape)
    if corr_steps > 0.5:
        g = ndimage.gaussian_filter1d(g, corr_steps, axis=1, mode="wrap")
        delta = np.zeros(int(8 * corr_steps) + 3)
        delta[len(delta) // 2] = 1.0
        g /= math.sqrt(float(np.sum(ndimage.gaussian_filter1d(delta, corr_steps, mode="constant") ** 2)))
    return np.exp(sd * g - 0.5 * sd * sd)


def _localisations(rng: np.random.Generator, p: MicrotubuleParams, n: int):
    verts, n_seg, lengths, persist, e1, e2 = _chains(rng, p, n)
    N = verts.shape[1] - 1
    ds = p.step_nm

    density = rng.uniform(*p.label_density_per_nm, size=n)
    mod = _smooth_lognormal(rng, (n, N), p.density_sd, p.density_corr_nm / ds)
    valid = np.arange(N)[None, :] < n_seg[:, None]
    rate = density[:, None] * mod * ds * valid
    n_lab = rng.poisson(rate)  # fluorophores per segment

    fil, seg = np.nonzero(n_lab)
    reps = n_lab[fil, seg]
    fil, seg = np.repeat(fil, reps), np.repeat(seg, reps)
    m = fil.size
    t = rng.uniform(size=m)[:, None]
    pos = verts[fil, seg] + t * (verts[fil, seg + 1] - verts[fil, seg])
    r = p.tube_radius_nm * np.sqrt(rng.uniform(size=m))[:, None]
    psi = rng.uniform(0.0, 2.0 * np.pi, size=m)[:, None]
    pos += r * (np.cos(psi) * e1[fil, seg] + np.sin(psi) * e2[fil, seg])

    # Repeated blinking: each fluorophore gives 1 + Poisson(mean - 1) localisations.
    n_loc = 1 + rng.poisson(p.locs_per_label - 1.0, size=m)
    locs = np.repeat(pos, n_loc, axis=0)
    k = locs.shape[0]
    scale = np.exp(p.precision_spread * rng.standard_normal(k))[:, None]
    sigma = np.array([p.precision_xy_nm, p.precision_xy_nm, p.precision_z_nm])[None, :]
    locs += rng.standard_normal((k, 3)) * sigma * scale

    n_bg = int(rng.poisson(p.background_fraction * k))
    bg = rng.uniform(size=(n_bg, 3)) * np.asarray(p.fov_nm)
    locs = np.concatenate([locs, bg], axis=0)

    per_fil = np.bincount(np.repeat(fil, n_loc), minlength=n)
    info = {
        "lengths_nm": n_seg * ds,
        "persistence_nm": persist,
        "label_density_per_nm": density,
        "n_localisations_per_filament": per_fil,
        "n_background": n_bg,
    }
    return locs, info


def _voxelise(locs: np.ndarray, shape: tuple[int, int, int], vox: np.ndarray, p: MicrotubuleParams) -> np.ndarray:
    idx = np.floor(locs / vox).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
    idx = idx[inside]
    flat = np.ravel_multi_index(idx.T, shape)
    vol = np.bincount(flat, minlength=int(np.prod(shape))).reshape(shape).astype(np.float32)
    if p.blur_sigma_vox > 0:
        vol = ndimage.gaussian_filter(vol, p.blur_sigma_vox, mode="constant")
    top = float(vol.max())
    if top <= 0:
        return np.zeros(shape, np.float32)
    # Ignore the float tails of the blur kernel so "nonzero" means near some localisation.
    nz = vol[vol > top * 1e-4]
    ref = float(np.percentile(nz, p.norm_percentile))
    # When little filament lies in the field the percentile sinks towards the level of lone
    # background localisations; the floor keeps those faint, and min(top) keeps max == 1.
    ref = min(top, max(ref, p.norm_floor_locs * _unit_peak(p.blur_sigma_vox)))
    return np.clip(vol / ref, 0.0, 1.0).astype(np.float32)


def _unit_peak(sigma: float) -> float:
    """Peak value of one blurred count (one localisation alone in its neighbourhood)."""
    if sigma <= 0:
        return 1.0
    r = int(4 * sigma + 1)
    delta = np.zeros((2 * r + 1,) * 3, np.float32)
    delta[r, r, r] = 1.0
    return float(ndimage.gaussian_filter(delta, sigma, mode="constant")[r, r, r])


def synth_volume(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    params: MicrotubuleParams = MicrotubuleParams(),
) -> tuple[np.ndarray, dict]:
    """Draws one synthetic microtubule volume.

    Args:
        shape: Grid shape (X, Y, Z); the voxel size is ``params.fov_nm / shape``.
        rng: Source of all randomness; the same generator state gives the same volume.
        params: Physical and imaging parameters.

    Returns:
        ``(volume, truth)``: float32 (X, Y, Z) density in [0, 1] with max 1, and a JSON-ready
        dict with n_filaments, lengths_nm, persistence_nm, label_density_per_nm,
        n_localisations, n_background, voxel_size_nm and foreground_fraction.
    """
    vol, truth, _ = synth_volume_and_locs(shape, rng, params)
    return vol, truth


def synth_volume_and_locs(shape, rng: np.random.Generator, params: MicrotubuleParams = MicrotubuleParams()):
    """:func:`synth_volume`, plus the ``(N, 3)`` localisations (nm) inside the field of view that made it."""
    shape = _check_shape(shape)
    p = params
    vox = np.asarray(voxel_size_nm(shape, p))
    n = int(rng.integers(p.n_filaments[0], p.n_filaments[1] + 1))
    locs, info = _localisations(rng, p, n)
    vol = _voxelise(locs, shape, vox, p)
    truth = {
        "n_filaments": n,
        "lengths_nm": [round(float(v), 3) for v in info["lengths_nm"]],
        "persistence_nm": [round(float(v), 3) for v in info["persistence_nm"]],
        "label_density_per_nm": [round(float(v), 6) for v in info["label_density_per_nm"]],
        "n_localisations": int(locs.shape[0]),
        "n_localisations_per_filament": [int(v) for v in info["n_localisations_per_filament"]],
        "n_background": int(info["n_background"]),
        "voxel_size_nm": [float(v) for v in vox],
        "foreground_fraction": float(np.mean(vol > FOREGROUND_THRESHOLD)),
    }
    fov = vox * np.asarray(shape)
    inside = np.all((locs >= 0) & (locs < fov), axis=1)
    # tables keep 0.001 nm: keep a point at the far edge from rounding onto it (outside the grid)
    return vol, truth, np.minimum(locs[inside], fov - 1e-3)


def _volume_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # Keyed by (split, index) only, so a file does not depend on how many others are drawn.
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(_SPLITS.index(split), int(index))))


def nifti_bytes(vol: np.ndarray, voxel_size_nm: tuple[float, ...]) -> bytes:
    """A gzipped NIfTI-1 image of ``vol`` with spacing in micrometres; byte-identical per input.

    gzip headers carry an mtime and file name, so they are fixed here to keep files reproducible.
    """
    spacing_um = [float(v) * 1e-3 for v in voxel_size_nm]
    return _nifti_bytes(vol, spacing_um, gz=True, unit="micron")


def density_levels(params: MicrotubuleParams, levels: int) -> dict[str, MicrotubuleParams]:
    """``levels`` classes of filament density, ``level0`` (fewest) to ``level{levels-1}`` (most): level
    centres spaced geometrically from ``n_filaments[0]`` to twice ``n_filaments[1]`` (5 to 30 by
    default), each level drawing its count from 0.85 to 1.15 times its centre. Cutting the 5 to 15
    range itself into three leaves real volumes only about 60 % separable by foreground fraction and
    mean intensity (nearest centroid, leave-one-out, 20 per level); these levels, about 98 %."""
    lo, hi = params.n_filaments
    if levels < 2:
        raise VqldmError(f"synth: --levels {levels}: needs at least 2 levels")
    ranges = [(max(1, math.floor(0.85 * c)), math.ceil(1.15 * c)) for c in np.geomspace(lo, 2 * hi, levels)]
    if any(a[1] >= b[0] for a, b in itertools.pairwise(ranges)):
        raise VqldmError(f"synth: --levels {levels}: too many levels for filament counts {lo} to {2 * hi} "
                         f"(the levels' ranges would overlap); use fewer")
    return {f"level{k}": replace(params, n_filaments=r) for k, r in enumerate(ranges)}


def stiffness_levels(params: MicrotubuleParams, levels: int) -> dict[str, MicrotubuleParams]:
    """``levels`` classes of filament stiffness, ``level0`` (floppiest) to ``level{levels-1}`` (stiffest):
    persistence-length centres spaced geometrically from a quarter of ``persistence_nm[0]`` to
    ``persistence_nm[1]`` (2 to 40 um by default), each filament drawing 0.85 to 1.15 times its level's
    centre."""
    lo, hi = params.persistence_nm
    if not 2 <= levels <= 6:
        raise VqldmError(f"synth: --levels {levels}: stiffness takes 2 to 6 levels")
    ranges = [(0.85 * c, 1.15 * c) for c in np.geomspace(lo / 4, hi, levels)]
    return {f"level{k}": replace(params, persistence_nm=r) for k, r in enumerate(ranges)}


VARIED = {"density": density_levels, "stiffness": stiffness_levels}  # what --vary can vary, in levels
COVARIATES = ("n_filaments", "persistence_nm", "foreground_fraction")  # the labels file's numeric columns


def _covariates(t: dict) -> list[str]:
    """A volume's covariates: its filament count, mean persistence length (nm) and foreground fraction."""
    return [f"{t['n_filaments']}", f"{float(np.mean(t['persistence_nm'])):.1f}", f"{t['foreground_fraction']:.6g}"]


def _labels_csv(truth: dict[str, dict], levels: list[str] | None) -> bytes:
    """``file,[label,]n_filaments,persistence_nm,foreground_fraction`` rows of every volume, keyed
    ``train/mt_0000.nii.gz`` (a train and a val file of one name differ in their values); volume ``i``'s
    label is level ``i mod N``."""
    head = ["file"] + (["label"] if levels else []) + list(COVARIATES)
    rows = [",".join(head)]
    for split, vols in truth.items():
        for name, t in vols.items():
            label = [levels[int(name[3:7]) % len(levels)]] if levels else []
            rows.append(",".join([f"{split}/{name}"] + label + _covariates(t)))
    return ("\n".join(rows) + "\n").encode("utf-8")


def write_dataset(
    out_dir,
    num_train: int,
    num_val: int,
    shape,
    seed: int,
    params: MicrotubuleParams = MicrotubuleParams(),
    progress: bool = True,
    locs: bool = False,
    levels: int = 0,
    vary: str = "density",
) -> dict:
    """Writes a synthetic microtubule data set as NIfTI volumes plus ground truth.

    Layout: ``out_dir/train/mt_0000.nii.gz``, ..., ``out_dir/val/mt_0000.nii.gz``, ... and
    ``out_dir/ground_truth.json``. Voxel spacing is stored in micrometres (affine and header
    zooms, xyzt_units 'micron'). Volume ``(split, i)`` is seeded from ``(seed, split, i)``, so
    files are byte-identical for the same seed whatever ``num_train``/``num_val`` are.

    Args:
        out_dir: Output folder; created if missing.
        num_train: Number of training volumes.
        num_val: Number of validation volumes.
        shape: Grid shape (X, Y, Z).
        seed: Base seed.
        params: Generator parameters.
        progress: Show a tqdm progress bar.
        locs: Also write each volume's ground-truth localisations (those inside the field of view)
            as ``out_dir/locs/<split>/mt_0000.csv`` (``x [nm],y [nm],z [nm]``).
        levels: With 2 or more, volume ``i`` is drawn at level ``i % levels`` of ``vary`` (density:
            :func:`density_levels`; stiffness: :func:`stiffness_levels`), and ``out_dir/labels.csv`` names
            each file's level (``label``). The labels file always holds each volume's ``n_filaments``, mean
            ``persistence_nm`` and ``foreground_fraction``, covariates for ``diffusion.covariates`` (rows
            keyed ``train/mt_0000.nii.gz``).
        vary: What the levels vary: ``density`` or ``stiffness``.

    Returns:
        Summary dict: out_dir, counts, shape, voxel_size_nm, file paths, ground_truth path and
        mean foreground fraction (voxels > 0.1).

    Raises:
        VqldmError: If out_dir/train or out_dir/val already holds .nii.gz files, or
            out_dir/ground_truth.json exists (nothing is overwritten), or arguments are invalid.
    """
    shape = _check_shape(shape)
    counts = {"train": int(num_train), "val": int(num_val)}
    seed = int(seed)
    out = Path(out_dir)
    gt_path = out / "ground_truth.json"
    _check_target(out, gt_path, counts, seed, locs)
    vox = voxel_size_nm(shape, params)
    if vary not in VARIED:
        raise VqldmError(f"synth: --vary {vary}: choose {' or '.join(VARIED)}")
    varied = VARIED[vary](params, levels) if levels else None
    jobs = [(split, i) for split in _SPLITS for i in range(counts[split])]
    for split in _SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    truth, files, fg = _write_volumes(out, jobs, shape, seed, list(varied.values()) if varied else [params], vox,
                                      progress, locs)
    labels_path = out / "labels.csv"
    atomic_write_bytes(labels_path, _labels_csv(truth, list(varied) if varied else None))
    gt = {
        "seed": seed,
        "shape": list(shape),
        "voxel_size_nm": list(vox),
        "spacing_unit_in_files": "micron",
        "locs_dir": str(out / "locs") if locs else None,
        "foreground_threshold": FOREGROUND_THRESHOLD,
        "params": _jsonable(asdict(params)),
        **({"varied": vary, "levels": {k: _jsonable(asdict(v)) for k, v in varied.items()}} if varied else {}),
        "train": truth["train"],
        "val": truth["val"],
    }
    atomic_write_bytes(gt_path, (json.dumps(gt, indent=2) + "\n").encode("utf-8"))
    return {
        "out_dir": str(out),
        "num_train": counts["train"],
        "num_val": counts["val"],
        "shape": list(shape),
        "voxel_size_nm": list(vox),
        "train_files": files["train"],
        "val_files": files["val"],
        "ground_truth": str(gt_path),
        "locs_dir": str(out / "locs") if locs else None,
        "labels_file": str(labels_path),
        "mean_foreground_fraction": float(np.mean(fg)) if fg else 0.0,
    }


def _check_target(out: Path, gt_path: Path, counts: dict, seed: int, locs: bool = False) -> None:
    """Refuse bad counts and seeds, and any folder that already holds a data set (nothing is overwritten)."""
    if min(counts.values()) < 0:
        raise VqldmError(f"synth: num_train and num_val must be >= 0, got {counts['train']}, {counts['val']}")
    if seed < 0:
        raise VqldmError(f"synth: seed must be a non-negative integer, got {seed}")
    if out.exists() and not out.is_dir():
        raise VqldmError(f"synth: output path {out} exists and is not a directory")
    for split in _SPLITS:
        d = out / split
        if d.is_dir() and any(d.glob("*.nii.gz")):
            raise VqldmError(f"synth: {d} already holds .nii.gz volumes; refusing to overwrite (choose a new out_dir)")
        t = out / "locs" / split
        if locs and t.is_dir() and any(t.glob("*.csv")):
            raise VqldmError(f"synth: {t} already holds localisation tables; refusing to overwrite "
                             f"(choose a new out_dir)")
    for f in (gt_path, out / "labels.csv"):
        if f.exists():
            raise VqldmError(f"synth: {f} already exists; refusing to overwrite (choose a new out_dir)")


def _write_volumes(out: Path, jobs, shape, seed: int, params: list, vox, progress: bool, locs: bool = False):
    """Synthesise and write each (split, i) volume, volume i with ``params[i % len(params)]``; returns
    (ground truth, file paths, foreground fractions)."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="synth", unit="vol")
    truth: dict[str, dict] = {s: {} for s in _SPLITS}
    files: dict[str, list[str]] = {s: [] for s in _SPLITS}
    fg = []
    try:
        for split, i in jobs:
            vol, t, points = synth_volume_and_locs(shape, _volume_rng(seed, split, i), params[i % len(params)])
            name = f"mt_{i:04d}.nii.gz"
            path = out / split / name
            if locs:
                (out / "locs" / split).mkdir(parents=True, exist_ok=True)
                write_table(out / "locs" / split / f"mt_{i:04d}.csv", points)
                t["n_localisations_in_fov"] = int(len(points))
            atomic_write_bytes(path, nifti_bytes(vol, vox))
            truth[split][name] = t
            files[split].append(str(path))
            fg.append(t["foreground_fraction"])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return truth, files, fg


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
