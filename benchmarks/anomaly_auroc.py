"""Does the token prior's likelihood find anomalies? Synthetic anomalies in held-out volumes.

Each held-out volume (``data.val_data_dir`` of CONFIG) is written three times: as it is, with three
bright blobs added, and with a slab of it emptied. ``vqldm score`` then scores every copy with the
trained token prior (``prior.checkpoints.output_dir``). The script prints and writes, as JSON:

* the AUROC of the per-volume score (mean negative log-likelihood per token, and its 99th percentile)
  separating normal from anomalous volumes, per kind of anomaly;
* whether the per-voxel map highlights the inserted region: the map's mean inside the region over its
  mean outside, per anomalous volume;
* how much of the normal volumes' score is their filament density: a line fitted through (foreground
  fraction, mean NLL) of the normal volumes and its R^2. Near 1, the score mostly measures how much
  filament a volume holds, and anomalies must move it by more than that spread to be found.

usage: python benchmarks/anomaly_auroc.py --config CONFIG --out DIR [--seed 0] [--prior-checkpoint PT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vqldm.commands.score import score_volumes
from vqldm.config import load_config
from vqldm.data.pipeline import normalize_unit
from vqldm.data.io import list_volumes, read_volume, write_volume


def blobs(vol: np.ndarray, rng: np.random.Generator, n: int = 3, sigma: float = 1.5):
    """``vol`` with ``n`` bright Gaussian blobs (peak: the volume's maximum) and their mask."""
    grid = np.indices(vol.shape).astype(np.float32)
    added = np.zeros_like(vol)
    for _ in range(n):
        c = [rng.uniform(s * 0.15, s * 0.85) for s in vol.shape]
        r2 = sum((g - ci) ** 2 for g, ci in zip(grid, c))
        added = np.maximum(added, np.exp(-r2 / (2 * sigma**2)))
    return np.maximum(vol, added * float(vol.max())), added > 0.1


def slab(vol: np.ndarray, rng: np.random.Generator, fraction: float = 0.25):
    """``vol`` with a slab along x (a quarter of its width) emptied, and the slab's mask."""
    width = max(1, int(vol.shape[0] * fraction))
    start = int(rng.integers(0, vol.shape[0] - width + 1))
    mask = np.zeros(vol.shape, bool)
    mask[start:start + width] = True
    out = vol.copy()
    out[mask] = 0.0
    return out, mask


def auroc(normal: list[float], anomalous: list[float]) -> float:
    """P(score of an anomalous volume > score of a normal one), ties counted half (Mann-Whitney)."""
    a, n = np.asarray(anomalous)[:, None], np.asarray(normal)[None, :]
    return float(((a > n).sum() + 0.5 * (a == n).sum()) / (a.size * n.size))


def density_fit(cfg, folder: Path, rows: list[dict]) -> dict:
    """Mean NLL of the normal volumes against their foreground fraction: slope, intercept, R^2."""
    fg = np.array([float((normalize_unit(read_volume(folder / r["file"]).array, cfg.data.clip_percentiles)
                          > cfg.data.foreground_threshold).mean()) for r in rows])
    nll = np.array([r["mean_nll_nats"] for r in rows])
    slope, intercept = np.polyfit(fg, nll, 1)
    r2 = 1.0 - float(((nll - (slope * fg + intercept)) ** 2).sum() / max(((nll - nll.mean()) ** 2).sum(), 1e-12))
    return {"slope_nats_per_fraction": float(slope), "intercept_nats": float(intercept), "r2": r2,
            "mean_nll_sd": float(nll.std())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prior-checkpoint", default=None, help="default: prior.checkpoints.output_dir/best_model.pt")
    args = ap.parse_args()
    cfg, out, rng = load_config(args.config), Path(args.out), np.random.default_rng(args.seed)
    masks: dict[str, dict[str, np.ndarray]] = {"blobs": {}, "slab": {}}
    for f in list_volumes(cfg.data.val_data_dir):
        v = read_volume(f)
        write_volume(out / "normal" / f.name, v.array, v.spacing)
        for kind, make in (("blobs", blobs), ("slab", slab)):
            arr, mask = make(v.array, rng)
            write_volume(out / kind / f.name, arr, v.spacing)
            masks[kind][f.name] = mask
    scores = {k: score_volumes(cfg, out / k, out / f"scores_{k}", args.prior_checkpoint, progress=False)["scores"]
              for k in ("normal", "blobs", "slab")}
    summary = {}
    for kind in ("blobs", "slab"):
        entry = {}
        for key in ("mean_nll_nats", "p99_token_nll_nats"):
            entry[f"auroc_{key}"] = auroc([r[key] for r in scores["normal"]], [r[key] for r in scores[kind]])
        ratios = []
        for r in scores[kind]:
            stem = r["file"].split(".")[0]
            nll = read_volume(out / f"scores_{kind}" / f"nll_{stem}.nii.gz").array
            mask = masks[kind][r["file"]]
            ratios.append(float(nll[mask].mean() / max(nll[~mask].mean(), 1e-9)))
        entry["map_inside_over_outside_median"] = float(np.median(ratios))
        entry["map_highlights_region_in"] = f"{sum(x > 1 for x in ratios)} of {len(ratios)} volumes"
        summary[kind] = entry
    summary["n_normal"] = len(scores["normal"])
    summary["normal_mean_nll_vs_foreground"] = density_fit(cfg, out / "normal", scores["normal"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
